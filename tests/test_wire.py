"""Pure wire tests: topics, envelope, chunks, reassembly, validation, compression, accounts. No broker."""

from __future__ import annotations

import asyncio
import random
import shutil
import struct
import subprocess
from dataclasses import replace

import numpy as np
import pytest
from conftest import until

from broker.auth import (
    Account,
    BrokerAddress,
    Role,
    acl_rules,
    filter_covers,
    make_accounts,
    password_hash,
    render_acl_file,
    topic_matches,
    verify_password,
)
from broker.envelope import FRAME_MESSAGE, HEADER_LEN, body_digest, pack_prefix
from broker.topics import Kind, ParsedTopic, Topics
from broker.wire import (
    CHUNK_OVERHEAD,
    DecodePipeline,
    Decoder,
    Header,
    ReassemblyLimits,
    Schema,
    TensorSpec,
    decode,
    draft,
    encode,
    peek,
    read_chunk,
    restamp,
    split,
)
from nmoe.errors import BrokerError, WireError

RUN = "t1"
T = Topics(RUN)
TO_COORD = T.rx("coordinator", "client-0", Kind.UPDATE)


def enc(tensors=None, **kw):
    args = dict(kind=Kind.UPDATE, run=RUN, src="client-0", dst="coordinator", tensors=tensors) | kw
    return encode(**args)


def feed_all(decoder: Decoder, topic: str, frames: list[bytes]):
    out = [decoder.feed(topic, f) for f in frames]
    assert all(m is None for m in out[:-1])
    return out[-1]


# -- topics ----------------------------------------------------------------------------------------
def test_topics_build_and_parse_round_trip():
    assert T.tx("client-0", "all", Kind.LATENT) == "nmoe/t1/tx/client-0/all/latent"
    assert T.parse("nmoe/t1/tx/client-0/all/latent") == ParsedTopic("tx", "client-0", "all", Kind.LATENT)
    assert T.parse(TO_COORD) == ParsedTopic("rx", "client-0", "coordinator", Kind.UPDATE)
    assert T.inbox_filters("client-1") == ("nmoe/t1/rx/client-1/#", "nmoe/t1/rx/all/#")
    assert T.parse_status(T.status("client-2")) == "client-2"
    assert T.relay(T.parse("nmoe/t1/tx/client-0/all/ctrl"), "client-3") == "nmoe/t1/rx/client-3/client-0/ctrl"
    assert T.held("client-1", "client-0", "model") == "nmoe/t1/held/client-1/client-0/model"


BAD_PARTS = [("all", "client-0", "update"), ("client-0", "x y", "update"), ("client-0", "client-1", "weights"),
             (["client-0"], "client-1", "update")]  # fmt: skip


@pytest.mark.parametrize("parts", BAD_PARTS)
def test_topic_builders_refuse_bad_parts(parts):
    """The builders cache what they built; a bad part (even an unhashable one) is still bad_topic."""
    src, dst, kind = parts
    for build in (lambda: T.tx(src, dst, kind), lambda: T.rx(dst, src, kind), lambda: T.held(dst, src, kind)):
        with pytest.raises(WireError) as err:
            build()
        assert err.value.reason == "bad_topic"


@pytest.mark.parametrize(
    "topic",
    [
        "nmoe/other/rx/coordinator/client-0/update",  # another run
        "nmoe/t1/rx/coordinator/client-0/weights",  # unknown kind
        "nmoe/t1/rx/coordinator/all/update",  # 'all' is never a source
        "nmoe/t1/rx/Coordinator/client-0/update",  # bad agent id
        "nmoe/t1/xx/coordinator/client-0/update",  # unknown direction
        "nmoe/t1/rx/coordinator/client-0/update/extra",
        "nmoe/t1/status/client-0",
    ],
)
def test_topics_reject_anything_else(topic):
    with pytest.raises(WireError) as err:
        T.parse(topic)
    assert err.value.reason == "bad_topic"


