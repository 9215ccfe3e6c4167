"""The safetensors layout without copies (broker/stlayout.py) against safetensors itself, and the
frames a sender builds from it (broker/chunks.py ``Framed``).

The writer must produce the bytes ``safetensors.numpy.save`` produces, and the reader must accept
what safetensors accepts (within our bounds) with bit-identical tensors, and refuse what it refuses,
with a WireError of a known reason.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from broker import stlayout
from broker.chunks import CHUNK_OVERHEAD, Framed, Reassembler
from broker.envelope import body_digest, decode, draft
from broker.tensors import ALLOWED_DTYPES, decode_body, encode_body
from broker.topics import Kind
from broker.wire import REASONS, WireError

settings.register_profile("default", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=4000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

DTYPES = sorted(ALLOWED_DTYPES)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical: dtype, shape and bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _body(header: Any, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + data


def _reason(body: bytes) -> str:
    with pytest.raises(WireError) as err:
        decode_body(body)
    return err.value.reason


def _arrays(dtype: str) -> st.SearchStrategy[np.ndarray]:
    return hnp.arrays(np.dtype(dtype), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5))


TENSORS = st.dictionaries(
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=12).filter(lambda n: not n.startswith("__")),
    st.sampled_from(DTYPES).flatmap(_arrays),
    max_size=6,
)


# -- writing ---------------------------------------------------------------------------------------
@given(TENSORS)
def test_write_is_byte_identical_to_safetensors_save(tensors: dict[str, np.ndarray]) -> None:
    assert b"".join(stlayout.write(tensors)) == st_save(tensors)


def test_write_every_dtype_and_layout_like_safetensors() -> None:
    rng = np.random.default_rng(0)
    tensors = {
        f"t_{name}": (rng.standard_normal((3, 4)) * 50).astype(name) for name in DTYPES
    } | {
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 7), np.float64),
        "transposed": np.arange(12, dtype=np.int32).reshape(3, 4).T,  # not C-contiguous: copied
        "big_endian": np.arange(5, dtype=">f4"),  # written little-endian, as safetensors does
        "strided": np.arange(20, dtype=np.int16)[::3],
    }  # fmt: skip
    # safetensors 0.8's numpy save reads a non-contiguous array's memory as if it were contiguous
    # (it writes [0, 1, 2, ...] for arange(20)[::3]); we write the array's values
    contiguous = {k: v.copy(order="C") for k, v in tensors.items()}
    assert b"".join(stlayout.write(tensors)) == st_save(contiguous)
    one = {"nmoe.codec.a": "fp16"}
    assert b"".join(stlayout.write(tensors, one)) == st_save(contiguous, metadata=one)
    # safetensors keeps metadata in a hash map (any order); we sort it: same bytes but that order
    meta = {"nmoe.codec.a": "fp16", "zeta": "1", "alpha": "int8:0.5"}
    ours, theirs = b"".join(stlayout.write(tensors, meta)), st_save(contiguous, metadata=meta)
    assert len(ours) == len(theirs) and stlayout.read_header(ours) == stlayout.read_header(theirs)
    assert ours[stlayout.read_header(ours)[1] :] == theirs[stlayout.read_header(theirs)[1] :]
    decoded = decode_body(b"".join(stlayout.write(tensors)))
    assert all(np.array_equal(decoded[k], v) for k, v in tensors.items())


def test_write_does_not_copy_contiguous_arrays() -> None:
    a = np.arange(1000, dtype=np.float32)
    parts = stlayout.write({"a": a})
    assert np.shares_memory(np.frombuffer(parts[1], np.float32), a)


# -- reading ---------------------------------------------------------------------------------------
@given(TENSORS)
def test_read_is_bit_identical_to_safetensors_load(tensors: dict[str, np.ndarray]) -> None:
    body = st_save(tensors)
    ours = decode_body(body)
    theirs = st_load(body)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert _same(ours[name], theirs[name]) and ours[name].flags.writeable


@pytest.mark.parametrize("compression", ["none", "fp16", "int8"])
def test_compressed_round_trip_matches_safetensors(compression: str) -> None:
    rng = np.random.default_rng(1)
    tensors = {"w": rng.standard_normal((64, 33)).astype(np.float32), "ids": np.arange(9, dtype=np.int64),
               "big": np.array([1e6, -3.0], np.float32)}  # fmt: skip
    body, saved = encode_body(tensors, compression)
    raw, meta = stlayout.read(bytearray(body), max_tensors=16)
    theirs = st_load(body)
    assert raw.keys() == theirs.keys() and all(_same(raw[k], theirs[k]) for k in theirs)
    restored = decode_body(body)
    assert all(restored[k].dtype == tensors[k].dtype and restored[k].shape == tensors[k].shape for k in tensors)
    if compression == "none":
        assert saved == 0 and not meta and all(_same(restored[k], tensors[k]) for k in tensors)
    else:
        assert saved > 0 and meta


def test_arrays_are_views_of_a_writable_body_and_copies_of_a_read_only_one() -> None:
    body = st_save({"a": np.arange(6, dtype=np.float32), "b": np.ones(3, np.int8)})
    owned = bytearray(body)
    tensors = decode_body(owned)
    assert all(np.shares_memory(np.frombuffer(owned, np.uint8), a) for a in tensors.values())
    tensors["a"] += 1  # callers may update in place
    copied = decode_body(body)
    assert copied["a"].flags.writeable and not np.shares_memory(np.frombuffer(body, np.uint8), copied["a"])


def test_misaligned_tensor_is_copied_to_an_aligned_array() -> None:
    header = {"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
              "b": {"dtype": "F64", "shape": [1], "data_offsets": [3, 11]}}  # fmt: skip
    data = b"\x01\x02\x03" + np.float64(7.5).tobytes()
    tensors = decode_body(_body(header, data))
    assert tensors["b"].flags.aligned and tensors["b"][0] == 7.5


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("header", "data", "reason"),
    [
        ({"w": F32}, b"\0" * 7, "bad_body"),  # data shorter than the offsets
        ({"w": F32}, b"\0" * 9, "bad_body"),  # a trailing byte no tensor covers
        ({"w": {**F32, "data_offsets": [1, 9]}}, b"\0" * 9, "bad_body"),  # a gap before the first
        ({"w": F32, "v": {**F32, "data_offsets": [4, 12]}}, b"\0" * 12, "bad_body"),  # overlapping
        ({"w": F32, "v": {**F32, "data_offsets": [12, 20]}}, b"\0" * 20, "bad_body"),  # a gap between
        ({"w": {**F32, "data_offsets": [0, 12]}}, b"\0" * 12, "bad_body"),  # size != prod(shape) * 4
        ({"w": {**F32, "data_offsets": [8, 0]}}, b"\0" * 8, "bad_body"),  # end before begin
        ({"w": {**F32, "data_offsets": [0]}}, b"\0" * 8, "bad_body"),
        ({"w": {**F32, "data_offsets": [0, True]}}, b"\0" * 8, "bad_body"),
        ({"w": {**F32, "shape": [-2]}}, b"\0" * 8, "bad_body"),
        ({"w": {**F32, "shape": [2.0]}}, b"\0" * 8, "bad_body"),
        ({"w": {**F32, "shape": "2"}}, b"\0" * 8, "bad_body"),
        ({"w": {**F32, "shape": [1] * 65}}, b"\0" * 4, "bad_body"),
        ({"w": {**F32, "shape": [2**40] * 9}}, b"\0" * 8, "bad_body"),  # product past the data, stops early
        ({"w": {**F32, "shape": [0, 2**62], "data_offsets": [0, 0]}}, b"", "bad_body"),  # numpy cannot hold it
        ({"w": {**F32, "shape": [0, 2**70], "data_offsets": [0, 0]}}, b"", "bad_body"),
        ({"w": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "bad_body"),  # no dtype
        ({"w": {**F32, "dtype": 32}}, b"\0" * 8, "bad_body"),
        ({"w": {**F32, "dtype": "BF16", "shape": [4]}}, b"\0" * 8, "bad_dtype"),
        ({"w": {**F32, "dtype": "U16", "shape": [4]}}, b"\0" * 8, "bad_dtype"),
        ({"w": {**F32, "dtype": "F8_E4M3", "shape": [8]}}, b"\0" * 8, "bad_dtype"),
        ({"w": {**F32, "dtype": "zz"}}, b"\0" * 8, "bad_dtype"),
        ({"w": [1, 2]}, b"", "bad_body"),
        ([F32], b"\0" * 8, "bad_body"),
        ({"__metadata__": {"a": 1}, "w": F32}, b"\0" * 8, "bad_body"),
        ({"__metadata__": ["a"], "w": F32}, b"\0" * 8, "bad_body"),
        ({"__metadata__": {"nmoe.codec.v": "fp16"}, "w": F32}, b"\0" * 8, "bad_body"),  # codec of no tensor
        ({"__metadata__": {"nmoe.codec.w": "fp16"}, "w": F32}, b"\0" * 8, "bad_body"),  # fp16 codec on F32
        ({"w": {**F32, "x": [[[[1]]]]}}, b"\0" * 8, "too_deep"),
    ],
)
def test_malformed_bodies_are_refused(header: Any, data: bytes, reason: str) -> None:
    assert _reason(_body(header, data)) == reason


@given(
    shape=st.lists(st.sampled_from([0, 1, 2, 3, 7, 2**31, 2**62, 2**63, 2**64, 2**70]), max_size=6),
    code=st.sampled_from([*sorted(stlayout.CODES), "BF16"]),
    nbytes=st.integers(0, 64),
)
def test_any_shape_gives_tensors_or_a_wire_error(shape: list[int], code: str, nbytes: int) -> None:
    header = {"w": {"dtype": code, "shape": shape, "data_offsets": [0, nbytes]}}
    try:
        tensors = decode_body(_body(header, bytes(nbytes)))
    except WireError as err:
        assert err.reason in REASONS and err.reason != "decode_error"
    else:
        assert tensors["w"].shape == tuple(shape) and tensors["w"].nbytes == nbytes


def test_malformed_lengths_are_refused() -> None:
    assert _reason(b"\x01\x02") == "bad_body"
    assert _reason((10**9).to_bytes(8, "little") + b"{}") == "bad_body"  # header past the end
    big = b"{" + b" " * (stlayout.MAX_HEADER_BYTES + 1) + b"}"
    assert _reason(_body(big)) == "oversized"
    assert _reason(_body(b"\xff\xfe{}")) == "bad_body"  # not UTF-8
    assert _reason(_body(b"{")) == "bad_body"  # not JSON
    many = {f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(4097)}
    assert _reason(_body(many)) == "oversized"


def test_empty_and_zero_size_tensors() -> None:
    assert decode_body(st_save({})) == {}
    header = {"a": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]},
              "b": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}  # fmt: skip
    tensors = decode_body(_body(header, b"\x05\x06"))
    assert tensors["a"].shape == (0, 3) and tensors["b"].tolist() == [5, 6]


@st.composite
def mutated_bodies(draw: st.DrawFn) -> bytes:
    tensors = draw(TENSORS)
    body = bytearray(st_save(tensors))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(body) - 1))
        body[at] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))]
    return bytes(body)


@given(mutated_bodies())
def test_reader_agrees_with_safetensors_on_mutated_bodies(body: bytes) -> None:
    try:
        theirs = st_load(body)
    except (SafetensorError, KeyError, ValueError, TypeError):  # what it refuses, we refuse too
        theirs = None
    try:
        ours = decode_body(body)
    except WireError as err:
        assert err.reason in REASONS and err.reason != "decode_error"
        # stricter than safetensors only for the dtypes we refuse and the bounds we put on JSON
        assert theirs is None or err.reason in ("bad_dtype", "too_deep", "oversized") or any(
            a.dtype.name not in ALLOWED_DTYPES for a in theirs.values()
        ), err
        return
    assert theirs is not None
    assert ours.keys() == theirs.keys() and all(_same(ours[k], theirs[k]) for k in theirs)


# -- frames ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("nbytes", [0, 100, 5000, 70_000])
@pytest.mark.parametrize("chunk_size", [1024, 4096, 1 << 20])
def test_framed_digest_and_seal_match_the_draft(nbytes: int, chunk_size: int) -> None:
    x = np.arange(nbytes // 4, dtype=np.float32)
    d = draft(kind=Kind.MODEL, run="r", src="client-0", dst="coordinator", tensors={"x": x}, meta={"m": "y" * 900})
    framed = Framed.of(d, chunk_size)
    assert all(isinstance(f, bytearray) for f in framed.frames[: framed.head])
    sha = d.digest()
    x += 1  # the sender's arrays change after the frames are built: what is sent does not
    assert framed.digest() == sha == body_digest(st_save({"x": x - 1}))
    framed.seal(sha)
    reassembler = Reassembler()
    frames = framed.frames
    if len(frames) == 1:
        whole, body = bytes(frames[0]), None
    else:
        done = [reassembler.add("t", "client-0", bytes(f)) for f in frames]
        assert done[:-1] == [None] * (len(frames) - 1) and done[-1] is not None
        whole, body = done[-1].payload, done[-1].body()
    msg = decode(whole, body=body)
    assert msg.header.blake3 == sha and np.array_equal(msg.tensors["x"], x - 1)
    assert msg.tensors["x"].flags.writeable
    assert sum(len(f) for f in frames) == (d.size if len(frames) == 1 else d.size + len(frames) * CHUNK_OVERHEAD)
