"""Chunking: a serialized message larger than the chunk size travels as several MQTT publishes.

A chunk frame shares the 40-byte prefix of broker/envelope.py (magic, version, type ``C``, message
id, modeled stamps), then ``u32 index, u32 total, u64 total_len`` and a slice of the whole-message
frame. So the channel emulator reads a chunk's id/index/total with :func:`read_chunk` and rewrites
its modeled stamps with ``envelope.restamp`` exactly as for a whole message.

The :class:`Reassembler` is bounded: bytes per message, pending messages (in all and per source),
pending bytes, and an expiry; chunks of one message must arrive on one topic. A reassembled
message's modeled stamps are the earliest chunk send and the latest chunk arrival.
"""

from __future__ import annotations

import math
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from broker.envelope import FRAME_CHUNK, HEADER_LEN, MESSAGE_OVERHEAD, PREFIX, pack_prefix, unpack_prefix
from nmoe.errors import WireError

CHUNK = struct.Struct("<IIQ")  # index, total, total_len
CHUNK_OVERHEAD = PREFIX.size + CHUNK.size
MIN_CHUNK_SIZE = 1024
MAX_CHUNKS = 1 << 20


def chunk_count(size: int, chunk_size: int) -> int:
    """How many frames a whole-message frame of ``size`` bytes travels as (1: not chunked)."""
    if chunk_size < MIN_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be >= {MIN_CHUNK_SIZE}, got {chunk_size}")
    return 1 if size <= chunk_size else math.ceil(size / (chunk_size - CHUNK_OVERHEAD))


def covering(offset: int, size: int, chunk_size: int) -> range:
    """Indices of the frames holding any byte before ``offset`` (e.g. the header's)."""
    total = chunk_count(size, chunk_size)
    if total == 1:
        return range(1)
    return range(min(total, math.ceil(offset / (chunk_size - CHUNK_OVERHEAD))))


def split(
    payload: bytes, msg_id: str, chunk_size: int, only: Iterable[int] | None = None, *, tail: bytes = b""
) -> list[bytes]:
    """The frames to publish for one whole-message frame: itself, or chunks of <= chunk_size bytes.

    The frame is ``payload + tail`` (a sender passes header and body apart to save a copy);
    ``only`` selects some chunk indices (in that order); by default all are returned.
    """
    size = len(payload) + len(tail)
    total = chunk_count(size, chunk_size)
    if total == 1:
        return [payload + tail if tail else payload]
    step = chunk_size - CHUNK_OVERHEAD
    prefix = pack_prefix(FRAME_CHUNK, msg_id)
    head, rest, cut = memoryview(payload), memoryview(tail), len(payload)
    frames = []
    for i in range(total) if only is None else only:
        a, b = i * step, min((i + 1) * step, size)
        pieces = (head[a:b], rest[max(0, a - cut) : max(0, b - cut)])
        frames.append(b"".join((prefix, CHUNK.pack(i, total, size), *pieces)))
    return frames


@dataclass(frozen=True)
class ChunkInfo:
    msg_id: str
    index: int
    total: int
    total_len: int
    t_model_send: float | None
    t_model_arrive: float | None


def read_chunk(payload: bytes | memoryview) -> ChunkInfo:
    """Parse a chunk frame's fixed fields (WireError if it is not a well-formed chunk)."""
    ftype, msg_id, t_send, t_arrive = unpack_prefix(payload)
    if ftype != FRAME_CHUNK:
        raise WireError("bad_chunk", "not a chunk frame")
    if len(payload) < CHUNK_OVERHEAD:
        raise WireError("truncated", "chunk header cut short")
    index, total, total_len = CHUNK.unpack_from(payload, PREFIX.size)
    if not 2 <= total <= MAX_CHUNKS or index >= total or total > total_len:
        raise WireError("bad_chunk", f"index {index} of {total} for {total_len} bytes")
    return ChunkInfo(msg_id, index, total, total_len, t_send, t_arrive)


@dataclass(frozen=True)
class ReassemblyLimits:
    """Bounds that keep a chunk storm from exhausting a receiver's memory."""

    max_message_bytes: int = 64 * 1024 * 1024  # one reassembled message
    max_pending_messages: int = 64  # incomplete messages, all sources together
    max_pending_per_source: int = 16  # incomplete messages from one sender
    max_pending_bytes: int = 256 * 1024 * 1024  # bytes held by incomplete messages
    expiry_s: float = 30.0  # an incomplete message idle this long is dropped

    def __post_init__(self) -> None:
        counts = ("max_message_bytes", "max_pending_messages", "max_pending_per_source", "max_pending_bytes")
        for name in counts:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.expiry_s > 0:
            raise ValueError("expiry_s must be > 0")


@dataclass
class _Pending:
    src: str
    total: int
    total_len: int
    parts: dict[int, memoryview] = field(default_factory=dict)
    size: int = 0
    frames_bytes: int = 0
    t_send: float | None = None
    t_arrive: float | None = None
    touched: float = 0.0


