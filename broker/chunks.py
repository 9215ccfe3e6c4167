"""Chunking: a serialized message larger than the chunk size travels as several MQTT publishes.

A chunk frame shares the 40-byte prefix of broker/envelope.py (magic, version, type ``C``, message
id, modeled stamps), then ``u32 index, u32 total, u64 total_len`` and a slice of the whole-message
frame. So the channel emulator reads a chunk's id/index/total with :func:`read_chunk` and rewrites
its modeled stamps with ``envelope.restamp`` exactly as for a whole message.

The :class:`Reassembler` is bounded: bytes per message, pending messages and bytes per sender (the
budgets that matter) and in all (a backstop), and an expiry; chunks of one message must arrive on
one topic. A sender over its budget loses its own oldest incomplete messages, so a sender flooding
never-completed chunks only hurts itself; when the backstop is reached, the sender holding the most
loses its oldest. Every message dropped so is counted as ``chunk_overflow``. A reassembled message's
modeled stamps are the earliest chunk send and the latest chunk arrival.
"""

from __future__ import annotations

import bisect
import itertools
import math
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from broker.envelope import (
    FRAME_CHUNK,
    HEADER_LEN,
    MESSAGE_OVERHEAD,
    PREFIX,
    Draft,
    body_hasher,
    pack_prefix,
    unpack_prefix,
)
from nmoe.errors import WireError

CHUNK = struct.Struct("<IIQ")  # index, total, total_len
CHUNK_OVERHEAD = PREFIX.size + CHUNK.size
MIN_CHUNK_SIZE = 1024
MAX_CHUNKS = 1 << 20
Buffer = bytes | bytearray | memoryview


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
    payload: Buffer,
    msg_id: str,
    chunk_size: int,
    only: Iterable[int] | None = None,
    *,
    tail: Buffer | Sequence[Buffer] = b"",
    writable: Container[int] = (),
) -> list[bytes | bytearray]:
    """The frames to publish for one whole-message frame: itself, or chunks of <= chunk_size bytes.

    The frame is ``payload`` followed by ``tail``, one buffer or several (a sender passes its header
    and the body's segments apart: each byte is copied once, into its frame); ``only`` selects some
    chunk indices (in that order), by default all; the frames whose index is in ``writable`` are
    bytearrays (to be sealed: :class:`Framed`), the others bytes.
    """
    parts = [memoryview(payload).cast("B")]
    parts += [memoryview(p).cast("B") for p in ((tail,) if isinstance(tail, bytes | bytearray | memoryview) else tail)]
    parts = [p for p in parts if len(p)]
    ends = list(itertools.accumulate(len(p) for p in parts))
    size = ends[-1] if ends else 0
    total = chunk_count(size, chunk_size)
    if total == 1:
        if 0 not in writable and isinstance(payload, bytes) and size == len(payload):
            return [payload]
        return [(bytearray() if 0 in writable else b"").join(parts)]
    step = chunk_size - CHUNK_OVERHEAD
    prefix = pack_prefix(FRAME_CHUNK, msg_id)
    frames: list[bytes | bytearray] = []
    for i in range(total) if only is None else only:
        a, b = i * step, min((i + 1) * step, size)
        pieces: list[Buffer] = [prefix, CHUNK.pack(i, total, size)]
        k = bisect.bisect_right(ends, a)  # the first part ending after a
        while k < len(parts) and ends[k] - len(parts[k]) < b:
            start = ends[k] - len(parts[k])
            pieces.append(parts[k][max(0, a - start) : min(len(parts[k]), b - start)])
            k += 1
        frames.append((bytearray() if i in writable else b"").join(pieces))
    return frames


def place(offset: int, size: int, chunk_size: int) -> tuple[int, int, int]:
    """Where byte ``offset`` of a whole-message frame of ``size`` bytes travels: (frame index,
    position in that frame, bytes of the message that frame holds from there on)."""
    if chunk_count(size, chunk_size) == 1:
        return 0, offset, size - offset
    step = chunk_size - CHUNK_OVERHEAD
    index, within = divmod(offset, step)
    return index, CHUNK_OVERHEAD + within, min(step, size - index * step) - within


