"""Bus sessions against real brokers: delivery, request/reply, status, bad input, failures."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import RUN, needs_mosquitto, raw_client

from agents.bus import BusConfig, BusSession, RequestTimeout
from broker.auth import BrokerAddress, make_accounts
from broker.server import MosquittoBroker, launch_broker
from broker.topics import Kind, Topics
from broker.wire import ReassemblyLimits, Schema, TensorSpec, encode, peek, read_chunk, restamp, split
from nmoe.errors import BusError

T = Topics(RUN)
ROOT = Path(__file__).resolve().parent.parent


def cfg(broker, agent: str, **kw) -> BusConfig:
    fast = dict(reconnect_initial_s=0.05, reconnect_max_s=0.3, connect_timeout_s=5.0)
    return BusConfig(RUN, agent, broker.address_for(agent), **(fast | kw))


async def nothing_arrives(bus: BusSession, wait_s: float = 0.3) -> bool:
    try:
        await bus.receive(timeout=wait_s)
    except asyncio.TimeoutError:
        return True
    return False


# -- delivery --------------------------------------------------------------------------------------
@pytest.mark.parametrize("nbytes", [1_000, 5_000_000])
async def test_tensors_round_trip(broker, nbytes: int) -> None:
    x = np.random.default_rng(nbytes).standard_normal(nbytes // 4).astype(np.float32)
    async with BusSession(cfg(broker, "client-0")) as c0, BusSession(cfg(broker, "client-1")) as c1:
        msg_id = await c0.send("client-1", Kind.LATENT, {"h": x}, round=2, stage="infer", meta={"k": 2})
        msg = await c1.receive(timeout=10)
    assert (msg.id, msg.src, msg.kind, msg.header.round, msg.header.meta["k"]) == (
        msg_id, "client-0", Kind.LATENT, 2, 2,
    )  # fmt: skip
    assert np.array_equal(msg.tensors["h"], x)
    assert c0.stats.sent_bytes["latent"] == msg.wire_bytes == c1.stats.received_bytes["latent"]
    assert c0.stats.sent_messages["latent"] == c1.stats.received_messages["latent"] == 1


@needs_mosquitto
async def test_twenty_megabytes_with_small_chunks(mosquitto: MosquittoBroker) -> None:
    x = np.random.default_rng(7).standard_normal((5_000, 1_000)).astype(np.float32)  # 20 MB
    limits = ReassemblyLimits(max_message_bytes=32 * 1024 * 1024)
    async with (
        BusSession(cfg(mosquitto, "coordinator", chunk_size=64 * 1024)) as co,
        BusSession(cfg(mosquitto, "client-2", limits=limits)) as c2,
    ):
        await co.send("client-2", Kind.MODEL, {"w": x})
        msg = await c2.receive(timeout=30)
    assert np.array_equal(msg.tensors["w"], x)
    assert co.stats.sent_bytes["model"] > x.nbytes and not c2.stats.rejected


async def test_broadcast_reaches_everyone_but_the_sender(broker) -> None:
    async with (
        BusSession(cfg(broker, "coordinator")) as co,
        BusSession(cfg(broker, "client-0")) as c0,
        BusSession(cfg(broker, "client-1")) as c1,
    ):
        await co.send("all", Kind.CTRL, meta={"cmd": "stage1", "round": 0})
        for bus in (c0, c1):
            msg = await bus.receive(timeout=5)
            assert (msg.header.dst, msg.header.meta["cmd"]) == ("all", "stage1")
        assert await nothing_arrives(co)
    with pytest.raises(BusError):
        await co.send("client-0", Kind.CTRL)  # closed


async def test_status_online_then_offline(broker) -> None:
    async with BusSession(cfg(broker, "coordinator"), watch_status=True) as co:
        async with BusSession(cfg(broker, "client-0")):
            status = await co.wait_online(["coordinator", "client-0"], timeout=5)
            assert status["client-0"] == "online"
        await co.wait_status(lambda s: s.get("client-0") == "offline", timeout=5)
        assert "client-0" not in co.online()


# -- request / reply -------------------------------------------------------------------------------
async def serve(bus: BusSession, delay_s: float = 0.0) -> None:
    async for req in bus.messages():
        if delay_s:
            await asyncio.sleep(delay_s)
        await bus.reply(req, Kind.LOGITS, {"y": req.tensors["h"] * 2})


async def test_concurrent_requests_get_their_own_replies(broker) -> None:
    async with BusSession(cfg(broker, "client-0")) as c0, BusSession(cfg(broker, "client-1")) as c1:
        server = asyncio.create_task(serve(c1))
        replies = await asyncio.gather(*(
            c0.request("client-1", Kind.LATENT, {"h": np.full((2, 4), i, np.float32)}, deadline_s=10, round=i)
            for i in range(30)
        ))  # fmt: skip
        server.cancel()
    assert [float(r.tensors["y"][0, 0]) for r in replies] == [2.0 * i for i in range(30)]
    assert [r.header.round for r in replies] == list(range(30))
    assert all(r.header.reply_to for r in replies) and c0.stats.received_messages["logits"] == 30


@needs_mosquitto
async def test_request_deadline_and_late_reply(mosquitto: MosquittoBroker) -> None:
    async with BusSession(cfg(mosquitto, "client-0")) as c0, BusSession(cfg(mosquitto, "client-1")) as c1:
        server = asyncio.create_task(serve(c1, delay_s=0.5))
        with pytest.raises(RequestTimeout) as err:
            await c0.request("client-1", Kind.LATENT, {"h": np.ones((1, 4), np.float32)}, deadline_s=0.2)
        assert isinstance(err.value, asyncio.TimeoutError) and isinstance(err.value, BusError)
        for _ in range(50):
            if c0.stats.late_replies:
                break
            await asyncio.sleep(0.05)
        server.cancel()
        assert c0.stats.late_replies == 1 and await nothing_arrives(c0, 0.1)


# -- bad input -------------------------------------------------------------------------------------
def frame(tensors, src="client-0", dst="client-1", kind=Kind.LATENT, **kw) -> bytes:
    return encode(kind=kind, run=RUN, src=src, dst=dst, tensors=tensors, finite=False, **kw).payload


@needs_mosquitto
async def test_bad_messages_are_counted_and_receiving_goes_on(mosquitto: MosquittoBroker) -> None:
    schema = {Kind.LATENT: Schema({"h": TensorSpec("float32", (None, 64))})}
    limits = ReassemblyLimits(max_message_bytes=2_000_000, max_pending_per_source=4)
    topic = T.rx("client-1", "client-0", Kind.LATENT)
    good = frame({"h": np.ones((3, 64), np.float32)})
    big = frame({"h": np.zeros((10_000, 64), np.float32)})  # 2.5 MB
    flipped = bytearray(good)
    flipped[-1] ^= 1
    storm = [split(frame({"h": np.full((5_000, 64), i, np.float32)}), f"{i:032x}", 256 * 1024)[0]
             for i in range(10)]  # fmt: skip
    injected = {
        "bad_magic": [b"\x00 not a frame"],
        "truncated": [good[:-10]],
        "bad_version": [good[:4] + b"\x09" + good[5:]],
        "bad_shape": [frame({"h": np.ones((3, 32), np.float32)})],
        "non_finite": [frame({"h": np.full((3, 64), np.nan, np.float32)})],
        "oversized": split(big, peek(big).msg_id, 256 * 1024),
        "chunk_overflow": storm,  # 10 incomplete messages, 4 may be pending
        "topic_mismatch": [frame({"h": np.ones((3, 64), np.float32)}, src="client-2")],  # spoofed src
        "hash_mismatch": [bytes(flipped)],
    }
    async with (
        BusSession(cfg(mosquitto, "client-1", limits=limits), schemas=schema) as c1,
        raw_client(mosquitto.address_for("client-0")) as injector,
    ):
        for frames in injected.values():
            for f in frames:
                await injector.publish(topic, f, qos=1)
        await injector.publish(topic, good, qos=1)
        msg = await c1.receive(timeout=10)
        assert msg.id == peek(good).msg_id and np.array_equal(msg.tensors["h"], np.ones((3, 64), np.float32))
        assert await nothing_arrives(c1, 0.1)
    expected = {reason: 1 for reason in injected} | {"chunk_overflow": 6}
    assert dict(c1.stats.rejected) == expected


@needs_mosquitto
async def test_a_chunk_flood_does_not_crowd_out_an_honest_sender(mosquitto: MosquittoBroker) -> None:
    """client-0 floods client-1 with 20 MB of never-completed chunks (more than client-1's whole
    reassembly budget) while client-2 sends it a 2.6 MB chunked message: that one arrives."""
    limits = ReassemblyLimits(max_message_bytes=4_000_000, max_pending_bytes_per_source=4_000_000,
                              max_pending_bytes=8_000_000)  # fmt: skip
    flood = [split(frame({"h": np.full((2_500, 64), i, np.float32)}), f"{i:032x}", 256 * 1024)[:2]
             for i in range(40)]  # 40 messages of 3 chunks, 2 sent: 20 MB  # fmt: skip
    x = np.random.default_rng(2).standard_normal((10_000, 64)).astype(np.float32)
    async with (
        BusSession(cfg(mosquitto, "client-1", limits=limits)) as c1,
        BusSession(cfg(mosquitto, "client-2")) as c2,
        raw_client(mosquitto.address_for("client-0")) as flooder,
    ):
        async def flood_all() -> None:
            for frames in flood:
                for f in frames:
                    await flooder.publish(T.rx("client-1", "client-0", Kind.LATENT), f, qos=1)

        flooding = asyncio.create_task(flood_all())
        await asyncio.sleep(0.05)
        await c2.send("client-1", Kind.LATENT, {"h": x})
        await flooding
        msg = await c1.receive(timeout=20)
        assert msg.src == "client-2" and np.array_equal(msg.tensors["h"], x)
        await asyncio.sleep(0.3)  # the rest of the flood
        held = c1._decoder.reassembler.pending_from("client-0")
    assert held[1] <= 4_000_000 and c1.stats.rejected["chunk_overflow"] == 40 - held[0] >= 30


@needs_mosquitto
async def test_qos1_duplicates_are_dropped(mosquitto: MosquittoBroker) -> None:
    good = frame({"h": np.ones((1, 2), np.float32)})
    async with (
        BusSession(cfg(mosquitto, "client-1")) as c1,
        raw_client(mosquitto.address_for("client-0")) as injector,
    ):
        for _ in range(3):
            await injector.publish(T.rx("client-1", "client-0", Kind.LATENT), good, qos=1)
        await c1.receive(timeout=5)
        assert await nothing_arrives(c1, 0.3)
    assert c1.stats.duplicates == 2


@needs_mosquitto
async def test_wrong_password_fails_fast_without_leaking_it(mosquitto: MosquittoBroker) -> None:
    real = mosquitto.address_for("client-0")
    bad = BrokerAddress(real.host, real.port, "client-0", "not-the-password-123")
    with pytest.raises(BusError) as err:
        async with BusSession(BusConfig(RUN, "client-0", bad)):
            pass
    assert "not-the-password-123" not in str(err.value) and "refused" in str(err.value)


@needs_mosquitto
async def test_compression_saves_bytes(mosquitto: MosquittoBroker) -> None:
    x = np.random.default_rng(3).standard_normal(262_144).astype(np.float32)
    async with (
        BusSession(cfg(mosquitto, "client-0", compression="fp16")) as c0,
        BusSession(cfg(mosquitto, "client-1")) as c1,
    ):
        await c0.send("client-1", Kind.UPDATE, {"w": x})
        await c0.send("client-1", Kind.UPDATE, {"w": x}, compression="int8")
        half, quarter = await c1.receive(timeout=5), await c1.receive(timeout=5)
    assert c0.stats.compression_saved_bytes == x.nbytes // 2 + x.nbytes * 3 // 4
    assert half.tensors["w"].dtype == np.float32 and np.abs(half.tensors["w"] - x).max() < 4e-3
    assert np.abs(quarter.tensors["w"] - x).max() <= np.abs(x).max() / 127 + 1e-6


# -- emulated channel ------------------------------------------------------------------------------
async def relay(channel, agents: list[str]) -> None:
    """A stand-in channel emulator: stamps every frame and republishes it on the rx side (subscribe
    to tx/# first: what the broker takes before that reaches no one)."""
    async for message in channel.messages:
        parsed = T.parse(message.topic.value)
        payload = restamp(message.payload, t_model_send=100.0, t_model_arrive=100.25)
        targets = [a for a in agents if a != parsed.src] if parsed.is_broadcast else [parsed.dst]
        for dst in targets:
            await channel.publish(T.relay(parsed, dst), payload, qos=1)


@needs_mosquitto
async def test_emulated_mode_goes_through_the_channel() -> None:
    accounts = make_accounts(["client-0", "client-1"])
    x = np.random.default_rng(5).standard_normal(200_000).astype(np.float32)
    async with (
        launch_broker(RUN, accounts, channel_mode="emulated", prefer="mosquitto") as running,
        raw_client(running.address_for("channel")) as channel,
        # the stand-in relays whole bodies (relay: bodies); held bodies are tests/test_held.py's
        BusSession(cfg(running, "client-0", channel_mode="emulated", relay="bodies", chunk_size=64 * 1024)) as c0,
        BusSession(cfg(running, "client-1", channel_mode="emulated")) as c1,
    ):
        await channel.subscribe(T.tx_filter(), qos=1)
        relayer = asyncio.create_task(relay(channel, ["client-0", "client-1", "coordinator"]))
        await c0.send("client-1", Kind.LATENT, {"h": x})
        await c0.send("all", Kind.METRICS, meta={"acc": 0.5})
        direct, broadcast = await c1.receive(timeout=5), await c1.receive(timeout=5)
        relayer.cancel()
        assert await nothing_arrives(c0, 0.2)  # its own broadcast is not echoed
    assert np.array_equal(direct.tensors["h"], x) and direct.wire_bytes > 4 * 64 * 1024
    assert (direct.header.t_model_send, direct.header.t_model_arrive) == (100.0, 100.25)
    assert broadcast.header.meta["acc"] == 0.5 and broadcast.header.dst == "all"


def test_restamp_works_on_chunks_from_a_session_helper() -> None:
    payload = frame({"h": np.ones((3000, 64), np.float32)})
    chunk = split(payload, peek(payload).msg_id, 64 * 1024)[1]
    assert read_chunk(restamp(chunk, t_model_arrive=5.0)).t_model_arrive == 5.0


# -- failures --------------------------------------------------------------------------------------
CHILD = """
import asyncio, json, sys
from agents.bus import BusConfig, BusSession
from broker.auth import BrokerAddress
a = json.loads(sys.stdin.readline())
async def main():
    addr = BrokerAddress(a["host"], a["port"], a["user"], a["password"])
    async with BusSession(BusConfig(a["run"], a["user"], addr)):
        print("ready", flush=True)
        await asyncio.sleep(60)
asyncio.run(main())
"""


@needs_mosquitto
async def test_killed_agent_goes_offline_through_its_will(mosquitto: MosquittoBroker) -> None:
    addr = mosquitto.address_for("client-2")
    creds = {"host": addr.host, "port": addr.port, "user": "client-2", "password": addr.password, "run": RUN}
    async with BusSession(cfg(mosquitto, "coordinator"), watch_status=True) as co:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        try:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write(json.dumps(creds) + "\n")
            child.stdin.flush()
            line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), 20)
            assert line.strip() == "ready"
            await co.wait_online(["client-2"], timeout=5)
            os.kill(child.pid, signal.SIGKILL)
            await co.wait_status(lambda s: s.get("client-2") == "offline", timeout=10)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(5)
    assert child.returncode == -signal.SIGKILL


