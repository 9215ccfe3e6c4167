"""Bus throughput and request/reply latency through a project-started mosquitto on loopback.

One agent sends 1 MiB float32 tensor messages to another through the full bus (envelope, blake3,
chunking at the default 256 KiB, reassembly, schema and finiteness validation, dedup), and, in the
same run and broker, raw aiomqtt publishes of the same number of bytes per message at the same QoS.
Each side awaits every send before the next (as agents do) and the clock stops when the receiver
holds the last message. Trials alternate raw and bus; the best trial of each is compared. The CPU
time of this process (sender and receiver together, as ``resource.getrusage``) per message is
reported too: on a small machine, where mosquitto needs a core of its own, that CPU is the gap, and
it is a far steadier figure than the wall clock. Then the round trip of a small request/reply (a
16x64 latent, a 16x10 logits reply).

    python bench/bus_throughput.py [--quick] [--messages N] [--trials T]

The last line printed is ``bus_cpu_ms_per_msg=<c> raw_cpu_ms_per_msg=<r> throughput_ratio=<x>
rtt_p50_ms=<y> rtt_p99_ms=<z>`` (CPU: the median over trials).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from pathlib import Path

import aiomqtt
import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agents.bus import BusConfig, BusSession  # noqa: E402
from broker.auth import BrokerAddress, make_accounts  # noqa: E402
from broker.server import MosquittoBroker  # noqa: E402
from broker.topics import Kind, Topics  # noqa: E402
from broker.wire import Schema, encode  # noqa: E402

RUN = "bench"
SENDER, RECEIVER = "client-0", "client-1"
CHUNK_SIZE = [256 * 1024]  # the bus default, --chunk-size changes it
TENSOR = np.random.default_rng(0).standard_normal(262_144).astype(np.float32)  # 1 MiB


def cpu_s() -> float:
    """User + system CPU seconds of this process so far (every thread)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def client(addr: BrokerAddress, name: str) -> aiomqtt.Client:
    return aiomqtt.Client(
        addr.host, addr.port, username=addr.username, password=addr.password, identifier=f"raw-{name}",
        max_inflight_messages=64,
    )  # fmt: skip


async def raw_trial(broker: MosquittoBroker, n: int, size: int, qos: int) -> tuple[float, float]:
    """Seconds for n raw publishes of `size` bytes to reach the receiver, and CPU seconds spent."""
    topic = Topics(RUN).rx(RECEIVER, SENDER, Kind.MODEL)
    payload = os.urandom(size)
    async with (
        client(broker.address_for(RECEIVER), "rx") as rx,
        client(broker.address_for(SENDER), "tx") as tx,
    ):
        await rx.subscribe(topic, qos=qos)
        got = 0
        done = asyncio.Event()

        async def drain() -> None:
            nonlocal got
            async for message in rx.messages:
                got += len(message.payload) if isinstance(message.payload, bytes) else 0
                if got >= n * size:
                    done.set()
                    return

        task = asyncio.create_task(drain())
        c0, t0 = cpu_s(), time.perf_counter()
        for _ in range(n):
            await tx.publish(topic, payload, qos=qos)
        await asyncio.wait_for(done.wait(), 120)
        elapsed, cpu = time.perf_counter() - t0, cpu_s() - c0
        await task
    return elapsed, cpu


async def bus_trial(broker: MosquittoBroker, n: int, qos: int) -> tuple[float, float]:
    """Seconds for n bus messages of one 1 MiB tensor to be decoded and validated by the receiver,
    and CPU seconds spent."""
    schema = {Kind.MODEL: Schema.like({"w": TENSOR})}
    rx_cfg = BusConfig(RUN, RECEIVER, broker.address_for(RECEIVER), qos=qos)
    tx_cfg = BusConfig(RUN, SENDER, broker.address_for(SENDER), qos=qos, chunk_size=CHUNK_SIZE[0])
    async with BusSession(rx_cfg, schemas=schema) as rx, BusSession(tx_cfg) as tx:

        async def drain() -> None:
            got = 0
            async for _msg in rx.messages():
                got += 1
                if got == n:
                    return

        task = asyncio.create_task(drain())
        c0, t0 = cpu_s(), time.perf_counter()
        for i in range(n):
            await tx.send(RECEIVER, Kind.MODEL, {"w": TENSOR}, round=i)
        await asyncio.wait_for(task, 120)
        elapsed, cpu = time.perf_counter() - t0, cpu_s() - c0
        assert not rx.stats.rejected, rx.stats.rejected
    return elapsed, cpu


