"""The message envelope: a fixed binary prefix, a JSON header and a safetensors body.

Frame layout (little-endian), shared by whole messages and chunks (broker/chunks.py)::

    0   4s  magic b"NMOE"
    4   B   protocol version
    5   B   frame type: b"M" whole message, b"C" chunk
    6   H   reserved (0)
    8   16s message id (raw bytes of the 32-hex id)
    24  d   t_model_send   (NaN = not stamped)
    32  d   t_model_arrive (NaN = not stamped)
    40  ... type specific; for "M": u32 header length, the UTF-8 JSON header, the body

The modeled timestamps live in the fixed prefix, not in the JSON, so that the channel emulator
can rewrite them with :func:`restamp` in O(1) work on whole messages and on chunks alike, without
touching the header or the body (the sha256 covers the body only). Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal

import numpy as np

from broker.errors import WireError
from broker.tensors import COMPRESSIONS, Schema, check_finite, decode_body, encode_body
from broker.topics import BROADCAST, Kind, ParsedTopic, is_agent_id, is_destination, is_run_id, parse_kind

PROTOCOL_VERSION = 1
MAGIC = b"NMOE"
FRAME_MESSAGE = ord("M")
FRAME_CHUNK = ord("C")
PREFIX = struct.Struct("<4sBBH16sdd")  # 40 bytes, see module docstring
STAMPS = struct.Struct("<dd")
STAMPS_OFFSET = 24
HEADER_LEN = struct.Struct("<I")
MESSAGE_OVERHEAD = PREFIX.size + HEADER_LEN.size
MAX_HEADER_BYTES = 16 * 1024
MAX_META_BYTES = 8 * 1024
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_STAGE = re.compile(r"^[A-Za-z0-9_.:-]{0,32}$")

MetaValue = str | int | float | bool | None


def new_message_id() -> str:
    return secrets.token_hex(16)


def _bad(detail: str) -> WireError:
    return WireError("bad_header", detail)


def _opt_time(value: object, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _bad(f"{name} must be a finite number or None")
    return float(value)


def _check_meta(meta: object) -> Mapping[str, MetaValue]:
    if not isinstance(meta, Mapping):
        raise _bad("meta must be a mapping")
    for key, value in meta.items():
        if not isinstance(key, str) or not 0 < len(key) <= 64:
            raise _bad(f"meta key {key!r} must be a str of 1..64 chars")
        if isinstance(value, float) and not math.isfinite(value):
            raise _bad(f"meta[{key!r}] is not finite")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
            raise _bad(f"meta[{key!r}] is out of range")
        if value is not None and not isinstance(value, str | int | float | bool):
            raise _bad(f"meta[{key!r}] must be str, int, float, bool or None")
    frozen = MappingProxyType(dict(meta))
    if len(json.dumps(dict(frozen), separators=(",", ":"))) > MAX_META_BYTES:
        raise WireError("oversized", f"meta is over {MAX_META_BYTES} bytes of JSON")
    return frozen


@dataclass(frozen=True)
class Header:
    """Everything about a message except its tensors; validated on construction."""

    kind: Kind
    run: str
    src: str
    dst: str
    id: str
    t_send: float
    sha256: str
    body_len: int
    round: int = -1
    stage: str = ""
    reply_to: str | None = None
    t_model_send: float | None = None
    t_model_arrive: float | None = None
    meta: Mapping[str, MetaValue] = field(default_factory=dict)
    compression: str = "none"
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if self.version != PROTOCOL_VERSION:
            raise WireError("bad_version", f"protocol {self.version!r}, expected {PROTOCOL_VERSION}")
        try:
            object.__setattr__(self, "kind", Kind(self.kind))
        except ValueError:
            raise _bad(f"unknown kind {self.kind!r}") from None
        if not is_run_id(self.run):
            raise _bad(f"invalid run id {self.run!r}")
        if not is_agent_id(self.src):
            raise _bad(f"invalid src {self.src!r}")
        if not is_destination(self.dst):
            raise _bad(f"invalid dst {self.dst!r}")
        if not isinstance(self.id, str) or not _HEX32.fullmatch(self.id):
            raise _bad("id must be 32 lowercase hex chars")
        reply_to = self.reply_to
        if reply_to is not None and (not isinstance(reply_to, str) or not _HEX32.fullmatch(reply_to)):
            raise _bad("reply_to must be a message id or None")
        if isinstance(self.round, bool) or not isinstance(self.round, int) or not -1 <= self.round < 2**31:
            raise _bad(f"round must be an int >= -1, got {self.round!r}")
        if not isinstance(self.stage, str) or not _STAGE.fullmatch(self.stage):
            raise _bad(f"stage must match {_STAGE.pattern}, got {self.stage!r}")
        t_send = _opt_time(self.t_send, "t_send")
        if t_send is None:
            raise _bad("t_send is required")
        object.__setattr__(self, "t_send", t_send)
        object.__setattr__(self, "t_model_send", _opt_time(self.t_model_send, "t_model_send"))
        object.__setattr__(self, "t_model_arrive", _opt_time(self.t_model_arrive, "t_model_arrive"))
        if not isinstance(self.sha256, str) or not _HEX64.fullmatch(self.sha256):
            raise _bad("sha256 must be 64 lowercase hex chars")
        if isinstance(self.body_len, bool) or not isinstance(self.body_len, int) or self.body_len < 0:
            raise _bad("body_len must be a non-negative int")
        if self.compression not in COMPRESSIONS:
            raise _bad(f"unknown compression {self.compression!r}")
        object.__setattr__(self, "meta", _check_meta(self.meta))

    # JSON carries every field but the modeled stamps, which live in the binary prefix.
    _JSON_KEYS = (
        "v", "kind", "run", "src", "dst", "round", "stage", "id", "reply_to",
        "t_send", "sha256", "body_len", "meta", "compression",
    )  # fmt: skip

    def to_json(self) -> bytes:
        obj = {
            "v": self.version, "kind": self.kind.value, "run": self.run, "src": self.src,
            "dst": self.dst, "round": self.round, "stage": self.stage, "id": self.id,
            "reply_to": self.reply_to, "t_send": self.t_send, "sha256": self.sha256,
            "body_len": self.body_len, "meta": dict(self.meta), "compression": self.compression,
        }  # fmt: skip
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_json(cls, raw: bytes, *, t_model_send: float | None, t_model_arrive: float | None) -> Header:
        try:
            obj = json.loads(raw, parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as err:
            raise _bad("header is not valid JSON") from err
        if not isinstance(obj, dict) or set(obj) != set(cls._JSON_KEYS):
            raise _bad("header keys do not match the protocol")
        if obj["v"] != PROTOCOL_VERSION:
            raise WireError("bad_version", f"protocol {obj['v']!r}, expected {PROTOCOL_VERSION}")
        fields: dict[str, Any] = {k: obj[k] for k in cls._JSON_KEYS if k != "v"}
        try:
            return cls(**fields, t_model_send=t_model_send, t_model_arrive=t_model_arrive)
        except TypeError as err:  # e.g. a list where a str belongs, caught by a comparison
            raise _bad(str(err)[:200]) from err


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not allowed in a header")


@dataclass(frozen=True)
class Message:
    """A decoded, validated message as a receiver sees it."""

    header: Header
    tensors: Mapping[str, np.ndarray]
    topic: str
    wire_bytes: int  # bytes on the wire, every chunk frame included
    received_at: float  # receiver wall clock (time.time()) when the last frame arrived

    @property
    def id(self) -> str:
        return self.header.id

    @property
    def src(self) -> str:
        return self.header.src

    @property
    def kind(self) -> Kind:
        return self.header.kind


@dataclass(frozen=True)
class Encoded:
    """A serialized message: its header, the wire bytes and what compression saved."""

    header: Header
    payload: bytes
    saved_bytes: int


@dataclass(frozen=True)
class FrameInfo:
    """What :func:`peek` reads from a frame's fixed prefix (no JSON, no body)."""

    frame: Literal["message", "chunk"]
    msg_id: str
    t_model_send: float | None
    t_model_arrive: float | None
    size: int