@dataclass(frozen=True)
class Assembled:
    """A whole-message frame rebuilt from chunks: ``payload`` and, when found, ``body`` apart.

    Handing the body over as its own bytes saves the decoder a copy of it.
    """

    payload: bytes
    body: bytes | None
    wire_bytes: int
    stamps: tuple[float | None, float | None]


def _join_split(parts: list[memoryview], total_len: int) -> tuple[bytes, bytes | None]:
    """Join chunk data into (head, body) at the frame's body offset, or (whole, None)."""
    first = parts[0]
    if len(first) < MESSAGE_OVERHEAD:
        return b"".join(parts), None
    cut = MESSAGE_OVERHEAD + HEADER_LEN.unpack_from(first, PREFIX.size)[0]
    if cut > total_len:
        return b"".join(parts), None
    head: list[memoryview] = []
    body: list[memoryview] = []
    at = 0
    for part in parts:
        if at + len(part) <= cut:
            head.append(part)
        elif at >= cut:
            body.append(part)
        else:
            head.append(part[: cut - at])
            body.append(part[cut - at :])
        at += len(part)
    return b"".join(head), b"".join(body)


def _min(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


class Reassembler:
    """Rebuilds chunked messages within fixed bounds; ``add`` raises WireError on a bad chunk."""

    def __init__(self, limits: ReassemblyLimits | None = None, clock: Callable[[], float] = time.monotonic):
        self.limits = limits or ReassemblyLimits()
        self._clock = clock
        self._pending: OrderedDict[tuple[str, str], _Pending] = OrderedDict()  # least recent first
        self._settled: OrderedDict[tuple[str, str], None] = OrderedDict()  # rebuilt or rejected
        self._bytes = 0

    @property
    def pending_messages(self) -> int:
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._pending.pop(key, None)
        if entry is not None:
            self._bytes -= entry.size

    def expire(self, now: float | None = None) -> int:
        """Drop incomplete messages idle for longer than the expiry; returns how many."""
        now = self._clock() if now is None else now
        expired = 0
        while self._pending:  # least recently touched first
            key, entry = next(iter(self._pending.items()))
            if now - entry.touched <= self.limits.expiry_s:
                break
            self._drop(key)
            expired += 1
        return expired

    def _finish(self, key: tuple[str, str]) -> None:
        """Remember a message as settled (rebuilt or rejected): its later chunks are ignored."""
        self._drop(key)
        self._settled[key] = None
        if len(self._settled) > 4 * self.limits.max_pending_messages + 256:
            self._settled.popitem(last=False)

    def add(self, topic: str, src: str, payload: bytes) -> Assembled | None:
        """Take one chunk frame; returns the whole message once its last chunk is in.

        A message is rejected once (WireError); its remaining chunks are then dropped silently,
        and so are QoS 1 redeliveries of chunks of a message already rebuilt.
        """
        info = read_chunk(payload)
        key = (topic, info.msg_id)
        if key in self._settled:
            return None
        try:
            return self._add(key, src, info, payload)
        except WireError:
            self._finish(key)
            raise

    def _add(self, key: tuple[str, str], src: str, info: ChunkInfo, payload: bytes) -> Assembled | None:
        lim = self.limits
        if info.total_len > lim.max_message_bytes:
            raise WireError("oversized", f"{info.total_len} bytes announced > {lim.max_message_bytes}")
        entry = self._pending.get(key)
        if entry is None:
            if len(self._pending) >= lim.max_pending_messages:
                raise WireError("chunk_overflow", f"{len(self._pending)} messages pending")
            if sum(1 for p in self._pending.values() if p.src == src) >= lim.max_pending_per_source:
                raise WireError("chunk_overflow", f"too many pending messages from {src}")
            entry = _Pending(src, info.total, info.total_len, touched=self._clock())
            self._pending[key] = entry
        elif (entry.total, entry.total_len) != (info.total, info.total_len):
            raise WireError("bad_chunk", f"chunks of {info.msg_id} disagree on their count or length")
        if info.index in entry.parts:
            return None
        data = memoryview(payload)[CHUNK_OVERHEAD:]
        if entry.size + len(data) > entry.total_len:
            raise WireError("bad_chunk", f"chunks of {info.msg_id} exceed the announced length")
        if self._bytes + len(data) > lim.max_pending_bytes:
            raise WireError("chunk_overflow", f"{self._bytes} bytes pending")
        entry.parts[info.index] = data
        entry.size += len(data)
        entry.frames_bytes += len(payload)
        self._bytes += len(data)
        entry.t_send = _min(entry.t_send, info.t_model_send)
        entry.t_arrive = _max(entry.t_arrive, info.t_model_arrive)
        entry.touched = self._clock()
        self._pending.move_to_end(key)
        if len(entry.parts) < entry.total:
            return None
        self._finish(key)
        if entry.size != entry.total_len:
            raise WireError("bad_chunk", f"chunks of {info.msg_id} do not add up to the announced length")
        head, body = _join_split([entry.parts[i] for i in range(entry.total)], entry.total_len)
        return Assembled(head, body, entry.frames_bytes, (entry.t_send, entry.t_arrive))
