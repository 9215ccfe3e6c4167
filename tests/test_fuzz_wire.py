"""Property-based tests of the wire decoders (issue 11, point 12): whatever bytes arrive, a decoder
gives a valid message or a WireError with a known reason, never another exception.

The inputs are random bytes, mutations of valid frames (flipped, cut, spliced), and valid frames
around hostile JSON headers, safetensors headers and chunk fields. The decoders are called
directly, below the Decoder's own catch-all (which would hide a bug as ``decode_error``), and
through the Decoder, which must never count ``decode_error``. About 200 examples per property keep
the default run to a few seconds; ``HYPOTHESIS_PROFILE=long`` runs 20x more.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.envelope import FRAME_MESSAGE, HEADER_LEN, body_digest, pack_prefix
from broker.header import Header
from broker.tensors import decode_body, encode_body
from broker.topics import Kind, Topics
from broker.wire import (
    REASONS,
    Decoder,
    ReassemblyLimits,
    Schema,
    TensorSpec,
    WireError,
    decode,
    draft,
    encode,
    peek,
    read_chunk,
    restamp,
    split,
)

RUN = "fz"
TOPICS = Topics(RUN)
TOPIC = TOPICS.rx("coordinator", "client-0", Kind.UPDATE)
settings.register_profile("default", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=4000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def _valid(tensors: dict[str, np.ndarray] | None = None, **kw: Any) -> bytes:
    args: dict[str, Any] = dict(kind=Kind.UPDATE, run=RUN, src="client-0", dst="coordinator", meta={"op": "x"})
    tensors = {"w": np.arange(6, dtype=np.float32)} if tensors is None else tensors
    return encode(tensors=tensors, **(args | kw)).payload


VALID = [
    _valid(),
    _valid({}, kind=Kind.CTRL, meta={"op": "hello", "samples": 3}),
    _valid({"a": np.ones((2, 3), np.float32), "b": np.arange(4, dtype=np.int64)}, compression="int8"),
    _valid({"h": np.linspace(-1, 1, 300, dtype=np.float32)}, compression="fp16"),
]


def _raises_only_wire_errors(call: Any, *args: Any, **kw: Any) -> Any:
    try:
        return call(*args, **kw)
    except WireError as err:
        assert err.reason in REASONS, err.reason
        assert err.reason != "decode_error", err
        return None


@st.composite
def mutated(draw: st.DrawFn, frames: list[bytes] = VALID) -> bytes:
    """A valid frame with a few bytes overwritten, cut short, extended, or spliced with another."""
    frame = bytearray(draw(st.sampled_from(frames)))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(frame) - 1))
        frame[at] = draw(st.integers(0, 255))
    how = draw(st.sampled_from(["keep", "cut", "extend", "splice"]))
    if how == "cut":
        frame = frame[: draw(st.integers(0, len(frame)))]
    elif how == "extend":
        frame += draw(st.binary(max_size=64))
    elif how == "splice":
        other = draw(st.sampled_from(frames))
        at = draw(st.integers(0, min(len(frame), len(other))))
        frame = frame[:at] + other[at:]
    return bytes(frame)


# Integers past a float's range too (json itself stops at 4300 digits).
BIG_INTS = st.integers(10**300, 10**4000) | st.integers(-(10**4000), -(10**300))
JSON_SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | BIG_INTS | st.floats(allow_nan=False)
    | st.text(max_size=40)
)  # fmt: skip
JSON = st.recursive(
    JSON_SCALARS,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)


def _nest(depth: int, opener: int) -> bytes:
    """``depth`` nested arrays, or objects (``{"k":{"k":...}}``), as raw JSON."""
    if opener == ord("["):
        return b"[" * depth + b"]" * depth
    return b'{"k":' * depth + b"1" + b"}" * depth


@st.composite
def hostile_header(draw: st.DrawFn) -> bytes:
    """A frame with a correct hash whose JSON header keeps the protocol's keys but any values."""
    d = draft(kind=Kind.UPDATE, run=RUN, src="client-0", dst="coordinator", tensors={})
    obj = json.loads(replace(d.header, blake3=d.digest()).to_json())
    for key in draw(st.lists(st.sampled_from(sorted(obj)), max_size=3, unique=True)):
        obj[key] = draw(JSON)
    if draw(st.booleans()):
        obj = draw(st.sampled_from([obj, [obj], {**obj, "extra": 1}, {k: v for k, v in obj.items() if k != "run"}]))
    head = json.dumps(obj).encode()
    if draw(st.booleans()):  # nesting deeper than json.dumps could write (Python's json recurses)
        head = head.replace(b'"x"', _nest(draw(st.integers(1, 6000)), draw(st.sampled_from(b"[{"))))
    return pack_prefix(FRAME_MESSAGE, d.header.id) + HEADER_LEN.pack(len(head)) + head + d.body