@needs_mosquitto
async def test_session_survives_a_broker_restart(mosquitto: MosquittoBroker) -> None:
    async with BusSession(cfg(mosquitto, "client-0")) as c0, BusSession(cfg(mosquitto, "client-1")) as c1:
        await c0.send("client-1", Kind.LATENT, {"h": np.zeros((1, 2), np.float32)})
        await c1.receive(timeout=5)
        mosquitto.stop()
        for _ in range(100):
            if not (c0.connected or c1.connected):
                break
            await asyncio.sleep(0.02)
        assert not c0.connected and not c1.connected
        during = asyncio.create_task(c0.send("client-1", Kind.LATENT, {"h": np.ones((1, 2), np.float32)}))
        await asyncio.sleep(0.3)
        assert not during.done()  # waits for the broker
        mosquitto.start()
        await asyncio.wait_for(during, 10)  # sent once reconnected
        for _ in range(200):
            if c0.connected and c1.connected:
                break
            await asyncio.sleep(0.02)
        await c0.send("client-1", Kind.LATENT, {"h": np.full((1, 2), 7, np.float32)})
        received = [await c1.receive(timeout=5)]
        if received[0].tensors["h"][0, 0] != 7:  # the one sent during the outage made it too
            received.append(await c1.receive(timeout=5))
    assert received[-1].tensors["h"][0, 0] == 7
    assert c0.stats.reconnects >= 1 and c1.stats.reconnects >= 1
