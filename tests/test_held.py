"""Held bodies (``channel.relay: headers``): the hold buffer's matching, bounds and rejections, pure;
then on a real mosquitto, that only the channel account can release a body (the ACL), and that a
held body with the real emulator arrives exactly as the full relay delivers it."""

from __future__ import annotations

import asyncio
import math
import os
import random
import signal
from contextlib import AsyncExitStack

import numpy as np
import pytest
from conftest import RUN, needs_mosquitto, raw_client

from agents.bus import BusConfig, BusSession, PublishTimeout
from broker.auth import acl_rules, make_accounts
from broker.channel import ChannelConfig, LinkOverrides
from broker.channel.emulator import ChannelEmulator
from broker.envelope import STAMPS, STAMPS_OFFSET, unpack_prefix
from broker.held import (
    MAX_AGE_S,
    MAX_ENTRIES,
    Announce,
    HoldBuffer,
    HoldLimits,
    Release,
    announce_frames,
    pack_announces,
    pack_releases,
    read_announce,
    read_releases,
)
from broker.server import MosquittoBroker
from broker.topics import Kind, ParsedTopic, Topics
from broker.wire import REASONS, chunk_count, encode, split
from nmoe.errors import WireError

T = Topics(RUN)
ME, SRC, OTHER = "client-1", "client-0", "client-2"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def message(n: int = 300, src: str = SRC, dst: str = ME, seed: int = 0):  # -> Encoded
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    return encode(kind=Kind.LATENT, run=RUN, src=src, dst=dst, tensors={"h": x})


def buffer(clock: Clock | None = None, **limits: float) -> tuple[HoldBuffer, list[str]]:
    rejected: list[str] = []
    hold = HoldBuffer(T, HoldLimits(**limits), on_reject=lambda err, _t: rejected.append(err.reason),  # type: ignore[arg-type]
                      clock=clock or Clock())  # fmt: skip
    return hold, rejected


def held_topic(src: str = SRC, dst: str = ME) -> tuple[ParsedTopic, str]:
    topic = T.held(dst, src, Kind.LATENT)
    return T.parse(topic), topic


def rx_topic(src: str = SRC) -> tuple[ParsedTopic, str]:
    topic = T.rx(ME, src, Kind.LATENT)
    return T.parse(topic), topic


def release_for(frame: bytes, blake3: str, t: float = 1.0, *, lost: bool = False, size: int | None = None) -> bytes:
    ((index, n),) = announce_frames([frame])
    msg_id = unpack_prefix(frame)[1]
    return pack_releases([Release(msg_id, blake3, Kind.LATENT, index, size or n, t, t + 0.5, lost)])


def released(m, size: int | None = None) -> Release:  # m: an Encoded whole message
    """The release of an unchunked message's one frame, delivered at modeled 1.0 -> 2.0."""
    return Release(m.header.id, m.header.blake3, Kind.LATENT, 0, len(m.payload) if size is None else size, 1.0, 2.0)


def give_body(hold: HoldBuffer, frame: bytes, src: str = SRC) -> list:
    return hold.body(*held_topic(src), frame)


def give_release(hold: HoldBuffer, payload: bytes, src: str = SRC) -> list:
    return hold.release(*rx_topic(src), payload)