@dataclass
class Framed:
    """A drafted message (broker/envelope.py ``Draft``) cut into the frames it travels as, every
    byte final but the body's blake3 in the header: publish ``frames[head:]`` while :meth:`digest`
    hashes the body as it stands in the frames (off the event loop: BLAKE3 releases the GIL), then
    :meth:`seal` writes the hash into ``frames[:head]`` (bytearrays) and those go out.

    The body is copied once, from the draft's segments into the frames, before anything can yield,
    and the hash is taken over those copies: what it covers is exactly what is sent, even should
    the sender's arrays change meanwhile.
    """

    frames: list[bytes | bytearray]
    head: int  # frames[:head] hold header bytes, the hash's included
    size: int  # bytes of the whole-message frame
    body_offset: int
    sha_at: int  # where the hash's 64 hex digits go in the whole-message frame
    chunk_size: int

    @classmethod
    def of(cls, draft: Draft, chunk_size: int) -> Framed:
        size = draft.size
        head = len(covering(draft.body_offset, size, chunk_size))
        frames = split(draft.template, draft.header.id, chunk_size, tail=draft.body_parts, writable=range(head))
        return cls(frames, head, size, draft.body_offset, draft.sha_at, chunk_size)

    def _views(self, start: int, end: int) -> Iterator[memoryview]:
        """The bytes [start, end) of the whole-message frame, as views of the frames holding them."""
        at = start
        while at < end:
            index, pos, left = place(at, self.size, self.chunk_size)
            n = min(left, end - at)
            yield memoryview(self.frames[index])[pos : pos + n]
            at += n

    def digest(self) -> str:
        h = body_hasher()
        for view in self._views(self.body_offset, self.size):
            with view:
                h.update(view)
        return h.hexdigest()

    def seal(self, blake3: str) -> None:
        digits = blake3.encode()
        if len(digits) != 64:
            raise ValueError("a BLAKE3 digest is 64 hex digits")
        done = 0
        for view in self._views(self.sha_at, self.sha_at + 64):
            with view:
                view[:] = digits[done : done + len(view)]
                done += len(view)


@dataclass(frozen=True)
class ChunkInfo:
    msg_id: str
    index: int
    total: int
    total_len: int
    t_model_send: float | None
    t_model_arrive: float | None


def read_chunk(payload: bytes | bytearray | memoryview) -> ChunkInfo:
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
    max_pending_per_source: int = 16  # incomplete messages from one sender (its oldest go first)
    max_pending_bytes_per_source: int = 128 * 1024 * 1024  # bytes of one sender's incomplete messages
    max_pending_messages: int = 64  # backstop, all senders together (the biggest holder loses first)
    max_pending_bytes: int = 256 * 1024 * 1024  # backstop: bytes held by all incomplete messages
    expiry_s: float = 30.0  # an incomplete message idle this long is dropped

    def __post_init__(self) -> None:
        counts = ("max_message_bytes", "max_pending_messages", "max_pending_per_source", "max_pending_bytes",
                  "max_pending_bytes_per_source")
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
    """A whole-message frame rebuilt from chunks: ``payload`` and, when found, the body apart, as
    the slices of the chunks that hold it (``body_parts``).

    :meth:`body` copies those into one writable buffer, with the GIL released (numpy), so that a
    decoder thread can do it off the event loop; the decoder reads the tensors in place from it
    (broker/stlayout.py), and they are writable.
    """

    payload: bytes
    body_parts: tuple[memoryview, ...] | None
    wire_bytes: int
    stamps: tuple[float | None, float | None]

    def body(self) -> memoryview | None:
        return None if self.body_parts is None else join_parts(self.body_parts)


def join_parts(parts: Sequence[memoryview]) -> memoryview:
    """One writable buffer holding ``parts`` one after the other (numpy copies without the GIL)."""
    out = np.empty(sum(len(p) for p in parts), np.uint8)
    at = 0
    for part in parts:
        out[at : at + len(part)] = np.frombuffer(part, np.uint8)
        at += len(part)
    return out.data


def _join_split(parts: list[memoryview], total_len: int) -> tuple[bytes, tuple[memoryview, ...] | None]:
    """Split chunk data into (head, body parts) at the frame's body offset, or (whole, None)."""
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
    return b"".join(head), tuple(body)