@st.composite
def hostile_body(draw: st.DrawFn) -> bytes:
    """A safetensors body whose JSON header is any JSON, or a valid one with fields changed."""
    if draw(st.booleans()):
        st_header = draw(JSON)
    else:
        st_header = {
            "w": {"dtype": draw(st.sampled_from(["F32", "F16", "I8", "U8", "BOOL", "F64", "I64", "C64", "x"])),
                  "shape": draw(st.lists(st.integers(-2, 2**33), max_size=4)),
                  "data_offsets": draw(st.lists(st.integers(-2, 2**33), min_size=0, max_size=3))},
            "__metadata__": draw(st.dictionaries(
                st.sampled_from(["nmoe.codec.w", "nmoe.codec.v", "other"]),
                st.sampled_from(["fp16", "int8:0.5", "int8:nan", "int8:-1", "int8:x", "zip"]) | JSON,
                max_size=2)),
        }  # fmt: skip
    raw = json.dumps(st_header).encode()
    if draw(st.booleans()):
        raw = b'{"__metadata__":{"x":' + _nest(draw(st.integers(1, 25_000)), draw(st.sampled_from(b"[{"))) + b"}}"
    return len(raw).to_bytes(8, "little") + raw + draw(st.binary(max_size=64))


def _framed(body: bytes) -> bytes:
    d = draft(kind=Kind.UPDATE, run=RUN, src="client-0", dst="coordinator", tensors={})
    head = replace(d.header, blake3=body_digest(body), body_len=len(body)).to_json()
    return pack_prefix(FRAME_MESSAGE, d.header.id) + HEADER_LEN.pack(len(head)) + head + body


ANY_FRAME = st.binary(max_size=512) | mutated() | hostile_header() | hostile_body().map(_framed)


# -- the decoders, directly ------------------------------------------------------------------------
@given(ANY_FRAME)
def test_decode_gives_a_message_or_a_wire_error(frame: bytes) -> None:
    schema = Schema({"w": TensorSpec("float32", (None,))}, allow_extra=True)
    msg = _raises_only_wire_errors(decode, frame, expect=TOPICS.parse(TOPIC), run_id=RUN, schema=schema)
    if msg is not None:
        assert msg.header.run == RUN and all(np.isfinite(a).all() for a in msg.tensors.values() if a.dtype.kind == "f")


@given(st.binary(max_size=2048) | JSON.map(lambda o: json.dumps(o).encode()))
def test_header_from_json_gives_a_header_or_a_wire_error(raw: bytes) -> None:
    _raises_only_wire_errors(Header.from_json, raw, t_model_send=None, t_model_arrive=None)


_HEADER = json.loads(draft(kind=Kind.UPDATE, run=RUN, src="client-0", dst="coordinator").header.to_json())


@pytest.mark.parametrize("key", sorted(_HEADER))
@settings(max_examples=40)
@given(value=JSON_SCALARS | JSON)
def test_every_header_field_takes_any_json_value(key: str, value: Any) -> None:
    raw = json.dumps(_HEADER | {key: value}).encode()
    _raises_only_wire_errors(Header.from_json, raw, t_model_send=None, t_model_arrive=None)


@given(st.binary(max_size=512) | hostile_body() | mutated([encode_body({"w": np.ones(3, np.float32)}, "int8")[0]]))
def test_decode_body_gives_tensors_or_a_wire_error(body: bytes) -> None:
    tensors = _raises_only_wire_errors(decode_body, body)
    if tensors is not None:
        assert all(isinstance(a, np.ndarray) for a in tensors.values())


CHUNKS = [c for f in VALID[:2] for c in split(f + bytes(3000), peek(f).msg_id, 1024)]


@given(st.lists(st.binary(max_size=256) | mutated(CHUNKS) | st.sampled_from(CHUNKS), min_size=1, max_size=12))
def test_chunks_and_reassembly_give_frames_or_wire_errors(frames: list[bytes]) -> None:
    decoder = Decoder(TOPICS, direction="rx", limits=ReassemblyLimits(max_pending_messages=4, max_pending_bytes=64_000))
    for frame in frames:
        _raises_only_wire_errors(read_chunk, frame)
        _raises_only_wire_errors(peek, frame)
        _raises_only_wire_errors(restamp, frame, t_model_send=1.0)
        decoder.feed(TOPIC, frame)
    assert "decode_error" not in decoder.rejected
    assert decoder.reassembler.pending_bytes <= 64_000


# -- through the receiver: every frame is a message or exactly one counted rejection ----------------
@given(ANY_FRAME)
def test_the_decoder_counts_every_rejection(frame: bytes) -> None:
    decoder = Decoder(TOPICS, direction="rx")
    if frame[5:6] == b"C":
        return  # a chunk may wait for the rest of its message; covered above
    msg = decoder.feed(TOPIC, frame)
    assert (msg is None) == (sum(decoder.rejected.values()) == 1), decoder.rejected
    assert "decode_error" not in decoder.rejected