# -- frames ------------------------------------------------------------------------------------------
def test_announce_and_release_frames_round_trip_and_refuse_anything_else() -> None:
    enc = message()
    entries = [Announce(enc.header.id, enc.header.blake3, "client-1", Kind.LATENT, 0, 100, 0.25),
               Announce(enc.header.id, enc.header.blake3, "all", Kind.MODEL, 3, 70_000)]  # fmt: skip
    (raw,) = pack_announces(entries)
    assert read_announce(raw) == entries
    assert len(pack_announces(entries[:1] * (MAX_ENTRIES + 1))) == 2
    (late,) = pack_announces([Announce(enc.header.id, enc.header.blake3, "all", Kind.CTRL, 0, 100, 1e9)])
    assert read_announce(late)[0].age_s == MAX_AGE_S  # a sender cannot push a frame far into the past
    rel = [Release(enc.header.id, enc.header.blake3, Kind.LATENT, 2, 999, 1.5, 2.25),
           Release(enc.header.id, enc.header.blake3, Kind.LOGITS, 3, 5, math.nan, math.nan, True)]  # fmt: skip
    back = read_releases(pack_releases(rel))
    assert back[0] == rel[0] and back[1].lost and back[1].kind is Kind.LOGITS and math.isnan(back[1].t_arrive)
    bad_dst = raw.replace(b"client-1", b"Client-1")
    for bad in (raw[:-1], raw + b"\0", raw[:40], enc.payload, b"NMOE", b"", bad_dst):
        with pytest.raises(WireError) as err:
            read_announce(bad)
        assert err.value.reason == "bad_announce"
    good = pack_releases(rel)
    for bad in (good[:-1], good + b"\0", raw, enc.payload):
        with pytest.raises(WireError) as err:
            read_releases(bad)
        assert err.value.reason == "bad_release"
    unstamped = pack_releases([Release(enc.header.id, enc.header.blake3, Kind.LATENT, 0, 5, math.inf, 1.0)])
    with pytest.raises(WireError):
        read_releases(unstamped)  # a delivered frame needs finite stamps


# -- matching ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("body_first", [True, False])
def test_a_body_is_delivered_stamped_once_its_release_arrives_in_either_order(body_first: bool) -> None:
    hold, rejected = buffer()
    enc = message()
    rel = release_for(enc.payload, enc.header.blake3, t=7.0)
    first = give_body(hold, enc.payload) if body_first else give_release(hold, rel)
    assert first == []  # nothing reaches the application on one half
    (ready,) = give_release(hold, rel) if body_first else give_body(hold, enc.payload)
    assert ready.topic == T.rx(ME, SRC, Kind.LATENT) and ready.parsed.direction == "rx"
    stamped = ready.stamped()
    assert ready.stamps == (7.0, 7.5) and STAMPS.unpack_from(stamped, STAMPS_OFFSET) == (7.0, 7.5)
    assert stamped[:STAMPS_OFFSET] == enc.payload[:STAMPS_OFFSET]
    assert stamped[STAMPS_OFFSET + STAMPS.size :] == enc.payload[STAMPS_OFFSET + STAMPS.size :]
    assert hold.verify(SRC, enc.header.id, enc.header.blake3) and rejected == [] and hold.held == 0


def test_a_body_without_a_release_never_comes_out_and_expires() -> None:
    clock = Clock()
    hold, rejected = buffer(clock, timeout_s=5.0)
    assert give_body(hold, message().payload) == []
    clock.now = 4.9
    assert hold.expire() == [] and hold.held == 1
    clock.now = 5.1
    assert hold.expire() == [] and hold.held == 0
    assert rejected == ["hold_expired"]


def test_input_expires_what_waited_too_long_checking_at_most_every_sixteenth_of_the_timeout() -> None:
    clock = Clock()
    hold, rejected = buffer(clock, timeout_s=8.0)  # input checks at most every 0.5 s
    a, b, c = message(seed=1), message(seed=2), message(seed=3)
    give_body(hold, a.payload)
    clock.now = 7.9
    give_body(hold, b.payload)  # checked here: nothing is 8 s old yet
    clock.now = 8.2
    give_body(hold, c.payload)  # a is past its timeout, but the last check was 0.3 s ago
    assert hold.held == 3 and rejected == []
    clock.now = 8.4
    give_release(hold, pack_releases([released(c)]))  # 0.5 s since the last check: a expires
    assert hold.held == 1 and rejected == ["hold_expired"]
    clock.now = 8.5
    assert hold.expire() == [] and rejected == ["hold_expired"]  # expire() itself always checks
    clock.now = 16.0
    assert hold.expire() == [] and hold.held == 0 and rejected == ["hold_expired"] * 2


