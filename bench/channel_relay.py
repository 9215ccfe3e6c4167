"""What the channel emulator costs: relayed throughput and added latency against the direct bus.

One mosquitto (its ACL allows every path), one run, side by side: a sender streams tensor messages
(64 KiB and 1 MiB bodies, default 256 KiB chunks) to a receiver through BusSessions on four
paths: ``direct`` (publish straight to rx/...); ``headers``, the emulated channel's default
(``channel.relay: headers``: a body of ``held_min_bytes`` (128 KiB) or more goes straight to the
receiver's held/... topic and waits there while a small announce goes to the emulator, which
releases the body at its modeled delivery; a smaller message goes through the emulator whole);
``held`` (the same with ``held_min_bytes: 0``: every body held, whatever its size); and ``bodies``
(``channel.relay: bodies``: every body goes to tx/... and the emulator republishes it on rx/...,
crossing the broker twice); and ``control``, the direct path again, an A/A comparison that shows
what a path with no overhead at all scores under the same statistic on this machine at this
moment (the ratios' noise and the small bias of taking the worse size of two medians). The
emulator runs an ``ideal`` channel at time_scale 1:
no airtime, no delay, no loss, only the relay itself. The sender awaits each send, as agents do;
the clock stops when the receiver holds the last one. Each trial runs the five paths back to
back (order rotating) and gives one direct/path ratio per other path; the ratio reported is the
median of those paired ratios, which cancels most of the noise of a shared machine. Then the
one-way latency of small messages (a 16x64 float32 latent), sent one at a time, in rotating
blocks (direct and the emulated paths; the control's would be direct's again). CPU seconds per
message of each process come from /proc.

By default the emulator runs as ``python -m broker.channel.emulator``, a process of its own, as in
a run (the agents are other processes); ``--emulator inprocess`` puts it on the bench's event loop
with both agents, where the three share one core and one GIL (the worst case).

What else the machine ran during the trials is measured, not guessed: background_cpu_pct is the
CPU that processes other than the bench, the broker and the emulator used meanwhile (from
/proc/stat, in % of all cores) and steal_pct the time the hypervisor gave the machine's vCPUs to
someone else. The relayed paths use more CPU per message in all than the direct bus (an emulator
process, an announce and a release), so on a busy machine they lose more than the direct bus
does; the A/A control does not show that, since its two sides cost the same. ``--load D`` adds a
process busy a fraction D of the time (0 < D <= 1; one core) for the whole run, to see the relay
on a contended machine (docs/SCALE.md, "Ninth pass").

    python bench/channel_relay.py [--quick] [--emulator process|inprocess] [--trials T] [--load D]

relay_ratio is the default (headers) path's throughput over direct's, for the worse message size;
held_ratio, bodies_ratio and control_ratio the same for the other three; added_p50_ms is the
median one-way latency of the default path minus direct's (bodies_added_p50_ms: the full relay's).
The last line printed is ``relay_ratio=<x> held_ratio=<h> bodies_ratio=<y> control_ratio=<c>
added_p50_ms=<z> bodies_added_p50_ms=<w> background_cpu_pct=<b> steal_pct=<s>``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agents.bus import BusConfig, BusSession  # noqa: E402
from broker.auth import PASSWORD_ENV, make_accounts  # noqa: E402
from broker.channel import ChannelConfig  # noqa: E402
from broker.channel.emulator import ChannelEmulator  # noqa: E402
from broker.server import MosquittoBroker  # noqa: E402
from broker.topics import Kind  # noqa: E402
from broker.wire import encode  # noqa: E402

RUN = "bench"
SENDER, RECEIVER = "client-0", "client-1"
AGENTS = [SENDER, RECEIVER]
# the direct bus; emulated: the default, every body held, the full relay; the direct bus again (A/A)
MODES = ("direct", "headers", "held", "bodies", "control")
EMULATED = MODES[1:4]
COMPARED = MODES[1:]  # each against direct, in the same trial
TIMED = ("direct", *EMULATED)  # paths whose one-way latency is measured
RNG = np.random.default_rng(0)
SIZES = {"64 KiB": RNG.standard_normal(16_384).astype(np.float32),
         "1 MiB": RNG.standard_normal(262_144).astype(np.float32)}  # fmt: skip
LATENT = RNG.standard_normal((16, 64)).astype(np.float32)
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# A process busy a fraction of the time (argv[1]), in bursts of 2-20 ms: a neighbour on the machine.
LOAD = """
import random, sys, time
duty = float(sys.argv[1])
while True:
    burst = random.uniform(0.002, 0.02)
    end = time.perf_counter() + burst
    while time.perf_counter() < end:
        pass
    time.sleep(burst * (1 - duty) / duty)
"""


def machine_ticks() -> tuple[int, int, int]:
    """(busy, steal, total) clock ticks of all cores so far, from /proc/stat (zeros where absent)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return 0, 0, 0
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq, steal, sum(fields)