def test_ids_are_validated():
    with pytest.raises(WireError):
        Topics("bad run id!")
    with pytest.raises(WireError):
        T.rx("all", "all", Kind.CTRL)
    with pytest.raises(WireError):
        T.status("x" * 40)


# -- envelope --------------------------------------------------------------------------------------
@pytest.mark.parametrize("nbytes", [1_000, 100_000, 2_000_000, 20_000_000])
def test_round_trip_sizes_through_chunks(nbytes):
    rng = np.random.default_rng(nbytes)
    x = rng.standard_normal(nbytes // 4).astype(np.float32)
    extra = {"ids": np.arange(7, dtype=np.int64), "mask": np.array([True, False]), "s": np.float16(2.5)}
    e = enc({"x": x, **{k: np.asarray(v) for k, v in extra.items()}}, round=4, stage="s3", meta={"n": 3})
    frames = split(e.payload, e.header.id, 256 * 1024)
    assert all(len(f) <= 256 * 1024 for f in frames)
    assert len(frames) == max(1, -(-len(e.payload) // (256 * 1024 - CHUNK_OVERHEAD)))
    msg = feed_all(Decoder(T), TO_COORD, frames)
    assert msg is not None
    assert np.array_equal(msg.tensors["x"], x)
    assert np.array_equal(msg.tensors["ids"], extra["ids"]) and msg.tensors["s"].shape == ()
    assert (msg.header.round, msg.header.stage, dict(msg.header.meta)) == (4, "s3", {"n": 3})
    assert msg.wire_bytes == sum(len(f) for f in frames)


def test_decode_pipeline_keeps_arrival_order_across_inline_and_offloaded_frames():
    """Frames at or above the threshold are decoded in the worker, smaller ones on the loop; a
    small frame that arrives behind a big one still waits for it, and a bad big frame is counted
    without holding up the frames behind it."""
    sizes = [10, 5000, 20, 5000, 5000, 30, 10, 5000]  # float32 elements; the threshold is 8 KiB

    async def run() -> tuple[list[float], Decoder]:
        decoder = Decoder(T)
        got: list[float] = []
        pipeline = DecodePipeline(decoder, lambda m: got.append(float(m.tensors["x"][0])), offload_bytes=8 * 1024)
        try:
            for i, n in enumerate(sizes):
                payload = enc({"x": np.full(n, float(i), np.float32)}).payload
                if i == 3:  # a corrupt big frame: its body no longer matches the header's hash
                    payload = payload[:-1] + bytes([payload[-1] ^ 1])
                pipeline.feed(TO_COORD, payload)
            await until(lambda: len(got) >= len(sizes) - 1, timeout=2.0)
        finally:
            pipeline.close()
        return got, decoder

    got, decoder = asyncio.run(run())
    assert got == [0.0, 1.0, 2.0, 4.0, 5.0, 6.0, 7.0]
    assert sum(decoder.rejected.values()) == 1


def test_small_chunks_out_of_order_with_duplicates():
    x = np.random.default_rng(0).standard_normal((50, 40)).astype(np.float32)
    e = enc({"x": x})
    frames = split(e.payload, e.header.id, 1024)
    assert len(frames) > 8
    shuffled = frames + frames[:3]
    random.Random(1).shuffle(shuffled)
    d = Decoder(T)
    results = [d.feed(TO_COORD, f) for f in shuffled]
    done = [m for m in results if m is not None]
    assert len(done) == 1 and np.array_equal(done[0].tensors["x"], x)
    assert not d.rejected and d.reassembler.pending_messages == 0


def test_header_validation():
    e = enc({})
    h = e.header
    bad = [("id", "xyz"), ("stage", "no spaces"), ("round", -2), ("src", "all"), ("t_send", float("nan"))]
    for field, value in bad:
        with pytest.raises(WireError) as err:
            Header(**(vars(h) | {field: value}))
        assert err.value.reason == "bad_header", field
    with pytest.raises(WireError) as err:
        enc({}, meta={"blob": "x" * 9000})
    assert err.value.reason == "oversized"
    with pytest.raises(WireError):
        enc({}, meta={"bad": float("inf")})
    with pytest.raises(WireError):
        enc({}, meta={"nested": [1, 2]})


def test_draft_publishes_body_before_hash():
    x = np.ones(100_000, np.float32)
    d = draft(kind=Kind.MODEL, run=RUN, src="coordinator", dst="all", tensors={"x": x})
    final = d.finish(d.digest())
    assert d.payload()[d.body_offset :] == final.payload[d.body_offset :]  # body bytes are final early
    assert final.header.blake3 == d.digest() and len(d.payload()) == len(final.payload)


# -- modeled stamps --------------------------------------------------------------------------------
def test_restamp_whole_message_and_chunks():
    x = np.arange(3000, dtype=np.float32)
    e = enc({"x": x})
    info = peek(e.payload)
    assert (info.frame, info.msg_id, info.t_model_send) == ("message", e.header.id, None)
    stamped = restamp(e.payload, t_model_send=10.0, t_model_arrive=10.5)
    msg = Decoder(T).feed(TO_COORD, stamped)
    assert msg is not None and (msg.header.t_model_send, msg.header.t_model_arrive) == (10.0, 10.5)

    frames = split(e.payload, e.header.id, 2048)
    chunk = read_chunk(frames[2])
    assert (chunk.msg_id, chunk.index, chunk.total) == (e.header.id, 2, len(frames))
    relayed = [restamp(f, t_model_send=1.0 + i, t_model_arrive=2.0 + i) for i, f in enumerate(frames)]
    assert read_chunk(relayed[1]).t_model_arrive == 3.0
    msg = feed_all(Decoder(T), TO_COORD, relayed)
    assert msg.header.t_model_send == 1.0 and msg.header.t_model_arrive == 1.0 + len(frames)
    assert np.array_equal(msg.tensors["x"], x)


# -- compression -----------------------------------------------------------------------------------
def test_compression_round_trips_and_reports_savings():
    x = np.random.default_rng(2).standard_normal((256, 64)).astype(np.float32)
    ints = np.arange(10, dtype=np.int32)
    int8_tol = np.abs(x).max() / 127
    for codec, saved, tol in (("fp16", x.nbytes // 2, 2e-3), ("int8", x.nbytes * 3 // 4, int8_tol)):
        e = enc({"x": x, "i": ints}, compression=codec)
        assert e.saved_bytes == saved and e.header.compression == codec
        msg = Decoder(T).feed(TO_COORD, e.payload)
        assert msg is not None and msg.tensors["x"].dtype == np.float32
        assert np.abs(msg.tensors["x"] - x).max() <= tol
        assert np.array_equal(msg.tensors["i"], ints)


def test_fp16_keeps_out_of_range_tensors_exact():
    big = np.array([1e6, -3.0], dtype=np.float32)
    e = enc({"big": big}, compression="fp16")
    assert e.saved_bytes == 0
    assert np.array_equal(Decoder(T).feed(TO_COORD, e.payload).tensors["big"], big)


# -- rejections ------------------------------------------------------------------------------------
def _reject(payload: bytes, topic: str = TO_COORD, **kw) -> Decoder:
    d = Decoder(T, **kw)
    assert d.feed(topic, payload) is None
    return d


def _reason(payload: bytes, topic: str = TO_COORD, **kw) -> str:
    d = _reject(payload, topic, **kw)
    assert sum(d.rejected.values()) == 1, d.rejected
    return next(iter(d.rejected))


def _forged(body: bytes) -> bytes:
    """A whole frame with a correct hash over an arbitrary body."""
    d = draft(kind=Kind.UPDATE, run=RUN, src="client-0", dst="coordinator", tensors={})
    h = replace(d.header, blake3=body_digest(body), body_len=len(body)).to_json()
    return pack_prefix(FRAME_MESSAGE, d.header.id) + HEADER_LEN.pack(len(h)) + h + body


GOOD = enc({"x": np.ones((4, 3), np.float32)}).payload


def test_garbage_truncated_version_header_hash_body():
    assert _reason(b"\x00garbage bytes that are no frame at all") == "bad_magic"
    assert _reason(b"") == "truncated"
    assert _reason(GOOD[:30]) == "truncated"
    assert _reason(GOOD[:-5]) == "truncated"
    assert _reason(GOOD[:4] + bytes([9]) + GOOD[5:]) == "bad_version"
    broken_json = bytearray(GOOD)
    broken_json[45] ^= 0xFF
    assert _reason(bytes(broken_json)) == "bad_header"
    flipped = bytearray(GOOD)
    flipped[-1] ^= 0x01
    assert _reason(bytes(flipped)) == "hash_mismatch"
    assert _reason(_forged(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")) == "bad_body"
    assert _reason(_forged(b"short")) == "bad_body"


def test_schema_rejections():
    schema = {Kind.UPDATE: Schema({"x": TensorSpec("float32", (None, 3))})}
    ok = Decoder(T, schemas=schema).feed(TO_COORD, enc({"x": np.ones((9, 3), np.float32)}).payload)
    assert ok is not None
    cases = {
        "missing_tensor": {"y": np.ones((4, 3), np.float32)},
        "unexpected_tensor": {"x": np.ones((4, 3), np.float32), "y": np.ones(1, np.float32)},
        "bad_dtype": {"x": np.ones((4, 3), np.float64)},
        "bad_shape": {"x": np.ones((4, 4), np.float32)},
    }
    for reason, tensors in cases.items():
        assert _reason(enc(tensors).payload, schemas=schema) == reason
    loose = {Kind.UPDATE: Schema({"x": TensorSpec("float32", (None, 3))}, allow_extra=True)}
    assert Decoder(T, schemas=loose).feed(TO_COORD, enc(cases["unexpected_tensor"]).payload) is not None


def test_non_finite_rejected_and_refused_at_send():
    for bad in (np.nan, np.inf, -np.inf):
        x = np.array([1.0, bad], np.float32)
        with pytest.raises(WireError) as err:
            enc({"x": x})
        assert err.value.reason == "non_finite"
        assert _reason(enc({"x": x}, finite=False).payload) == "non_finite"


def test_topic_mismatch_is_spoofing():
    payload = enc({}).payload  # src client-0, dst coordinator, kind update
    assert _reason(payload, T.rx("coordinator", "client-1", Kind.UPDATE)) == "topic_mismatch"  # other src
    assert _reason(payload, T.rx("coordinator", "client-0", Kind.MODEL)) == "topic_mismatch"  # other kind
    assert _reason(payload, T.rx("client-2", "client-0", Kind.UPDATE)) == "topic_mismatch"  # other dst
    other_run = encode(kind=Kind.UPDATE, run="t2", src="client-0", dst="coordinator", tensors={}).payload
    assert _reason(other_run) == "topic_mismatch"
    broadcast = encode(kind=Kind.CTRL, run=RUN, src="coordinator", dst="all").payload
    assert Decoder(T).feed(T.rx("client-1", "coordinator", Kind.CTRL), broadcast) is not None  # relayed


def test_oversized_whole_and_chunked():
    big = enc({"x": np.zeros(300_000, np.float32)}).payload
    limits = ReassemblyLimits(max_message_bytes=1_000_000)
    assert _reason(big, limits=limits) == "oversized"
    frames = split(big, peek(big).msg_id, 64 * 1024)
    assert _reason(frames[0], limits=limits) == "oversized"


def test_bad_chunks():
    e = enc({"x": np.zeros(2000, np.float32)})
    frames = split(e.payload, e.header.id, 1024)
    prefix = 40
    bad_index = frames[0][:prefix] + struct.pack("<IIQ", 99, len(frames), len(e.payload)) + frames[0][56:]
    assert _reason(bad_index) == "bad_chunk"
    d = Decoder(T)
    d.feed(TO_COORD, frames[0])
    liar = frames[1][:prefix] + struct.pack("<IIQ", 1, len(frames) + 1, len(e.payload)) + frames[1][56:]
    assert d.feed(TO_COORD, liar) is None and d.rejected["bad_chunk"] == 1


def test_chunk_storm_is_bounded_and_good_messages_still_pass():
    limits = ReassemblyLimits(max_pending_messages=8, max_pending_per_source=4)
    d = Decoder(T, limits=limits)
    for i in range(20):  # 20 incomplete messages from one source
        e = enc({"x": np.full(1000, i, np.float32)})
        d.feed(TO_COORD, split(e.payload, e.header.id, 1024)[0])
    assert d.reassembler.pending_messages == 4 and d.rejected["chunk_overflow"] == 16
    other = T.rx("coordinator", "client-1", Kind.UPDATE)
    e = enc({"x": np.ones(1000, np.float32)}, src="client-1")
    assert feed_all(d, other, split(e.payload, e.header.id, 1024)) is not None


def test_a_flooding_sender_only_evicts_its_own_messages():
    """Over the whole backstop (8 messages, 40 KB) one sender's flood drops only its own oldest; an
    honest sender's message, its chunks interleaved with the flood, still completes."""
    limits = ReassemblyLimits(max_pending_per_source=4, max_pending_bytes_per_source=20_000,
                              max_pending_messages=8, max_pending_bytes=40_000)  # fmt: skip
    d = Decoder(T, limits=limits)
    honest_topic = T.rx("coordinator", "client-1", Kind.UPDATE)
    e = enc({"x": np.ones(4000, np.float32)}, src="client-1")  # 16 KB in 17 chunks
    honest = split(e.payload, e.header.id, 1024)
    got = None
    for i, chunk in enumerate(honest):
        flood = enc({"x": np.full(1000, i, np.float32)})
        for f in split(flood.payload, flood.header.id, 1024)[:3]:  # never completed
            d.feed(TO_COORD, f)
        got = d.feed(honest_topic, chunk)
    assert got is not None and np.array_equal(got.tensors["x"], np.ones(4000, np.float32))
    assert d.reassembler.pending_from("client-1") == (0, 0)
    messages, held = d.reassembler.pending_from("client-0")
    assert messages <= 4 and held <= 20_000
    assert d.rejected == {"chunk_overflow": len(honest) - messages}


def test_incomplete_messages_expire():
    now = [0.0]
    d = Decoder(T, limits=ReassemblyLimits(expiry_s=5.0), clock=lambda: now[0])
    e = enc({"x": np.ones(1000, np.float32)})
    frames = split(e.payload, e.header.id, 1024)
    d.feed(TO_COORD, frames[0])
    now[0] = 6.0
    assert d.expire() == 1 and d.rejected["chunk_expired"] == 1
    assert d.reassembler.pending_messages == 0 and d.reassembler.pending_bytes == 0


def test_decode_direct_api_raises_wire_error():
    with pytest.raises(WireError) as err:
        decode(GOOD, expect=T.parse(T.rx("coordinator", "client-1", Kind.UPDATE)))
    assert err.value.reason == "topic_mismatch"
    assert decode(GOOD).header.src == "client-0"


# -- accounts, addresses, ACL ----------------------------------------------------------------------
def test_credentials_stay_out_of_reprs_and_errors(monkeypatch):
    a = Account("client-0", "s3cret-pass")
    assert "s3cret" not in repr(a) and "s3cret" not in str(a)
    addr = BrokerAddress.parse("mqtt://client-0:s3cret-pass@broker.local:1884")
    assert (addr.host, addr.port, addr.username, addr.password, addr.tls) == (
        "broker.local", 1884, "client-0", "s3cret-pass", False,
    )  # fmt: skip
    assert "s3cret" not in repr(addr) and "s3cret" not in str(addr) and "s3cret" not in addr.redacted()
    with pytest.raises(BrokerError) as err:
        BrokerAddress.parse("http://client-0:s3cret-pass@host")
    assert "s3cret" not in str(err.value)
    monkeypatch.setenv("NMOE_BROKER_PASSWORD", "from-env")
    tls = BrokerAddress.parse("mqtts://client-0@host")
    assert (tls.port, tls.tls, tls.password) == (8883, True, "from-env")


def test_make_accounts():
    accounts = make_accounts(["client-0", "client-1"], observers=["watcher"])
    assert [(a.username, a.role) for a in accounts] == [
        ("client-0", Role.AGENT), ("client-1", Role.AGENT), ("coordinator", Role.COORDINATOR),
        ("channel", Role.CHANNEL), ("watcher", Role.OBSERVER),
    ]  # fmt: skip
    assert len({a.password for a in accounts}) == 5
    with pytest.raises(ValueError):
        make_accounts(["coordinator"])


def test_password_hash_format():
    hashed = password_hash("pw")
    assert hashed.startswith("$7$101$")
    assert verify_password("pw", hashed) and not verify_password("px", hashed)


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd is not installed")
def test_password_hash_matches_mosquitto_passwd(tmp_path):
    path = tmp_path / "pw"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(path), "alice", "secret"], check=True)
    theirs = path.read_text().strip().split(":", 1)[1]
    assert verify_password("secret", theirs) and not verify_password("wrong", theirs)


def test_acl_rules_per_role_and_mode():
    c0, co, ch, ob = make_accounts(["client-0"], observers=["observer"])
    direct = acl_rules(c0, T, "direct")
    assert direct.may_write("nmoe/t1/tx/client-0/coordinator/update")
    assert direct.may_write("nmoe/t1/rx/coordinator/client-0/update")
    assert not direct.may_write("nmoe/t1/rx/coordinator/client-1/update")  # spoofed source
    assert not direct.may_write("nmoe/t1/tx/client-1/coordinator/update")
    assert direct.may_write("nmoe/t1/status/client-0") and not direct.may_write("nmoe/t1/status/client-1")
    assert direct.may_subscribe("nmoe/t1/rx/client-0/#") and not direct.may_subscribe("nmoe/t1/rx/#")
    assert not direct.may_receive("nmoe/t1/rx/client-1/coordinator/model")
    assert not acl_rules(c0, T, "emulated").may_write("nmoe/t1/rx/coordinator/client-0/update")
    assert acl_rules(co, T, "direct").may_subscribe("nmoe/t1/status/#")
    assert acl_rules(ch, T, "emulated").may_write("nmoe/t1/rx/client-0/coordinator/model")
    assert acl_rules(ch, T, "emulated").may_subscribe("nmoe/t1/tx/#")
    assert acl_rules(ob, T, "direct").write == ()
    text = render_acl_file([c0, co], T, "direct")
    assert "user client-0\ntopic read nmoe/t1/rx/client-0/#" in text
    assert "topic write nmoe/t1/rx/+/client-0/#" in text


def test_topic_matching_helpers():
    assert topic_matches("a/+/c/#", "a/b/c/d/e") and topic_matches("a/#", "a")
    assert not topic_matches("a/+", "a/b/c") and not topic_matches("a/b", "a/c")
    assert filter_covers("a/#", "a/+/c") and filter_covers("a/+/#", "a/b/#")
    assert not filter_covers("a/+/c", "a/#") and not filter_covers("a/b/#", "a/+/c")