def test_a_lost_release_drops_the_body_whichever_came_first() -> None:
    hold, rejected = buffer()
    a, b = message(seed=1), message(seed=2)
    give_body(hold, a.payload)
    assert give_release(hold, release_for(a.payload, a.header.blake3, lost=True)) == []
    assert give_release(hold, release_for(b.payload, b.header.blake3, lost=True)) == []
    assert give_body(hold, b.payload) == []  # its release overtook it: dropped quietly
    assert (hold.lost, hold.held, rejected) == (2, 0, [])


def test_size_or_digest_that_differ_from_the_release_are_rejected() -> None:
    hold, rejected = buffer()
    enc = message()
    give_body(hold, enc.payload)
    assert give_release(hold, release_for(enc.payload, enc.header.blake3, size=len(enc.payload) + 1)) == []
    assert rejected == ["release_mismatch"]
    # chunks of one message must all carry the message's blake3; a message must match it when decoded
    hold, rejected = buffer()
    enc = message(n=3000)
    c0, c1 = split(enc.payload, enc.header.id, 4096)[:2]
    give_body(hold, c0), give_body(hold, c1)
    assert len(give_release(hold, release_for(c0, enc.header.blake3))) == 1
    assert give_release(hold, release_for(c1, "ab" * 32)) == []
    assert rejected == ["release_mismatch"]
    assert not hold.verify(SRC, enc.header.id, "cd" * 32)
    assert hold.verify(SRC, "0" * 32, "cd" * 32)  # nothing was held for it (the full relay's messages)


def test_releases_free_frames_in_release_order_per_sender() -> None:
    hold, _ = buffer()
    a, b, c = message(seed=1), message(seed=2), message(src=OTHER, seed=3)
    rel = pack_releases([released(m) for m in (a, b)])
    assert give_release(hold, rel) == []
    assert give_body(hold, b.payload) == []  # a's body is not here yet: b waits behind it (FIFO)
    give_body(hold, c.payload, src=OTHER)
    assert len(give_release(hold, release_for(c.payload, c.header.blake3), src=OTHER)) == 1  # other link: free
    out = give_body(hold, a.payload)
    assert [unpack_prefix(r.frame)[1] for r in out] == [a.header.id, b.header.id]


def test_a_release_whose_body_never_comes_stops_blocking_its_link_at_the_timeout() -> None:
    clock = Clock()
    hold, rejected = buffer(clock, timeout_s=5.0)
    a, b = message(seed=1), message(seed=2)
    rel = pack_releases([released(m) for m in (a, b)])
    give_release(hold, rel)
    clock.now = 1.0
    assert give_body(hold, b.payload) == []
    clock.now = 5.5  # the release is 5.5 s old, the body that waits behind it 4.5 s
    (ready,) = hold.expire()
    assert unpack_prefix(ready.frame)[1] == b.header.id and rejected == ["release_unmatched"]


def test_a_release_whose_body_the_broker_lost_gives_way_to_later_frames_after_its_grace() -> None:
    clock = Clock()
    hold, rejected = buffer(clock, body_grace_s=2.0, timeout_s=100.0)
    a, b, c = message(seed=1), message(seed=2), message(seed=3)
    give_release(hold, pack_releases([released(m) for m in (a, b, c)]))
    clock.now = 50.0  # a waited long past its grace, but nothing behind it is here either: it may still come
    assert hold.expire() == [] and rejected == []
    clock.now = 51.0
    (ready,) = give_body(hold, b.payload)  # b's body came, so a's was lost in the broker
    assert unpack_prefix(ready.frame)[1] == b.header.id and rejected == ["release_unmatched"]
    assert give_body(hold, a.payload) == [] and rejected == ["release_unmatched"]  # late after all: dropped
    assert give_body(hold, c.payload) != []  # the link goes on in order
    # within the grace, a ready frame waits behind a missing body, and expire() lets it go at the grace
    hold, rejected = buffer(clock, body_grace_s=2.0, timeout_s=100.0)
    give_release(hold, pack_releases([released(m) for m in (a, b)]))
    assert give_body(hold, b.payload) == []
    clock.now = 52.9
    assert hold.expire() == [] and rejected == []
    clock.now = 53.1
    (ready,) = hold.expire()
    assert unpack_prefix(ready.frame)[1] == b.header.id and rejected == ["release_unmatched"]