def background(before: tuple[int, int, int], after: tuple[int, int, int], ours_s: float) -> tuple[float, float]:
    """(background CPU %, steal %) of all cores between two machine_ticks(), given the CPU
    seconds our own processes used meanwhile."""
    busy, steal, total = (b - a for a, b in zip(before, after, strict=True))
    if total <= 0:
        return 0.0, 0.0
    return max(0.0, busy - ours_s * TICK) / total * 100, steal / total * 100


@contextmanager
def load(duty: float) -> Iterator[int | None]:
    """A competing process busy ``duty`` of the time while inside (none at 0); yields its pid."""
    if duty <= 0:
        yield None
        return
    proc = subprocess.Popen([sys.executable, "-c", LOAD, str(duty)])
    try:
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process (0 where /proc is not there)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


@asynccontextmanager
async def emulator(broker: MosquittoBroker, where: str) -> AsyncIterator[int | None]:
    """An ideal channel at time_scale 1, in this process or in its own; yields its pid."""
    cfg = ChannelConfig(preset="ideal", time_scale=1.0)
    addr = broker.address_for("channel")
    if where == "inprocess":
        async with ChannelEmulator(cfg, RUN, addr, AGENTS, seed=0, wired=()):
            yield None
        return
    cmd = [sys.executable, "-m", "broker.channel.emulator", "--run-id", RUN, "--broker",
           f"mqtt://channel@{addr.host}:{addr.port}", "--agents", ",".join(AGENTS), "--wired", "",
           "--preset", "ideal", "--time-scale", "1"]  # fmt: skip
    env = os.environ | {PASSWORD_ENV: addr.password or ""}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)
        assert line.strip() == b"ready", line
        yield proc.pid
    finally:
        proc.terminate()
        proc.wait(10)


def sessions(broker: MosquittoBroker, mode: str) -> tuple[BusSession, BusSession]:
    if mode in ("direct", "control"):
        tx = BusSession(BusConfig(RUN, SENDER, broker.address_for(SENDER)))
        rx = BusSession(BusConfig(RUN, RECEIVER, broker.address_for(RECEIVER)))
    else:
        relay = {"headers": {}, "held": {"held_min_bytes": 0}, "bodies": {"relay": "bodies"}}[mode]
        tx = BusSession(BusConfig(RUN, SENDER, broker.address_for(SENDER), channel_mode="emulated", **relay))  # type: ignore[arg-type]
        rx = BusSession(BusConfig(RUN, RECEIVER, broker.address_for(RECEIVER), channel_mode="emulated"))
    return tx, rx


async def stream(broker: MosquittoBroker, mode: str, tensor: np.ndarray, n: int,
                 pids: dict[str, int | None]) -> tuple[float, dict[str, float]]:  # fmt: skip
    """Seconds for n messages carrying ``tensor`` to reach the receiver, and CPU seconds per process."""
    tx, rx = sessions(broker, mode)
    async with rx, tx:

        async def drain() -> None:
            for _ in range(n):
                await rx.receive(timeout=60)

        task = asyncio.create_task(drain())
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        t0 = time.perf_counter()
        for i in range(n):
            await tx.send(RECEIVER, Kind.MODEL, {"w": tensor}, round=i)
        await asyncio.wait_for(task, 120)
        elapsed = time.perf_counter() - t0
        cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
        assert not rx.stats.rejected, rx.stats.rejected
    return elapsed, cpu


async def one_way(broker: MosquittoBroker, mode: str, n: int) -> list[float]:
    """One-way latencies (seconds) of n small messages sent one at a time, after a warm-up."""
    tx, rx = sessions(broker, mode)
    times = []
    async with rx, tx:
        for i in range(n + 10):
            t0 = time.perf_counter()
            await tx.send(RECEIVER, Kind.LATENT, {"h": LATENT})
            await rx.receive(timeout=10)
            if i >= 10:
                times.append(time.perf_counter() - t0)
    return times


def rotate(modes: tuple[str, ...], i: int) -> tuple[str, ...]:
    """The paths in the order of trial ``i``: each goes first, second and last equally often."""
    k = i % len(modes)
    return modes[k:] + modes[:k]


def median(xs: list[float]) -> float:
    return float(np.median(xs))


