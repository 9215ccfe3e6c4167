"""The channel emulator on a real mosquitto: agents' traffic crosses the SimPy model and back.

One mosquitto in 'emulated' mode serves the whole module (agents may only write tx/... and held/...);
each test starts its own emulator and BusSessions, and runs once per relay (``headers``: bodies go
straight to the receiver and wait for the emulator's release; ``bodies``: the emulator relays them).
Modeled time runs 100x faster than the wall clock (time_scale 0.01), so modeled delays of tens of
milliseconds cost almost nothing.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import RUN, raw_client, until

from agents.bus import BusConfig, BusSession
from broker.auth import PASSWORD_ENV, make_accounts
from broker.channel import ChannelConfig, ClientOverrides, DirectionOverrides, LinkOverrides
from broker.channel.emulator import ChannelEmulator, RelayOptions, config_from_dict
from broker.envelope import FRAME_CHUNK, FRAME_MESSAGE, pack_prefix
from broker.server import MosquittoBroker, find_mosquitto
from broker.topics import Kind, Topics
from broker.wire import Message, ReassemblyLimits, chunk_count, encode
from nmoe.errors import ChannelError

T = Topics(RUN)
AGENTS = ["coordinator", "client-0", "client-1", "client-2"]
ROOT = Path(__file__).resolve().parent.parent
SCALE = 0.01  # wall seconds per modeled second
RELAY = "headers"  # set by the relay fixture for each test


@pytest.fixture(autouse=True, params=["headers", "bodies"])
def relay(request: pytest.FixtureRequest) -> Iterator[str]:
    global RELAY
    RELAY = request.param
    yield RELAY
    RELAY = "headers"


@pytest.fixture(scope="module")
def mosq() -> Iterator[MosquittoBroker]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    with MosquittoBroker(RUN, make_accounts(AGENTS[1:]), channel_mode="emulated") as broker:
        yield broker


def channel(link: LinkOverrides | None = None, **kw: Any) -> ChannelConfig:
    """An ideal channel (plus ``link`` overrides) with dedicated uplinks, 100x faster than real time."""
    base: dict[str, Any] = {"preset": "ideal", "shared_uplink": False, "time_scale": SCALE}
    return ChannelConfig(link=link or LinkOverrides(), **(base | kw))


def emulator(mosq: MosquittoBroker, cfg: ChannelConfig, seed: int = 0) -> ChannelEmulator:
    return ChannelEmulator(cfg, RUN, mosq.address_for("channel"), AGENTS, seed)


def session(mosq: MosquittoBroker, agent: str, **kw: Any) -> BusSession:
    fast: dict[str, Any] = {"reconnect_initial_s": 0.05, "reconnect_max_s": 0.3, "channel_mode": "emulated",
                            "relay": RELAY, "held_min_bytes": 0}  # headers: hold even the smallest message
    return BusSession(BusConfig(RUN, agent, mosq.address_for(agent), **(fast | kw)))


async def sessions(stack: AsyncExitStack, mosq: MosquittoBroker, *agents: str, **kw: Any) -> list[BusSession]:
    return [await stack.enter_async_context(session(mosq, a, **kw)) for a in agents]


async def nothing_arrives(bus: BusSession, wait_s: float = 0.3) -> bool:
    try:
        await bus.receive(timeout=wait_s)
    except asyncio.TimeoutError:
        return True
    return False


async def taken_off_the_air(emu: ChannelEmulator, frames: int, timeout: float = 5.0) -> None:
    """Wait until the emulator has read ``frames`` payloads, then until it has relayed them all."""

    async def wait() -> None:
        while emu.stats()["totals"]["frames_in"] < frames:
            await asyncio.sleep(0.01)
        await emu.flush()

    await asyncio.wait_for(wait(), timeout)


def link(stats: dict[str, Any], src: str, dst: str) -> dict[str, Any]:
    return stats["links"][f"{src}->{dst}"]


# -- delivery and modeled time ---------------------------------------------------------------------
async def test_fixed_rate_link_stamps_delay_plus_serialization_per_hop(mosq: MosquittoBroker) -> None:
    rate, delay = 8e6, 0.05  # 1 MB/s: a 10 kB message spends 10 ms on the air per hop
    h = np.random.default_rng(0).standard_normal(2_500).astype(np.float32)
    async with AsyncExitStack() as stack:
        c0, c1, co = await sessions(stack, mosq, "client-0", "client-1", "coordinator")
        await c0.send("client-1", Kind.LATENT, {"h": h})
        assert await nothing_arrives(c1, 0.2)  # no emulator, no delivery: agents cannot write rx/
        emu = await stack.enter_async_context(
            emulator(mosq, channel(LinkOverrides(rate="fixed", rate_bps=rate, delay_s=delay)))
        )
        await c0.send("client-1", Kind.LATENT, {"h": h})  # client -> client: uplink, then downlink
        two_hops = await c1.receive(timeout=5)
        await c0.send("coordinator", Kind.LATENT, {"h": h})  # client -> wired coordinator: uplink only
        one_hop = await co.receive(timeout=5)
        now = emu.modeled_now()
    assert np.array_equal(two_hops.tensors["h"], h)
    for msg, hops in ((two_hops, 2), (one_hop, 1)):
        t_send, t_arrive = msg.header.t_model_send, msg.header.t_model_arrive
        assert t_send is not None and t_arrive is not None and 0 <= t_send < t_arrive <= now
        assert t_arrive - t_send == pytest.approx(hops * (delay + 8 * msg.wire_bytes / rate), abs=1e-9)


async def test_broadcast_reaches_every_other_agent_once(mosq: MosquittoBroker) -> None:
    async with AsyncExitStack() as stack:
        emu = await stack.enter_async_context(emulator(mosq, channel()))
        c0, *others = await sessions(stack, mosq, "client-0", "client-1", "client-2", "coordinator")
        await c0.send("all", Kind.METRICS, meta={"acc": 0.5})
        got = [await bus.receive(timeout=5) for bus in others]
        for bus in [c0, *others]:
            assert await nothing_arrives(bus, 0.1)
        stats = emu.stats()
    assert [(m.header.dst, m.header.meta["acc"], m.topic) for m in got] == [
        ("all", 0.5, T.rx(bus.agent_id, "client-0", Kind.METRICS)) for bus in others
    ]
    assert all(m.header.t_model_arrive is not None for m in got)
    assert {k: v["delivered"] for k, v in stats["links"].items()} == {
        "client-0->client-1": 1, "client-0->client-2": 1, "client-0->coordinator": 1,
    }  # fmt: skip
    assert stats["totals"]["frames_in"] == 1 and stats["totals"]["published"] == 3
    json.dumps(stats)  # JSON-ready


async def test_chunked_message_arrives_intact_after_its_chunks_queued_in_order(mosq: MosquittoBroker) -> None:
    rate, delay = 80e6, 0.002
    w = np.random.default_rng(1).standard_normal(50_000).astype(np.float32)  # 200 kB in 4 kB chunks
    async with AsyncExitStack() as stack:
        emu = await stack.enter_async_context(
            emulator(mosq, channel(LinkOverrides(rate="fixed", rate_bps=rate, delay_s=delay)))
        )
        (co,) = await sessions(stack, mosq, "coordinator")
        (c2,) = await sessions(stack, mosq, "client-2", chunk_size=4096)
        await c2.send("coordinator", Kind.UPDATE, {"w": w}, round=1)
        msg = await co.receive(timeout=10)
        stats = emu.stats()
    assert np.array_equal(msg.tensors["w"], w) and not co.stats.rejected
    chunks = link(stats, "client-2", "coordinator")["delivered"]
    assert chunks == -(-msg.wire_bytes // 4096) and chunks > 40
    assert link(stats, "client-2", "coordinator")["bytes"] == msg.wire_bytes
    # The chunks share one uplink, first in first out: the last leaves after all bits went through.
    assert msg.header.t_model_arrive is not None and msg.header.t_model_send is not None
    assert msg.header.t_model_arrive - msg.header.t_model_send >= delay + 8 * msg.wire_bytes / rate - 1e-9


async def test_a_given_epoch_anchors_modeled_time(mosq: MosquittoBroker) -> None:
    epoch = time.time() - 100.0  # 100 wall seconds ago: 10_000 modeled seconds at time_scale 0.01
    emu = ChannelEmulator(channel(), RUN, mosq.address_for("channel"), AGENTS, 0, epoch_unix=epoch)
    async with emu, session(mosq, "client-0") as c0, session(mosq, "coordinator") as co:
        await c0.send("coordinator", Kind.METRICS, meta={"n": 1})
        msg = await co.receive(timeout=5)
        stats = emu.stats()
    assert msg.header.t_model_send is not None and msg.header.t_model_send >= 100.0 / SCALE
    assert stats["epoch_unix"] == epoch and stats["modeled_now_s"] >= msg.header.t_model_send


# -- losses ----------------------------------------------------------------------------------------
async def test_lossy_link_drops_and_counts(mosq: MosquittoBroker) -> None:
    lossy = LinkOverrides(loss="bernoulli", loss_p=1.0, rto_s=0.01, max_retries=2)
    cfg = channel(lossy, reliable_kinds=("update",))  # metrics unreliable, updates resent
    async with AsyncExitStack() as stack:
        emu = await stack.enter_async_context(emulator(mosq, cfg))
        c0, co = await sessions(stack, mosq, "client-0", "coordinator")
        await c0.send("coordinator", Kind.METRICS, meta={"loss": 1.0})
        await c0.send("coordinator", Kind.UPDATE, {"w": np.zeros(1000, np.float32)})  # 3 packets
        await taken_off_the_air(emu, 2)
        assert await nothing_arrives(co, 0.2)
        stats = emu.stats()
    up = link(stats, "client-0", "coordinator")
    assert (up["delivered"], up["dropped"], up["latency_p50_s"]) == (0, {"loss": 2}, None)
    assert up["retransmissions"] == 3 * 2  # every packet of the update, resent twice
    assert stats["totals"]["published"] == (0 if RELAY == "bodies" else 2)  # headers: the two "lost" releases


async def test_a_lost_chunk_lets_the_receivers_reassembly_expire(mosq: MosquittoBroker) -> None:
    flaky = ClientOverrides(loss="bernoulli", loss_p=0.5)  # client-2's uplink only; latents unreliable
    cfg = channel(clients={"client-2": flaky}, reliable_kinds=("ctrl",))
    h = np.random.default_rng(2).standard_normal(10_000).astype(np.float32)  # 40 kB in 4 kB chunks
    async with AsyncExitStack() as stack:
        emu = await stack.enter_async_context(emulator(mosq, cfg, seed=1))
        (co,) = await sessions(stack, mosq, "coordinator", limits=ReassemblyLimits(expiry_s=0.2))
        c2, c0 = await sessions(stack, mosq, "client-2", "client-0", chunk_size=4096)
        await c2.send("coordinator", Kind.LATENT, {"h": h})
        size = len(encode(kind=Kind.LATENT, run=RUN, src="client-2", dst="coordinator", tensors={"h": h}).payload)
        await taken_off_the_air(emu, chunk_count(size, 4096))
        up = link(emu.stats(), "client-2", "coordinator")
        assert up["delivered"] > 0 and up["dropped"]["loss"] > 0  # some chunks made it, not all
        await asyncio.sleep(0.3)  # past the receiver's expiry
        await c0.send("coordinator", Kind.CTRL, meta={"cmd": "next"})
        assert (await co.receive(timeout=5)).header.meta["cmd"] == "next"
    assert co.stats.rejected == {"chunk_expired": 1}


async def test_offline_client_gets_nothing(mosq: MosquittoBroker) -> None:
    gone = ClientOverrides(mean_online_s=1e-9, mean_offline_s=1e9)  # offline from t = 1 ns on
    async with AsyncExitStack() as stack:
        emu = await stack.enter_async_context(emulator(mosq, channel(clients={"client-1": gone})))
        c0, c1, co = await sessions(stack, mosq, "client-0", "client-1", "coordinator")
        await c0.send("client-1", Kind.LATENT, {"h": np.ones((4, 64), np.float32)})
        await co.send("all", Kind.CTRL, meta={"cmd": "stage2"})
        await c1.send("coordinator", Kind.UPDATE, meta={"n": 1})
        assert (await c0.receive(timeout=5)).header.meta["cmd"] == "stage2"
        await taken_off_the_air(emu, 3)
        assert await nothing_arrives(c1, 0.2) and await nothing_arrives(co, 0.05)
        stats = emu.stats()
    for src, dst in (("client-0", "client-1"), ("coordinator", "client-1"), ("client-1", "coordinator")):
        assert link(stats, src, dst)["dropped"] == {"offline": 1}
    assert link(stats, "coordinator", "client-0")["delivered"] == 1


async def run_lossy_stream(mosq: MosquittoBroker, seed: int, n: int = 40) -> list[int]:
    """Which of n unreliable messages crossed a link that loses half of its packets."""
    cfg = channel(LinkOverrides(loss="bernoulli", loss_p=0.5), reliable_kinds=())
    async with AsyncExitStack() as stack:
        emu = await stack.enter_async_context(emulator(mosq, cfg, seed))
        c0, co = await sessions(stack, mosq, "client-0", "coordinator")
        for i in range(n):
            await c0.send("coordinator", Kind.METRICS, meta={"i": i})
        await taken_off_the_air(emu, n)
        delivered = link(emu.stats(), "client-0", "coordinator")["delivered"]
        got: list[Message] = [await co.receive(timeout=5) for _ in range(delivered)]
        assert await nothing_arrives(co, 0.1)
    return [int(m.header.meta["i"]) for m in got]  # type: ignore[arg-type]


async def test_same_seed_same_drop_pattern(mosq: MosquittoBroker) -> None:
    first, again, other = [await run_lossy_stream(mosq, seed) for seed in (7, 7, 8)]
    assert first == again and 5 < len(first) < 35
    assert other != first


# -- bad input -------------------------------------------------------------------------------------
async def test_garbage_on_the_air_is_counted_and_traffic_goes_on(mosq: MosquittoBroker) -> None:
    bad_chunk = pack_prefix(FRAME_CHUNK, "ab" * 16) + (5).to_bytes(4, "little") + (2).to_bytes(4, "little")
    bad_chunk += (100).to_bytes(8, "little") + b"x" * 50  # index 5 of 2
    tx = T.tx("client-0", "coordinator", Kind.LATENT)
    garbage = [
        (tx, b"hello"),  # bad magic
        (tx, b"NMOE\x01"),  # truncated prefix
        (tx, bad_chunk),
        (tx, b""),  # empty: truncated
        (f"{T.prefix}/tx/client-0/coordinator/bogus", b"NMOE"),  # unknown kind
        (f"{T.prefix}/tx/client-0/coordinator", b"NMOE"),  # too short
        (T.tx("client-0", "nobody", Kind.LATENT), pack_prefix(FRAME_MESSAGE, "cd" * 16)),  # not an agent of the run
    ]
    async with AsyncExitStack() as stack:
        emu = await stack.enter_async_context(emulator(mosq, channel()))
        (co,) = await sessions(stack, mosq, "coordinator")
        # client-0's login, before client-0's session: one account is one connection at a time
        # (mosquitto's use_username_as_clientid), so a second login would knock the session off
        async with raw_client(mosq.address_for("client-0"), "garbage") as raw:
            for topic, payload in garbage:
                await raw.publish(topic, payload, qos=1)
        (c0,) = await sessions(stack, mosq, "client-0")
        await c0.send("coordinator", Kind.LATENT, {"h": np.ones((2, 64), np.float32)})
        msg = await co.receive(timeout=5)
        stats = emu.stats()
    assert msg.src == "client-0" and not co.stats.rejected
    assert stats["rejected"] == {"bad_magic": 1, "truncated": 2, "bad_chunk": 1, "bad_topic": 2, "unknown_agent": 1}
    assert link(stats, "client-0", "coordinator")["delivered"] == 1


# -- as a process of its own -----------------------------------------------------------------------
def test_config_survives_a_json_round_trip() -> None:
    cfg = channel(LinkOverrides(delay_s=0.05, uplink=DirectionOverrides(rate="fixed", rate_bps=1e6)),
                  clients={"client-1": ClientOverrides(preset="lte", mean_online_s=math.inf)},
                  shared_uplink={"client-1": "cell-a"}, reliable_kinds=("model",), seed=4)  # fmt: skip
    assert config_from_dict(json.loads(json.dumps(asdict(cfg)))) == cfg
    with pytest.raises(ValueError, match="unexpected keyword"):
        config_from_dict({"presett": "wifi"})


async def test_command_line_emulator_relays_and_reports(mosq: MosquittoBroker, tmp_path: Path) -> None:
    addr = mosq.address_for("channel")
    env = os.environ | {PASSWORD_ENV: addr.password or ""}
    config = tmp_path / "channel.json"
    config.write_text(json.dumps(asdict(channel(LinkOverrides(delay_s=0.25)))))
    cmd = [sys.executable, "-m", "broker.channel.emulator", "--run-id", RUN, "--broker",
           f"mqtt://channel@{addr.host}:{addr.port}", "--agents", ",".join(AGENTS), "--config", str(config),
           "--time-scale", "0.5", "--seed", "3"]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.strip() == b"ready"
        async with session(mosq, "client-1") as c1, session(mosq, "coordinator") as co:
            await c1.send("coordinator", Kind.METRICS, meta={"loss": 0.1})
            msg = await co.receive(timeout=5)
        proc.send_signal(signal.SIGTERM)
        out = await asyncio.wait_for(proc.stdout.read(), 10)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stats = json.loads(out)
    assert link(stats, "client-1", "coordinator")["delivered"] == 1 and stats["time_scale"] == 0.5
    t_send, t_arrive = msg.header.t_model_send, msg.header.t_model_arrive
    assert msg.header.meta["loss"] == 0.1 and t_send is not None and t_arrive is not None
    assert t_arrive - t_send == pytest.approx(0.25)  # one hop of the config's


async def test_refused_credentials_raise_a_channel_error(mosq: MosquittoBroker) -> None:
    wrong = replace(mosq.address_for("channel"), password="not-the-password")
    with pytest.raises(ChannelError, match="refused the credentials"):
        async with ChannelEmulator(channel(), RUN, wrong, AGENTS, 0):
            pass


async def test_emulator_survives_a_broker_restart() -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    fast = RelayOptions(reconnect_initial_s=0.05, reconnect_max_s=0.3)
    with MosquittoBroker(RUN, make_accounts(AGENTS[1:]), channel_mode="emulated") as broker:
        emu = ChannelEmulator(channel(), RUN, broker.address_for("channel"), AGENTS, 0, options=fast)
        async with emu, session(broker, "client-0") as c0, session(broker, "coordinator") as co:
            broker.stop()
            await until(lambda: not (emu.connected or c0.connected or co.connected))
            broker.start()
            await until(lambda: emu.connected and c0.connected and co.connected)
            await c0.send("coordinator", Kind.METRICS, meta={"after": 1})
            assert (await co.receive(timeout=5)).header.meta["after"] == 1
            stats = emu.stats()
    assert stats["totals"]["reconnects"] >= 1 and link(stats, "client-0", "coordinator")["delivered"] == 1