def test_duplicates_of_bodies_and_releases_are_counted_and_dropped() -> None:
    hold, rejected = buffer()
    enc = message()
    rel = release_for(enc.payload, enc.header.blake3)
    give_body(hold, enc.payload)
    give_body(hold, enc.payload)
    assert len(give_release(hold, rel)) == 1
    assert give_release(hold, rel) == [] and give_body(hold, enc.payload) == []
    assert rejected == ["hold_duplicate", "release_duplicate", "hold_duplicate"]


def test_the_hold_buffer_is_bounded_per_sender_and_a_flood_costs_only_the_flooder() -> None:
    hold, rejected = buffer(max_bodies_per_source=3, max_bytes_per_source=64 * 1024, max_releases_per_source=2)
    mine = message(src=OTHER, seed=9)
    give_body(hold, mine.payload, src=OTHER)
    flood = [message(seed=s) for s in range(5)]
    for m in flood:
        give_body(hold, m.payload)
    assert rejected == ["hold_overflow", "hold_overflow"] and hold.held == 4  # SRC keeps its newest 3
    assert len(give_release(hold, release_for(mine.payload, mine.header.blake3), src=OTHER)) == 1
    rejected.clear()
    give_body(hold, message(n=20_000).payload)  # 80 kB: alone over SRC's byte budget
    assert rejected == ["oversized"]
    rejected.clear()
    never = [released(message(seed=s), size=10) for s in range(10, 14)]
    give_release(hold, pack_releases(never))
    assert rejected == ["release_overflow", "release_overflow"]


def test_garbage_never_raises_and_every_reason_is_a_known_one() -> None:
    hold, rejected = buffer()
    rng = random.Random(0)
    enc = message()
    rel = release_for(enc.payload, enc.header.blake3)
    samples = [b"", b"NMOE", enc.payload[:50], rel[:-3], rel + b"x"]
    for _ in range(300):
        base = bytearray(rng.choice([enc.payload, rel]))
        for _ in range(rng.randint(1, 6)):
            base[rng.randrange(len(base))] = rng.randrange(256)
        samples.append(bytes(base[: rng.randint(0, len(base))]))
    for payload in samples:
        give_body(hold, payload)
        give_release(hold, payload)
    assert rejected and set(rejected) <= set(REASONS)


# -- on a real mosquitto -----------------------------------------------------------------------------
def test_the_acl_lets_agents_write_held_bodies_under_their_own_name_only() -> None:
    c0, channel = make_accounts(["client-0"], coordinator=None)
    for mode in ("direct", "emulated"):
        rules = acl_rules(c0, T, mode)  # type: ignore[arg-type]
        assert rules.may_write(T.held("client-1", "client-0", Kind.UPDATE))
        assert not rules.may_write(T.held("client-1", "client-2", Kind.UPDATE))  # spoofed sender
        assert rules.may_subscribe(T.held_filters("client-0")[0]) and rules.may_subscribe(T.held_filters("client-0")[1])
        assert not rules.may_subscribe(T.held_filters("client-1")[0])
    assert not acl_rules(c0, T, "emulated").may_write(T.rx("client-1", "client-0", Kind.UPDATE))  # no releases
    assert acl_rules(channel, T, "emulated").may_write(T.rx("client-1", "client-0", Kind.UPDATE))


def _session(mosq: MosquittoBroker, agent: str, **kw: object) -> BusSession:
    """A session of an emulated channel that holds every body it sends (unless ``held_min_bytes`` says)."""
    opts: dict[str, object] = {"channel_mode": "emulated", "held_min_bytes": 0} | kw
    return BusSession(BusConfig(RUN, agent, mosq.address_for(agent), **opts))  # type: ignore[arg-type]