async def rtt(broker: MosquittoBroker, n: int) -> list[float]:
    """Round trips of a small request/reply, in seconds."""
    latent = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
    async with (
        BusSession(BusConfig(RUN, RECEIVER, broker.address_for(RECEIVER))) as server,
        BusSession(BusConfig(RUN, SENDER, broker.address_for(SENDER))) as caller,
    ):

        async def serve() -> None:
            async for req in server.messages():
                await server.reply(req, Kind.LOGITS, {"y": req.tensors["h"][:, :10]})

        task = asyncio.create_task(serve())
        times = []
        for i in range(n + 10):
            t0 = time.perf_counter()
            await caller.request(RECEIVER, Kind.LATENT, {"h": latent}, deadline_s=5.0)
            if i >= 10:  # warm-up excluded
                times.append(time.perf_counter() - t0)
        task.cancel()
    return times


async def main(args: argparse.Namespace) -> None:
    console = Console()
    wire_size = len(encode(kind=Kind.MODEL, run=RUN, src=SENDER, dst=RECEIVER, tensors={"w": TENSOR}).payload)
    with MosquittoBroker(RUN, make_accounts([SENDER, RECEIVER])) as broker:
        await bus_trial(broker, 5, args.qos)  # warm-up: connections, page cache, allocator
        raw_times, bus_times, raw_cpu, bus_cpu = [], [], [], []
        for _ in range(args.trials):
            elapsed, cpu = await raw_trial(broker, args.messages, wire_size, args.qos)
            raw_times.append(elapsed)
            raw_cpu.append(cpu / args.messages * 1e3)
            elapsed, cpu = await bus_trial(broker, args.messages, args.qos)
            bus_times.append(elapsed)
            bus_cpu.append(cpu / args.messages * 1e3)
        rtts = await rtt(broker, args.rtt)
    mb = args.messages * wire_size / 1e6
    raw_best, bus_best = min(raw_times), min(bus_times)
    ratio = raw_best / bus_best
    p50, p99 = (float(np.percentile(rtts, q)) * 1e3 for q in (50, 99))

    table = Table(title=f"bus vs raw aiomqtt, {args.messages} x {wire_size / 1e6:.2f} MB, QoS {args.qos}")
    for col in ("path", "best s", "median s", "MB/s (best)", "CPU ms/msg (median)"):
        table.add_column(col, justify="right" if col != "path" else "left")
    rows = (("raw aiomqtt", raw_times, raw_cpu), ("bus (envelope+chunks+checks)", bus_times, bus_cpu))
    for name, times, cpu in rows:
        table.add_row(name, f"{min(times):.3f}", f"{float(np.median(times)):.3f}", f"{mb / min(times):.0f}",
                      f"{float(np.median(cpu)):.3f}")  # fmt: skip
    console.print(table)
    lat = Table(title=f"request/reply round trip, {len(rtts)} requests")
    for col in ("p50 ms", "p90 ms", "p99 ms", "max ms"):
        lat.add_column(col, justify="right")
    lat.add_row(*(f"{float(np.percentile(rtts, q)) * 1e3:.2f}" for q in (50, 90, 99, 100)))
    console.print(lat)
    print(f"bus_cpu_ms_per_msg={float(np.median(bus_cpu)):.3f} raw_cpu_ms_per_msg={float(np.median(raw_cpu)):.3f} "
          f"throughput_ratio={ratio:.3f} rtt_p50_ms={p50:.3f} rtt_p99_ms={p99:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer messages and trials (< 60 s)")
    parser.add_argument("--messages", type=int, default=None, help="messages per trial")
    parser.add_argument("--trials", type=int, default=None)
    parser.add_argument("--rtt", type=int, default=None, help="request/reply round trips")
    parser.add_argument("--qos", type=int, default=1, choices=(0, 1))
    parser.add_argument("--chunk-size", type=int, default=CHUNK_SIZE[0], help="bus chunk size in bytes")
    ns = parser.parse_args()
    CHUNK_SIZE[0] = ns.chunk_size
    ns.messages = ns.messages or (100 if ns.quick else 300)
    ns.trials = ns.trials or (7 if ns.quick else 9)
    ns.rtt = ns.rtt or (200 if ns.quick else 1000)
    asyncio.run(main(ns))