def _stamp(value: float | None) -> float:
    return math.nan if value is None else value


def _unstamp(value: float) -> float | None:
    return None if math.isnan(value) else value


def pack_prefix(frame_type: int, msg_id: str, t_model_send: float | None = None,
                t_model_arrive: float | None = None) -> bytes:  # fmt: skip
    return PREFIX.pack(MAGIC, PROTOCOL_VERSION, frame_type, 0, bytes.fromhex(msg_id),
                       _stamp(t_model_send), _stamp(t_model_arrive))  # fmt: skip


def unpack_prefix(payload: bytes | memoryview) -> tuple[int, str, float | None, float | None]:
    """(frame type, message id, t_model_send, t_model_arrive), checking magic and version."""
    if len(payload) < PREFIX.size:
        if bytes(payload[: len(MAGIC)]) != MAGIC[: len(payload)]:
            raise WireError("bad_magic", "not an nmoe frame")
        raise WireError("truncated", f"{len(payload)} bytes is shorter than the frame prefix")
    magic, version, ftype, _reserved, raw_id, t_send, t_arrive = PREFIX.unpack_from(payload)
    if magic != MAGIC:
        raise WireError("bad_magic", "not an nmoe frame")
    if version != PROTOCOL_VERSION:
        raise WireError("bad_version", f"protocol {version}, expected {PROTOCOL_VERSION}")
    if ftype not in (FRAME_MESSAGE, FRAME_CHUNK):
        raise WireError("bad_header", f"unknown frame type {ftype}")
    return ftype, raw_id.hex(), _unstamp(t_send), _unstamp(t_arrive)