@needs_mosquitto
async def test_only_the_channel_account_can_release_a_held_body() -> None:
    with MosquittoBroker(RUN, make_accounts(["client-0", "client-1", "client-2"]), channel_mode="emulated") as mosq:
        async with AsyncExitStack() as stack:
            rx = await stack.enter_async_context(_session(mosq, "client-1"))
            tx = await stack.enter_async_context(_session(mosq, "client-0", relay="headers"))
            forger = await stack.enter_async_context(raw_client(mosq.address_for("client-2"), "forger"))
            channel = await stack.enter_async_context(raw_client(mosq.address_for("channel"), "chan"))
            x = np.arange(64, dtype=np.float32)
            msg_id = await tx.send("client-1", Kind.LATENT, {"h": x})  # no emulator: it is held
            release = pack_releases([Release(msg_id, "00" * 32, Kind.LATENT, 0, 0, 1.0, 2.0)])
            # another agent forges the release: the broker drops it (ACL), nothing is delivered
            await forger.publish(T.rx("client-1", "client-0", Kind.LATENT), release, qos=1)
            await forger.publish(T.rx("client-1", "client-2", Kind.LATENT), release, qos=1)
            with pytest.raises(asyncio.TimeoutError):
                await rx.receive(timeout=0.5)
            assert rx.stats.rejected == {}  # it never even reached the receiver
            # the same release from the channel account frees it (its size and blake3 must be right)
            ((src, kind, held_id, index, size),) = rx.held_frames()
            assert (src, kind, held_id, index) == ("client-0", "latent", msg_id, 0)
            sha = encode(kind=Kind.LATENT, run=RUN, src="client-0", dst="client-1", tensors={"h": x}).header.blake3
            await channel.publish(T.rx("client-1", "client-0", Kind.LATENT),
                                  pack_releases([Release(msg_id, sha, Kind.LATENT, 0, size, 1.0, 2.0)]),
                                  qos=1)  # fmt: skip
            got = await rx.receive(timeout=5)
    assert np.array_equal(got.tensors["h"], x) and (got.header.t_model_send, got.header.t_model_arrive) == (1.0, 2.0)


@needs_mosquitto
async def test_a_held_request_and_its_reply_cross_the_real_emulator_with_the_channels_stamps() -> None:
    agents = ["client-0", "client-1"]
    cfg = ChannelConfig(preset="ideal", time_scale=0.01, link=LinkOverrides(delay_s=0.5))
    with MosquittoBroker(RUN, make_accounts(agents), channel_mode="emulated") as mosq:
        async with AsyncExitStack() as stack:
            emu = await stack.enter_async_context(
                ChannelEmulator(cfg, RUN, mosq.address_for("channel"), agents, seed=0, wired=()))
            a = await stack.enter_async_context(_session(mosq, "client-0", chunk_size=4096))
            b = await stack.enter_async_context(_session(mosq, "client-1", chunk_size=4096))
            h = np.random.default_rng(1).standard_normal((40, 64)).astype(np.float32)  # 10 kB: 3 chunks

            async def serve() -> None:
                req = await b.receive(timeout=10)
                await b.reply(req, Kind.LOGITS, {"logp": req.tensors["h"][:, :10] * 2})

            server = asyncio.create_task(serve())
            reply = await a.request("client-1", Kind.LATENT, {"h": h}, deadline_s=10)
            await server
            stats = emu.stats()
    assert np.array_equal(reply.tensors["logp"], h[:, :10] * 2)
    assert reply.header.transit_s == pytest.approx(2 * 0.5, abs=1e-6)  # uplink + downlink delay, modeled
    assert stats["totals"]["announced"] == stats["totals"]["frames_in"] >= 4
    assert stats["totals"]["releases"] == stats["totals"]["delivered"] and stats["rejected"] == {}
    assert a.stats.rejected == {} and b.stats.rejected == {}