def _min(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


class Reassembler:
    """Rebuilds chunked messages within fixed bounds; ``add`` raises WireError on a bad chunk.

    ``on_drop`` hears of every other message dropped to make room (a ``chunk_overflow``).
    """

    def __init__(
        self,
        limits: ReassemblyLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_drop: Callable[[WireError], None] = lambda err: None,
    ) -> None:
        self.limits = limits or ReassemblyLimits()
        self._clock = clock
        self._on_drop = on_drop
        self._pending: OrderedDict[tuple[str, str], _Pending] = OrderedDict()  # least recent first
        self._settled: OrderedDict[tuple[str, str], None] = OrderedDict()  # rebuilt or rejected
        self._bytes = 0
        self._by_source: dict[str, OrderedDict[tuple[str, str], None]] = {}  # least recent first
        self._source_bytes: Counter[str] = Counter()

    @property
    def pending_messages(self) -> int:
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        return self._bytes

    def pending_from(self, src: str) -> tuple[int, int]:
        """(messages, bytes) of ``src``'s incomplete messages."""
        return len(self._by_source.get(src, ())), self._source_bytes[src]

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._pending.pop(key, None)
        if entry is not None:
            self._bytes -= entry.size
            self._source_bytes[entry.src] -= entry.size
            mine = self._by_source[entry.src]
            del mine[key]
            if not mine:
                del self._by_source[entry.src]
                del self._source_bytes[entry.src]

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

    def _evict(self, src: str, keep: tuple[str, str], why: str) -> bool:
        """Drop ``src``'s least recent incomplete message other than ``keep``; False if it has none."""
        victim = next((k for k in self._by_source.get(src, ()) if k != keep), None)
        if victim is None:
            return False
        self._finish(victim)
        self._on_drop(WireError("chunk_overflow", f"{why}: an incomplete message of {src} dropped"))
        return True

    def _biggest(self, by_bytes: bool) -> str:
        """The sender holding the most (bytes or messages) of the backstop's budget."""
        if by_bytes:
            return max(self._source_bytes, key=self._source_bytes.__getitem__)
        return max(self._by_source, key=lambda s: len(self._by_source[s]))

    def _make_room(self, key: tuple[str, str], src: str, nbytes: int) -> None:
        """Evict until ``nbytes`` more of ``key`` (from ``src``) fit; WireError when they cannot."""
        lim = self.limits
        while self._source_bytes[src] + nbytes > lim.max_pending_bytes_per_source:
            if not self._evict(src, key, f"{src} over its {lim.max_pending_bytes_per_source} pending bytes"):
                raise WireError("chunk_overflow", f"one message of {src} exceeds its pending bytes budget")
        while self._bytes + nbytes > lim.max_pending_bytes:
            if not self._evict(self._biggest(True), key, f"{self._bytes} bytes pending"):
                raise WireError("chunk_overflow", f"{self._bytes} bytes pending")

    def _open(self, key: tuple[str, str], src: str, info: ChunkInfo) -> _Pending:
        """A new incomplete message, after its sender (else the biggest holder) made room."""
        lim = self.limits
        while len(self._by_source.get(src, ())) >= lim.max_pending_per_source:
            self._evict(src, key, f"{src} has {lim.max_pending_per_source} messages pending")
        while len(self._pending) >= lim.max_pending_messages:
            self._evict(self._biggest(False), key, f"{len(self._pending)} messages pending")
        entry = _Pending(src, info.total, info.total_len, touched=self._clock())
        self._pending[key] = entry
        self._by_source.setdefault(src, OrderedDict())[key] = None
        return entry

    def add(
        self, topic: str, src: str, payload: bytes, stamps: tuple[float, float] | None = None
    ) -> Assembled | None:
        """Take one chunk frame; returns the whole message once its last chunk is in.

        ``stamps`` (modeled send, arrival) stand for those in the chunk's prefix (a held chunk's
        release carries them: broker/held.py). A message is rejected once (WireError); its remaining
        chunks are then dropped silently, and so are QoS 1 redeliveries of chunks of a message
        already rebuilt.
        """
        info = read_chunk(payload)
        if stamps is not None:  # built anew: dataclasses.replace takes twice as long (once per held chunk)
            info = ChunkInfo(info.msg_id, info.index, info.total, info.total_len, *stamps)
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
            entry = self._open(key, src, info)
        elif (entry.total, entry.total_len) != (info.total, info.total_len):
            raise WireError("bad_chunk", f"chunks of {info.msg_id} disagree on their count or length")
        if info.index in entry.parts:
            return None
        data = memoryview(payload)[CHUNK_OVERHEAD:]
        if entry.size + len(data) > entry.total_len:
            raise WireError("bad_chunk", f"chunks of {info.msg_id} exceed the announced length")
        self._make_room(key, src, len(data))
        entry.parts[info.index] = data
        entry.size += len(data)
        entry.frames_bytes += len(payload)
        self._bytes += len(data)
        self._source_bytes[src] += len(data)
        entry.t_send = _min(entry.t_send, info.t_model_send)
        entry.t_arrive = _max(entry.t_arrive, info.t_model_arrive)
        entry.touched = self._clock()
        self._pending.move_to_end(key)
        self._by_source[src].move_to_end(key)
        if len(entry.parts) < entry.total:
            return None
        self._finish(key)
        if entry.size != entry.total_len:
            raise WireError("bad_chunk", f"chunks of {info.msg_id} do not add up to the announced length")
        head, body = _join_split([entry.parts[i] for i in range(entry.total)], entry.total_len)
        return Assembled(head, body, entry.frames_bytes, (entry.t_send, entry.t_arrive))
