"""What the channel emulator costs: relayed throughput and added latency against the direct bus.

One mosquitto (its ACL allows both paths), one run, side by side: a sender streams tensor messages
(64 KiB and 1 MiB bodies, default 256 KiB chunks) to a receiver through BusSessions in ``direct``
mode (publish straight to rx/...) and in ``emulated`` mode (publish to tx/..., the emulator relays
on an ``ideal`` channel at time_scale 1: no airtime, no delay, no loss, only the relay itself).
The sender awaits each send, as agents do; the clock stops when the receiver holds the last one.
Trials alternate direct and emulated; medians are compared. Then the one-way latency of small
messages (a 16x64 float32 latent), sent one at a time, in alternating blocks.

The emulator runs in this process by default, on the same event loop as both agents, which is the
worst case for it (one core for everything); ``--emulator process`` runs it as
``python -m broker.channel.emulator`` in a process of its own, as a runner may.

    python bench/channel_relay.py [--quick] [--emulator inprocess|process] [--trials T]

relay_ratio is the emulated / direct throughput ratio of the worse message size; added_p50_ms is
the median one-way latency, emulated minus direct. The last line printed is
``relay_ratio=<x> added_p50_ms=<y>``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
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
RNG = np.random.default_rng(0)
SIZES = {"64 KiB": RNG.standard_normal(16_384).astype(np.float32), "1 MiB": RNG.standard_normal(262_144).astype(np.float32)}
LATENT = RNG.standard_normal((16, 64)).astype(np.float32)


@asynccontextmanager
async def emulator(broker: MosquittoBroker, where: str) -> AsyncIterator[ChannelEmulator | None]:
    """An ideal channel at time_scale 1, in this process or in its own."""
    cfg = ChannelConfig(preset="ideal", time_scale=1.0)
    addr = broker.address_for("channel")
    if where == "inprocess":
        async with ChannelEmulator(cfg, RUN, addr, AGENTS, seed=0, wired=()) as emu:
            yield emu
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
        yield None
    finally:
        proc.terminate()
        proc.wait(10)


def sessions(broker: MosquittoBroker, mode: str) -> tuple[BusSession, BusSession]:
    tx = BusSession(BusConfig(RUN, SENDER, broker.address_for(SENDER), channel_mode=mode))  # type: ignore[arg-type]
    rx = BusSession(BusConfig(RUN, RECEIVER, broker.address_for(RECEIVER)))
    return tx, rx


async def stream(broker: MosquittoBroker, mode: str, tensor: np.ndarray, n: int) -> float:
    """Seconds for n messages carrying ``tensor`` to reach the receiver."""
    tx, rx = sessions(broker, mode)
    async with rx, tx:

        async def drain() -> None:
            for _ in range(n):
                await rx.receive(timeout=60)

        task = asyncio.create_task(drain())
        t0 = time.perf_counter()
        for i in range(n):
            await tx.send(RECEIVER, Kind.MODEL, {"w": tensor}, round=i)
        await asyncio.wait_for(task, 120)
        elapsed = time.perf_counter() - t0
        assert not rx.stats.rejected, rx.stats.rejected
    return elapsed


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


async def main(args: argparse.Namespace) -> None:
    console = Console()
    counts = {"64 KiB": args.messages * 8, "1 MiB": args.messages}
    wire = {k: len(encode(kind=Kind.MODEL, run=RUN, src=SENDER, dst=RECEIVER, tensors={"w": t}).payload)
            for k, t in SIZES.items()}  # fmt: skip
    times: dict[tuple[str, str], list[float]] = {(k, m): [] for k in SIZES for m in ("direct", "emulated")}
    lat: dict[str, list[float]] = {"direct": [], "emulated": []}
    with MosquittoBroker(RUN, make_accounts(AGENTS), channel_mode="direct") as broker:
        async with AsyncExitStack() as stack:
            emu = await stack.enter_async_context(emulator(broker, args.emulator))
            for size, tensor in SIZES.items():  # warm-up: connections, page cache, allocator
                for mode in ("direct", "emulated"):
                    await stream(broker, mode, tensor, max(2, counts[size] // 10))
            for trial in range(args.trials):
                order = ("direct", "emulated") if trial % 2 == 0 else ("emulated", "direct")
                for size, tensor in SIZES.items():
                    for mode in order:
                        times[(size, mode)].append(await stream(broker, mode, tensor, counts[size]))
            for block in range(args.latency_blocks):
                order = ("direct", "emulated") if block % 2 == 0 else ("emulated", "direct")
                for mode in order:
                    lat[mode] += await one_way(broker, mode, args.latency // args.latency_blocks)
            stats = emu.stats() if emu is not None else None

    table = Table(title=f"direct bus vs channel emulator (ideal, {args.emulator}), {args.trials} trials, medians")
    for col in ("message", "count", "direct MB/s", "emulated MB/s", "msg/s direct", "msg/s emulated", "ratio"):
        table.add_column(col, justify="left" if col == "message" else "right")
    ratios = []
    for size in SIZES:
        d, e = (float(np.median(times[(size, m)])) for m in ("direct", "emulated"))
        n, mb = counts[size], counts[size] * wire[size] / 1e6
        ratios.append(d / e)
        table.add_row(size, str(n), f"{mb / d:.0f}", f"{mb / e:.0f}", f"{n / d:.0f}", f"{n / e:.0f}", f"{d / e:.3f}")
    console.print(table)
    lt = Table(title=f"one-way latency of a 16x64 latent, {len(lat['direct'])} messages per path")
    for col in ("path", "p50 ms", "p90 ms", "p99 ms"):
        lt.add_column(col, justify="left" if col == "path" else "right")
    for mode, xs in lat.items():
        lt.add_row(mode, *(f"{float(np.percentile(xs, q)) * 1e3:.3f}" for q in (50, 90, 99)))
    console.print(lt)
    if stats is not None:
        t = stats["totals"]
        console.print(f"emulator: {t['frames_in']} payloads in, {t['published']} relayed, "
                      f"backlog peak {t['backlog_peak']}, rejected {stats['rejected'] or 0}")  # fmt: skip
    added = (float(np.median(lat["emulated"])) - float(np.median(lat["direct"]))) * 1e3
    print(f"relay_ratio={min(ratios):.3f} added_p50_ms={added:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages and trials (< 60 s)")
    parser.add_argument("--emulator", choices=("inprocess", "process"), default="inprocess")
    parser.add_argument("--messages", type=int, default=None, help="1 MiB messages per trial (8x as many 64 KiB)")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--latency", type=int, default=None, help="one-way latency samples per path")
    ns = parser.parse_args()
    ns.messages = ns.messages or (40 if ns.quick else 150)
    ns.trials = ns.trials or (5 if ns.quick else 9)
    ns.latency = ns.latency or (400 if ns.quick else 2000)
    ns.latency_blocks = 4 if ns.quick else 10
    asyncio.run(main(ns))
