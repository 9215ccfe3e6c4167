"""The tensor body of a message: safetensors bytes, optional compression, receiver-side schemas.

The body is a plain safetensors file, never a pickle, written and read without copying the tensors'
bytes (broker/stlayout.py: the same bytes ``safetensors.numpy.save`` writes). Compression applies to
float32 tensors only and is recorded per tensor in the safetensors metadata
(``nmoe.codec.<name>`` = ``fp16`` or ``int8:<scale>``), so the receiver restores float32 without
any out-of-band agreement. A float32 tensor that does not fit in fp16's range is sent uncompressed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import numpy as np

from broker import stlayout
from nmoe.errors import WireError

Compression = Literal["none", "fp16", "int8"]
COMPRESSIONS: tuple[str, ...] = ("none", "fp16", "int8")
ALLOWED_DTYPES = frozenset(stlayout.CODES.values())
_CODEC_PREFIX = "nmoe.codec."
_FP16_MAX = float(np.finfo(np.float16).max)
MAX_TENSORS = 4096
MAX_NAME_LEN = 256
# The safetensors header is JSON: per tensor a name (<= MAX_NAME_LEN), dtype, shape and offsets, and
# for a compressed one a metadata entry of about the same size: under 4 MiB for MAX_TENSORS. Its
# depth is 3 (root, tensor, shape); more is refused before anything parses it.
MAX_ST_HEADER_BYTES = stlayout.MAX_HEADER_BYTES
MAX_ST_HEADER_DEPTH = stlayout.MAX_HEADER_DEPTH


@dataclass(frozen=True)
class TensorSpec:
    """What a receiver expects of one tensor: dtype name and shape (None = any size); an
    ``optional`` one may be absent (e.g. an expert's logits in a reply that declines the query)."""

    dtype: str
    shape: tuple[int | None, ...]
    optional: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ALLOWED_DTYPES:
            raise ValueError(f"unsupported dtype {self.dtype!r}; use one of {sorted(ALLOWED_DTYPES)}")
        shape = tuple(self.shape)
        if not all(d is None or (isinstance(d, int) and not isinstance(d, bool) and d >= 0) for d in shape):
            raise ValueError(f"shape entries must be non-negative ints or None, got {self.shape!r}")
        object.__setattr__(self, "shape", shape)

    def check(self, name: str, array: np.ndarray) -> None:
        if array.dtype.name != self.dtype:
            raise WireError("bad_dtype", f"{name}: expected {self.dtype}, got {array.dtype.name}")
        if len(array.shape) != len(self.shape) or any(
            want is not None and want != got for want, got in zip(self.shape, array.shape, strict=True)
        ):
            raise WireError("bad_shape", f"{name}: expected {self.shape}, got {tuple(array.shape)}")


@dataclass(frozen=True)
class Schema:
    """The tensors a receiver accepts for one kind of message (checked after decompression)."""

    tensors: Mapping[str, TensorSpec] = field(default_factory=dict)
    allow_extra: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", MappingProxyType(dict(self.tensors)))

    @classmethod
    def like(cls, tensors: Mapping[str, np.ndarray], *, batch_dims: int = 0) -> Schema:
        """A schema matching these arrays; the first ``batch_dims`` dimensions may be any size."""

        def spec(a: np.ndarray) -> TensorSpec:
            dims = tuple(None if i < batch_dims else d for i, d in enumerate(a.shape))
            return TensorSpec(a.dtype.name, dims)

        return cls({name: spec(a) for name, a in tensors.items()})

    def check(self, tensors: Mapping[str, np.ndarray]) -> None:
        for name, spec in self.tensors.items():
            if name not in tensors:
                if spec.optional:
                    continue
                raise WireError("missing_tensor", name)
            spec.check(name, tensors[name])
        if not self.allow_extra:
            extra = sorted(set(tensors) - set(self.tensors))
            if extra:
                raise WireError("unexpected_tensor", ", ".join(extra[:5]))


ANY = Schema(allow_extra=True)


def check_finite(tensors: Mapping[str, np.ndarray]) -> None:
    """Raise WireError('non_finite') if any floating tensor holds NaN or Inf."""
    for name, a in tensors.items():
        if a.dtype.kind == "f" and a.size and not np.isfinite(a).all():
            raise WireError("non_finite", name)


def _check_inputs(tensors: Mapping[str, np.ndarray]) -> None:
    if len(tensors) > MAX_TENSORS:
        raise WireError("oversized", f"{len(tensors)} tensors > {MAX_TENSORS}")
    for name, a in tensors.items():
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN or name.startswith("__"):
            raise WireError("bad_body", f"invalid tensor name {name!r}")
        if not isinstance(a, np.ndarray):
            raise WireError("bad_body", f"{name}: expected a numpy array, got {type(a).__name__}")
        if a.dtype.name not in ALLOWED_DTYPES:
            raise WireError("bad_dtype", f"{name}: {a.dtype.name} is not sendable")


def encode_body_parts(
    tensors: Mapping[str, np.ndarray], compression: str = "none", *, finite: bool = True
) -> tuple[list[stlayout.Segment], int]:
    """Serialize tensors to safetensors segments (the header, then views of the tensors' bytes:
    nothing copied but what compression makes anew); returns (segments, bytes saved by compression)."""
    if compression not in COMPRESSIONS:
        raise WireError("bad_header", f"unknown compression {compression!r}")
    _check_inputs(tensors)
    if finite:
        check_finite(tensors)
    out: dict[str, np.ndarray] = {}
    meta: dict[str, str] = {}
    saved = 0
    for name, a in tensors.items():
        if compression == "none" or a.dtype != np.float32 or a.size == 0:
            out[name] = a
            continue
        peak = float(np.max(np.abs(a)))
        if compression == "fp16" and peak <= _FP16_MAX:
            out[name] = a.astype(np.float16)
            meta[_CODEC_PREFIX + name] = "fp16"
        elif compression == "int8":
            scale = peak / 127.0 if peak > 0 and math.isfinite(peak) else 1.0
            out[name] = np.clip(np.rint(a / np.float32(scale)), -127, 127).astype(np.int8)
            meta[_CODEC_PREFIX + name] = f"int8:{scale!r}"
        else:
            out[name] = a
            continue
        saved += a.nbytes - out[name].nbytes
    return stlayout.write(out, meta or None), saved


def encode_body(
    tensors: Mapping[str, np.ndarray], compression: str = "none", *, finite: bool = True
) -> tuple[bytes, int]:
    """Serialize tensors to safetensors bytes; returns (body, bytes saved by compression)."""
    parts, saved = encode_body_parts(tensors, compression, finite=finite)
    return b"".join(parts), saved


def _restore(name: str, a: np.ndarray, codec: str) -> np.ndarray:
    if codec == "fp16":
        if a.dtype != np.float16:
            raise WireError("bad_body", f"{name}: fp16 codec on {a.dtype.name}")
        return a.astype(np.float32)
    if codec.startswith("int8:"):
        try:
            scale = float(codec[5:])
        except ValueError:
            raise WireError("bad_body", f"{name}: bad int8 scale") from None
        if a.dtype != np.int8 or not (math.isfinite(scale) and scale > 0):
            raise WireError("bad_body", f"{name}: bad int8 codec")
        return a.astype(np.float32) * np.float32(scale)
    raise WireError("bad_body", f"{name}: unknown codec {codec!r}")


def decode_body(body: bytes | bytearray | memoryview) -> dict[str, np.ndarray]:
    """Parse safetensors bytes back to float32-restored numpy arrays (no schema check here).

    The arrays are writable: views of ``body`` when it is a writable buffer (a reassembled
    message's ``bytearray``), else of one copy of it (broker/stlayout.py).
    """
    if memoryview(body).readonly:
        body = bytearray(body)
    tensors, meta = stlayout.read(body, max_tensors=MAX_TENSORS)
    for key, codec in meta.items():
        if not key.startswith(_CODEC_PREFIX):
            continue
        name = key[len(_CODEC_PREFIX) :]
        if name not in tensors:
            raise WireError("bad_body", f"codec for missing tensor {name!r}")
        tensors[name] = _restore(name, tensors[name], codec)
    return tensors