def peek(payload: bytes | memoryview) -> FrameInfo:
    """Read a frame's type, message id and modeled stamps in O(1) (for the channel emulator)."""
    ftype, msg_id, t_send, t_arrive = unpack_prefix(payload)
    kind: Literal["message", "chunk"] = "message" if ftype == FRAME_MESSAGE else "chunk"
    return FrameInfo(kind, msg_id, t_send, t_arrive, len(payload))


def restamp(
    payload: bytes, *, t_model_send: float | None = None, t_model_arrive: float | None = None
) -> bytes:
    """A copy of a frame (message or chunk) with its modeled stamps set; None keeps a stamp as is."""
    _ftype, _id, old_send, old_arrive = unpack_prefix(payload)
    for name, value in (("t_model_send", t_model_send), ("t_model_arrive", t_model_arrive)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be finite")
    new_send = old_send if t_model_send is None else t_model_send
    new_arrive = old_arrive if t_model_arrive is None else t_model_arrive
    out = bytearray(payload)
    STAMPS.pack_into(out, STAMPS_OFFSET, _stamp(new_send), _stamp(new_arrive))
    return bytes(out)


def draft(
    *,
    kind: Kind | str,
    run: str,
    src: str,
    dst: str,
    tensors: Mapping[str, np.ndarray] | None = None,
    round: int = -1,
    stage: str = "",
    meta: Mapping[str, MetaValue] | None = None,
    reply_to: str | None = None,
    msg_id: str | None = None,
    t_send: float | None = None,
    compression: str = "none",
    finite: bool = True,
) -> Draft:
    """Serialize a message except for its body hash (see :class:`Draft`); WireError if invalid."""
    body, saved = encode_body(tensors or {}, compression, finite=finite)
    header = Header(
        kind=parse_kind(kind),
        run=run, src=src, dst=dst, id=msg_id or new_message_id(),
        t_send=time.time() if t_send is None else t_send, sha256=_UNHASHED,
        body_len=len(body), round=round, stage=stage, reply_to=reply_to, meta=meta or {},
        compression=compression,
    )  # fmt: skip
    head = header.to_json()
    if len(head) > MAX_HEADER_BYTES:
        raise WireError("oversized", f"header is {len(head)} bytes")
    template = b"".join((pack_prefix(FRAME_MESSAGE, header.id), HEADER_LEN.pack(len(head)), head))
    # "sha256" is the first JSON key that could hold that text (the ones before it are validated ids)
    sha_at = template.index(b'"sha256":"') + len(b'"sha256":"')
    return Draft(header, body, saved, len(template), template, sha_at)


def encode(
    *,
    kind: Kind | str,
    run: str,
    src: str,
    dst: str,
    tensors: Mapping[str, np.ndarray] | None = None,
    round: int = -1,
    stage: str = "",
    meta: Mapping[str, MetaValue] | None = None,
    reply_to: str | None = None,
    msg_id: str | None = None,
    t_send: float | None = None,
    compression: str = "none",
    finite: bool = True,
) -> Encoded:
    """Serialize one message (see :func:`draft`). Raises WireError on anything a receiver rejects."""
    d = draft(
        kind=kind, run=run, src=src, dst=dst, tensors=tensors, round=round, stage=stage, meta=meta,
        reply_to=reply_to, msg_id=msg_id, t_send=t_send, compression=compression, finite=finite,
    )  # fmt: skip
    return d.finish(d.digest())


_UNHASHED = "0" * 64


@dataclass(frozen=True)
class Draft:
    """A message serialized but for the sha256 of its body.

    The hash sits in the JSON header, whose length does not depend on it, so every byte from
    ``body_offset`` on is final: a sender may publish the chunks that hold only body bytes while
    the hash is computed (off the event loop), and the header's chunks after it.
    """

    header: Header
    body: bytes
    saved_bytes: int
    body_offset: int
    template: bytes = field(repr=False)  # the bytes before the body, with a placeholder hash
    sha_at: int = field(repr=False)  # where the hash's 64 hex digits go in ``template``

    def digest(self) -> str:
        return hashlib.sha256(self.body).hexdigest()

    def head(self, sha256: str = _UNHASHED) -> bytes:
        """The frame's bytes before the body: prefix, header length and JSON header."""
        if not _HEX64.fullmatch(sha256):
            raise _bad("sha256 must be 64 lowercase hex chars")
        return b"".join((self.template[: self.sha_at], sha256.encode(), self.template[self.sha_at + 64 :]))

    def payload(self, sha256: str = _UNHASHED) -> bytes:
        return self.head(sha256) + self.body

    def finish(self, sha256: str) -> Encoded:
        return Encoded(replace(self.header, sha256=sha256), self.payload(sha256), self.saved_bytes)


def check_topic(header: Header, expect: ParsedTopic) -> None:
    """The header must name the same src, dst and kind as the topic it arrived on.

    One exception: the channel emulator relays a broadcast (header dst ``all``) to each receiver's
    own inbox, so a header addressed to ``all`` may arrive on ``rx/<agent>/...``.
    """
    relayed_broadcast = header.dst == BROADCAST and expect.direction == "rx"
    dst_ok = header.dst == expect.dst or relayed_broadcast
    if not dst_ok or (header.src, header.kind) != (expect.src, expect.kind):
        raise WireError(
            "topic_mismatch",
            f"header {header.src}->{header.dst}/{header.kind.value} on topic "
            f"{expect.src}->{expect.dst}/{expect.kind.value}",
        )


def decode(
    payload: bytes,
    *,
    topic: str = "",
    expect: ParsedTopic | None = None,
    run_id: str | None = None,
    schema: Schema | None = None,
    max_bytes: int = 64 * 1024 * 1024,
    wire_bytes: int | None = None,
    received_at: float | None = None,
    stamps: tuple[float | None, float | None] | None = None,
    body: bytes | None = None,
) -> Message:
    """Validate and decode a whole-message frame; every rejection is a WireError with a reason.

    ``expect`` (the parsed topic) makes src/dst/kind agreement mandatory; ``stamps`` overrides the
    modeled timestamps (the reassembler passes those of the chunks); ``body``, when given, is the
    frame's body apart from ``payload`` (then only the bytes before it).
    """
    size = len(payload) + (0 if body is None else len(body))
    if size > max_bytes:
        raise WireError("oversized", f"{size} bytes > {max_bytes}")
    ftype, msg_id, t_model_send, t_model_arrive = unpack_prefix(payload)
    if ftype != FRAME_MESSAGE:
        raise WireError("bad_header", "a chunk frame is not a message")
    if len(payload) < MESSAGE_OVERHEAD:
        raise WireError("truncated", "no header length")
    (head_len,) = HEADER_LEN.unpack_from(payload, PREFIX.size)
    if head_len > MAX_HEADER_BYTES:
        raise WireError("bad_header", f"header length {head_len} > {MAX_HEADER_BYTES}")
    body_at = MESSAGE_OVERHEAD + head_len
    if len(payload) < body_at:
        raise WireError("truncated", "header cut short")
    if stamps is not None:
        t_model_send, t_model_arrive = stamps
    header = Header.from_json(
        payload[MESSAGE_OVERHEAD:body_at], t_model_send=t_model_send, t_model_arrive=t_model_arrive
    )
    if header.id != msg_id:
        raise WireError("bad_header", "header id differs from the frame id")
    if run_id is not None and header.run != run_id:
        raise WireError("topic_mismatch", f"run {header.run!r} on a topic of run {run_id!r}")
    if expect is not None:
        check_topic(header, expect)
    if body is not None and len(payload) != body_at:
        raise WireError("bad_header", "header and body split at the wrong offset")
    view = memoryview(payload)[body_at:] if body is None else memoryview(body)
    if len(view) < header.body_len:
        raise WireError("truncated", f"body has {len(view)} of {header.body_len} bytes")
    if len(view) > header.body_len:
        raise WireError("bad_header", f"body has {len(view)} bytes, header says {header.body_len}")
    if hashlib.sha256(view).hexdigest() != header.sha256:
        raise WireError("hash_mismatch", header.id)
    tensors = decode_body(bytes(view) if body is None else body)
    check_finite(tensors)
    if schema is not None:
        schema.check(tensors)
    return Message(
        header=header,
        tensors=MappingProxyType(tensors),
        topic=topic,
        wire_bytes=size if wire_bytes is None else wire_bytes,
        received_at=time.time() if received_at is None else received_at,
    )