async def test_a_backdated_header_goes_on_the_air_when_its_frame_left_never_before_the_models_clock() -> None:
    from broker.channel.clock import RealtimeDriver
    from broker.channel.model import ChannelModel, Delivery

    cfg = ChannelConfig(preset="ideal", time_scale=0.1, link=LinkOverrides(delay_s=0.5))  # 1 s modeled = 0.1 s
    results: list[object] = []
    model = ChannelModel(cfg, ["client-0", "client-1"], 0, wired=(), on_result=results.append)
    driver = RealtimeDriver(model)
    driver.start()
    try:
        await asyncio.sleep(0.05)
        now = driver.modeled_now()
        driver.submit("client-0", "client-1", 100, key="late", at=now - 0.3)  # waited 0.3 modeled s to be announced
        driver.submit("client-0", "client-1", 100, key="early", at=-5.0)  # before what the model has seen: clamped
        await asyncio.sleep(0.25)
    finally:
        driver.close()
    late, early = results
    assert isinstance(late, Delivery) and isinstance(early, Delivery)
    assert late.t_send == pytest.approx(now - 0.3, abs=1e-9) and late.latency == pytest.approx(1.0)
    assert early.t_send == pytest.approx(now - 0.3, abs=1e-9)  # the model's clock, not -5


@needs_mosquitto
async def test_concurrent_sends_share_announces_and_every_message_arrives_once() -> None:
    agents = ["client-0", "client-1"]
    cfg = ChannelConfig(preset="ideal", time_scale=0.01)
    with MosquittoBroker(RUN, make_accounts(agents), channel_mode="emulated") as mosq:
        async with AsyncExitStack() as stack:
            emu = await stack.enter_async_context(
                ChannelEmulator(cfg, RUN, mosq.address_for("channel"), agents, seed=0, wired=()))
            a = await stack.enter_async_context(_session(mosq, "client-0", chunk_size=4096))
            b = await stack.enter_async_context(_session(mosq, "client-1"))
            xs = [np.full(3000, i, np.float32) for i in range(24)]  # 12 kB each, in 4 kB chunks
            await asyncio.gather(*(a.send("client-1", Kind.UPDATE, {"w": x}, round=i) for i, x in enumerate(xs)))
            got = [await b.receive(timeout=10) for _ in xs]
            await emu.flush(5)
            totals = emu.stats()["totals"]
    assert sorted(int(m.tensors["w"][0]) for m in got) == list(range(24))
    size = len(encode(kind=Kind.UPDATE, run=RUN, src="client-0", dst="client-1", tensors={"w": xs[0]}).payload)
    frames = 24 * chunk_count(size, 4096)
    assert totals["announced"] == totals["releases"] == frames
    assert totals["announces"] < 24 and totals["release_frames"] < frames  # batched, not one per frame
    assert a.stats.announce_failures == 0 and b.stats.rejected == {}


def test_the_relay_is_a_validated_scenario_key(tmp_path) -> None:
    from nmoe.errors import ConfigError
    from scenarios.scenario import load_scenario

    path = tmp_path / "s.yaml"
    path.write_text("clients: 2\nchannel: {model: emulated, relay: bodies}\n")
    assert load_scenario(str(path)).channel.relay == "bodies"
    assert load_scenario(str(path), ["channel.relay=headers"]).channel.relay == "headers"
    with pytest.raises(ConfigError, match="channel.relay") as err:
        load_scenario(str(path), ["channel.relay=both"])
    assert "headers" in str(err.value) and "bodies" in str(err.value)


@needs_mosquitto
async def test_small_messages_relayed_whole_keep_their_place_among_held_ones_on_a_link() -> None:
    agents = ["client-0", "client-1"]
    cfg = ChannelConfig(preset="ideal", time_scale=0.01, link=LinkOverrides(delay_s=0.2))
    big = np.zeros(50_000, np.float32)  # 200 kB: held (over held_min_bytes)
    with MosquittoBroker(RUN, make_accounts(agents), channel_mode="emulated") as mosq:
        async with AsyncExitStack() as stack:
            emu = await stack.enter_async_context(
                ChannelEmulator(cfg, RUN, mosq.address_for("channel"), agents, seed=0, wired=()))
            a = await stack.enter_async_context(_session(mosq, "client-0", held_min_bytes=128 * 1024))
            b = await stack.enter_async_context(_session(mosq, "client-1"))
            for i in range(12):  # big, small, big, small, ...: sent one after the other, as agents do
                await a.send("client-1", Kind.MODEL, {"w": big} if i % 2 == 0 else None, round=i)
            got = [await b.receive(timeout=10) for _ in range(12)]
            totals = emu.stats()["totals"]
    assert [m.header.round for m in got] == list(range(12))
    assert totals["announces"] >= 1 and totals["announced"] >= 6  # the big ones were held ...
    assert totals["published"] > totals["release_frames"]  # ... the small ones relayed whole
    assert b.stats.rejected == {}