async def main(args: argparse.Namespace) -> None:
    console = Console(width=max(Console().width, 160))  # the tables are wide; never truncate figures
    counts = {"64 KiB": args.messages * 8, "1 MiB": args.messages}
    wire = {k: len(encode(kind=Kind.MODEL, run=RUN, src=SENDER, dst=RECEIVER, tensors={"w": t}).payload)
            for k, t in SIZES.items()}  # fmt: skip
    times: dict[tuple[str, str], list[float]] = defaultdict(list)
    cpus: dict[tuple[str, str, str], list[float]] = defaultdict(list)  # (size, mode, process) -> s/msg
    ratios: dict[tuple[str, str], list[float]] = defaultdict(list)  # (size, compared path) -> direct/path
    lat: dict[str, list[float]] = {m: [] for m in TIMED}
    with load(args.load), MosquittoBroker(RUN, make_accounts(AGENTS), channel_mode="direct") as broker:
        async with emulator(broker, args.emulator) as emu_pid:
            pids = {"bench": os.getpid(), "mosquitto": broker.pid}
            if emu_pid is not None:
                pids["emulator"] = emu_pid
            for size, tensor in SIZES.items():  # warm-up: connections, page cache, allocator
                for mode in MODES:
                    await stream(broker, mode, tensor, max(2, counts[size] // 10), pids)
            ticks0, ours0 = machine_ticks(), sum(cpu_seconds(pid) for pid in pids.values())
            for trial in range(args.trials):
                for size, tensor in SIZES.items():
                    pair = {}
                    for mode in rotate(MODES, trial):
                        pair[mode], cpu = await stream(broker, mode, tensor, counts[size], pids)
                        times[(size, mode)].append(pair[mode])
                        for name, seconds in cpu.items():
                            cpus[(size, mode, name)].append(seconds / counts[size])
                    for mode in COMPARED:
                        ratios[(size, mode)].append(pair["direct"] / pair[mode])
            ours = sum(cpu_seconds(pid) for pid in pids.values()) - ours0
            bg_pct, steal_pct = background(ticks0, machine_ticks(), ours)
            for block in range(args.latency_blocks):
                for mode in rotate(TIMED, block):
                    lat[mode] += await one_way(broker, mode, args.latency // args.latency_blocks)

    title = (f"direct bus vs channel emulator (ideal preset, emulator {args.emulator}), {args.trials} trials; "
             f"meanwhile other processes used {bg_pct:.1f} % of the CPU, steal {steal_pct:.1f} %"
             + (f" (with --load {args.load})" if args.load else ""))
    table = Table(title=title)
    for col in ("message", "count", *(f"MB/s {m}" for m in MODES), *(f"ratio {m} (median, min-max)" for m in COMPARED)):
        table.add_column(col, justify="left" if col == "message" else "right")
    for size in SIZES:
        n, mb = counts[size], counts[size] * wire[size] / 1e6
        rates = [f"{mb / median(times[(size, m)]):.0f}" for m in MODES]
        cells = []
        for mode in COMPARED:
            r = ratios[(size, mode)]
            cells.append(f"{median(r):.3f} ({min(r):.2f}-{max(r):.2f})")
        table.add_row(size, str(n), *rates, *cells)
    console.print(table)
    cpu_table = Table(title="CPU per message, microseconds (median over trials)")
    cpu_table.add_column("message / path")
    for name in pids:
        cpu_table.add_column(name, justify="right")
    cpu_table.add_column("total", justify="right")
    for size in SIZES:
        for mode in MODES:
            per = [median(cpus[(size, mode, name)]) * 1e6 for name in pids]
            cpu_table.add_row(f"{size} {mode}", *(f"{v:.0f}" for v in per), f"{sum(per):.0f}")
    console.print(cpu_table)
    lt = Table(title=f"one-way latency of a 16x64 latent, {len(lat['direct'])} messages per path")
    for col in ("path", "p50 ms", "p90 ms", "p99 ms"):
        lt.add_column(col, justify="left" if col == "path" else "right")
    for mode, xs in lat.items():
        lt.add_row(mode, *(f"{float(np.percentile(xs, q)) * 1e3:.3f}" for q in (50, 90, 99)))
    console.print(lt)
    worst = {mode: min(median(ratios[(size, mode)]) for size in SIZES) for mode in COMPARED}
    added = {mode: (median(lat[mode]) - median(lat["direct"])) * 1e3 for mode in EMULATED}
    print(f"relay_ratio={worst['headers']:.3f} held_ratio={worst['held']:.3f} bodies_ratio={worst['bodies']:.3f} "
          f"control_ratio={worst['control']:.3f} added_p50_ms={added['headers']:.3f} "
          f"bodies_added_p50_ms={added['bodies']:.3f} background_cpu_pct={bg_pct:.1f} steal_pct={steal_pct:.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages and trials (< 60 s)")
    parser.add_argument("--emulator", choices=("process", "inprocess"), default="process")
    parser.add_argument("--messages", type=int, default=None, help="1 MiB messages per trial (8x as many 64 KiB)")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--latency", type=int, default=None, help="one-way latency samples per path")
    parser.add_argument("--load", type=float, default=0.0, metavar="D",
                        help="run a competing process busy this fraction of the time (0 < D <= 1; default none)")
    ns = parser.parse_args()
    if not 0 <= ns.load <= 1:
        parser.error(f"--load must be between 0 and 1 (a fraction of one core's time), got {ns.load}")
    ns.messages = ns.messages or (60 if ns.quick else 150)
    ns.trials = ns.trials or (8 if ns.quick else 12)  # quick: ~27 s; its medians were of 4 (12 s), too few
    ns.latency = ns.latency or (400 if ns.quick else 3000)
    ns.latency_blocks = 4 if ns.quick else 12
    asyncio.run(main(ns))
