"""The safetensors layout, written as segments and read in place: no copy of the tensors' bytes.

safetensors' own ``save`` builds the whole file (a copy of every tensor) and its ``load`` copies every
tensor out again, and a message body went through both on every send. Here a sender gets the file as
segments, the header and memoryviews of the tensors' own bytes, which broker/chunks.py copies once,
into the frames it publishes; a receiver reads the tensors with ``np.frombuffer`` over the body it
reassembled. The bytes are the ones ``safetensors.numpy.save`` writes (same header JSON, tensor order
and padding; tests/test_stlayout.py compares them), so any safetensors reader can read a body and
this reader reads any safetensors file of the allowed dtypes.

:func:`read` checks what safetensors checks before it hands out a tensor, and bounds the header
before parsing it: the header length against the body and a size limit, the JSON's size and depth
(broker/jsonlimits.py), every entry a dtype, shape and offsets of the right types, the dtype one of
the allowed ones (``bad_dtype`` otherwise), the offsets in order without overlap or gap and covering
the data exactly, and each tensor's bytes its element count times its item size. Anything else is a
``WireError('bad_body')``.

The arrays :func:`read` returns are views of the body. They are writable when the body is (a
``bytearray``: what broker/chunks.py reassembles and what :func:`broker.tensors.decode_body` copies a
read-only body into), and they keep the whole body alive as long as any of them is.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from broker.jsonlimits import loads_bounded
from nmoe.errors import WireError

# safetensors dtype code -> numpy dtype name, for the dtypes a message may carry
CODES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "F16": "float16", "I32": "int32",
    "F32": "float32", "F64": "float64", "I64": "int64",
}  # fmt: skip
_CODE_OF = {name: code for code, name in CODES.items()}
# safetensors writes tensors by dtype, in the descending order of its Dtype enum, then by name
_RANK = {code: i for i, code in enumerate(("BOOL", "U8", "I8", "I16", "F16", "I32", "F32", "F64", "I64"))}
_DTYPES = {code: np.dtype(name).newbyteorder("<") for code, name in CODES.items()}
MAX_HEADER_BYTES = 4 * 1024 * 1024  # see broker/tensors.py: 4096 tensors' entries and codecs fit
MAX_HEADER_DEPTH = 4  # root, tensor entry, shape (and one to spare)
MAX_DIMS = 64  # numpy's own limit
_LEN = 8  # the u64 header length before the JSON

Segment = bytes | memoryview


def write(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> list[Segment]:
    """The safetensors file of ``tensors`` as segments: the header, then each tensor's bytes (views).

    The caller has checked names and dtypes (broker/tensors.py); an array that is not C-contiguous
    little-endian is copied into one that is, any other is not copied at all.
    """
    arrays = []
    for name, a in tensors.items():
        code = _CODE_OF[a.dtype.name]
        arrays.append((name, code, np.asarray(a, dtype=_DTYPES[code], order="C")))
    arrays.sort(key=lambda t: (-_RANK[t[1]], t[0]))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    at = 0
    views: list[Segment] = []
    for name, code, a in arrays:
        header[name] = {"dtype": code, "shape": list(a.shape), "data_offsets": [at, at + a.nbytes]}
        at += a.nbytes
        if a.nbytes:
            views.append(a.reshape(-1).view(np.uint8).data)
    try:
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError as err:  # a lone surrogate in a name
        raise WireError("bad_body", f"tensor name is not UTF-8: {err}"[:200]) from None
    raw += b" " * (-len(raw) % 8)
    return [len(raw).to_bytes(_LEN, "little") + raw, *views]


def _bad(detail: str) -> WireError:
    return WireError("bad_body", detail[:200])


def _uint(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(body: bytes | bytearray | memoryview) -> tuple[dict[str, object], int]:
    """The parsed JSON header (bounded before parsing) and the offset where the data starts."""
    if len(body) < _LEN:
        raise _bad("shorter than a safetensors header")
    n = int.from_bytes(body[:_LEN], "little")
    if n > len(body) - _LEN:
        raise _bad(f"safetensors header length {n} is past the body's end")
    if n > MAX_HEADER_BYTES:
        raise WireError("oversized", f"safetensors header is {n} bytes > {MAX_HEADER_BYTES}")
    header = loads_bounded(
        bytes(body[_LEN : _LEN + n]), what="safetensors header", max_bytes=MAX_HEADER_BYTES,
        max_depth=MAX_HEADER_DEPTH, invalid="bad_body",
    )  # fmt: skip
    if not isinstance(header, dict):
        raise _bad("safetensors header is not an object")
    return header, _LEN + n


def read(
    body: bytes | bytearray | memoryview, *, max_tensors: int
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; the tensors are views of ``body`` (see the module)."""
    header, start = read_header(body)
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _bad("safetensors metadata must map str to str")
    if len(header) > max_tensors:
        raise WireError("oversized", f"{len(header)} tensors > {max_tensors}")
    data_len = len(body) - start
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise _bad(f"{name}: entry is not an object")
        code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(code, str):
            raise _bad(f"{name}: dtype is not a string")
        if code not in CODES:
            raise WireError("bad_dtype", f"{name}: {code[:32]!r} is not accepted")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_uint(d) for d in shape):
            raise _bad(f"{name}: shape must be a list of at most {MAX_DIMS} non-negative ints")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_uint(o) for o in offsets):
            raise _bad(f"{name}: data_offsets must be two non-negative ints")
        begin, end = offsets
        count = 0 if 0 in shape else 1
        for d in shape if count else ():  # stops once past the data: no huge product of a hostile shape
            count *= d
            if count > data_len:
                raise _bad(f"{name}: shape {shape[:8]} is larger than the body")
        if end < begin or end - begin != count * _DTYPES[code].itemsize:
            raise _bad(f"{name}: data_offsets {offsets} do not hold {count} {CODES[code]}")
        entries.append((begin, end, name, code, tuple(shape), count))
    entries.sort(key=lambda e: (e[0], e[1]))
    at = 0
    for begin, end, name, *_ in entries:
        if begin != at:
            raise _bad(f"{name}: data_offsets overlap or leave a gap (at {begin}, expected {at})")
        at = end
    if at != data_len:
        raise _bad(f"tensors cover {at} of the body's {data_len} data bytes")
    tensors: dict[str, np.ndarray] = {}
    for begin, _end, name, code, dims, count in entries:
        dtype = _DTYPES[code]
        try:
            if count == 0:  # e.g. (0, 2**62): numpy refuses a dimension it cannot address
                a = np.zeros(dims, dtype)
            else:
                a = np.frombuffer(body, dtype, count, start + begin).reshape(dims)
                if not a.flags.aligned:  # only a hand-made body puts a tensor off its alignment
                    a = a.copy()
        except ValueError as err:
            raise _bad(f"{name}: shape {list(dims[:8])}: {err}") from None
        tensors[name] = a
    return tensors, meta