@needs_mosquitto
async def test_an_announced_body_is_published_past_its_sends_deadline_and_reaches_its_receiver() -> None:
    """The announce leaves right behind the body, before the broker has acknowledged it. When the
    broker stalls (stopped with SIGSTOP) the send times out, yet the body's publish goes on: once
    the broker resumes, the message and the one after it reach the receiver. (Before, a send that
    timed out was never announced, and its body waited at the receiver until it expired.)"""
    agents = ["client-0", "client-1"]
    cfg = ChannelConfig(preset="ideal", time_scale=0.01)
    x = np.arange(3000, dtype=np.float32)  # 12 kB: 3 chunks
    with MosquittoBroker(RUN, make_accounts(agents), channel_mode="emulated") as mosq:
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(ChannelEmulator(cfg, RUN, mosq.address_for("channel"), agents, seed=0,
                                                            wired=()))  # fmt: skip
            a = await stack.enter_async_context(_session(mosq, "client-0", chunk_size=4096, publish_timeout_s=0.5))
            b = await stack.enter_async_context(_session(mosq, "client-1"))
            assert mosq.pid is not None
            os.kill(mosq.pid, signal.SIGSTOP)  # our own broker, by its pid
            try:
                with pytest.raises(PublishTimeout):
                    await a.send("client-1", Kind.UPDATE, {"w": x}, round=0)
                await asyncio.sleep(0.5)
            finally:
                os.kill(mosq.pid, signal.SIGCONT)
            first = await b.receive(timeout=10)
            await a.send("client-1", Kind.UPDATE, {"w": x + 1}, round=1)
            second = await b.receive(timeout=10)
    assert (first.header.round, second.header.round) == (0, 1)
    assert np.array_equal(first.tensors["w"], x) and np.array_equal(second.tensors["w"], x + 1)
    assert b.stats.rejected == {}


@needs_mosquitto
async def test_a_session_lets_a_link_blocked_behind_a_lost_body_go_on_without_further_input() -> None:
    """The channel releases a frame whose body never comes (lost in the broker) and then a message
    that is all here; with nothing else arriving, the session's own check lets the message through
    once the missing body's grace is over."""
    with MosquittoBroker(RUN, make_accounts(["client-0", "client-1"]), channel_mode="emulated") as mosq:
        async with AsyncExitStack() as stack:
            rx = await stack.enter_async_context(_session(mosq, "client-1", hold=HoldLimits(body_grace_s=0.4)))
            tx = await stack.enter_async_context(_session(mosq, "client-0"))
            channel = await stack.enter_async_context(raw_client(mosq.address_for("channel"), "chan"))
            x = np.arange(64, dtype=np.float32)
            msg_id = await tx.send("client-1", Kind.LATENT, {"h": x})  # no emulator: it is held
            for _ in range(500):  # the broker has it; the receiver soon will
                if rx.held_frames():
                    break
                await asyncio.sleep(0.01)
            ((_src, _kind, _id, _index, size),) = rx.held_frames()  # (the header's length varies)
            sha = encode(kind=Kind.LATENT, run=RUN, src="client-0", dst="client-1", tensors={"h": x}).header.blake3
            lost = encode(kind=Kind.LATENT, run=RUN, src="client-0", dst="client-1", tensors={"h": x + 1})
            releases = [released(lost), Release(msg_id, sha, Kind.LATENT, 0, size, 1.0, 2.0)]
            await channel.publish(T.rx("client-1", "client-0", Kind.LATENT), pack_releases(releases), qos=1)
            got = await rx.receive(timeout=5)
    assert got.id == msg_id and np.array_equal(got.tensors["h"], x)
    assert rx.stats.rejected == {"release_unmatched": 1}
