"""Held bodies: with ``channel.relay: headers`` a body crosses the broker once, the channel only releases it.

A sender publishes each frame it would have put on the air (a whole message or one chunk, the
same bytes) straight to the receiver on ``held/<dst>/<src>/<kind>``, and one small *announce* on
``tx/<src>/<dst>/<kind>`` to the channel emulator, which submits every frame the announce lists to
its link model as if the body were there (the model uses the size only). When the model delivers
(or drops) a frame, the emulator publishes a *release* on ``rx/<dst>/<src>/<kind>``: the frame's
message id, chunk index, size, the message's blake3, and the two modeled stamps (or "lost").
The receiver's :class:`HoldBuffer` keeps a body until its release arrives (either may come first),
checks the size, and hands the frame on to the ordinary decoder (chunk reassembly and all checks
unchanged) with the release's stamps standing for those in its prefix, where the emulator of the
full relay writes them (broker/envelope.py's ``STAMPS_OFFSET``; :meth:`Ready.stamped`). The blake3
a release carries must be the same for every frame of a message and equal the blake3 in the
decoded message's header, which the decoder checks against the body (:meth:`HoldBuffer.verify`):
so what reaches the application is exactly the message the channel modeled, with no second hash
of the bytes.

Messages under ``held_min_bytes`` (a ChannelConfig and BusConfig setting) are relayed whole, as with
``relay: bodies``: for a small message the announce and release cost more than the second crossing.

Who sent what stays proven by the broker's ACL: an agent may write held bodies only under its own
name (``held/+/<id>/#``) and, with an emulated channel, no ``rx/`` topic at all: only the channel
account publishes releases. A body without a release never reaches the application.

Frames (little-endian, after the 40-byte prefix of broker/envelope.py with frame type ``A`` or ``R``)::

    announce  u32 n, n x (16s message id, 32s blake3, 32s dst (NUL-padded), B kind, u32 chunk index,
              u32 frame size, d age: seconds the header waited at the sender)
    release   u32 n, n x (16s message id, 32s blake3, B kind, u32 index, u32 size, d t_send,
              d t_arrive, B lost)

Both are batches. A sender's session announces the frames of a send right behind them on its
connection, without waiting for the broker's acknowledgements (MQTT keeps a connection's order, so
the broker has a body before the emulator hears of it), and the headers queued while its previous
announce awaits the broker together in the next one, in order; the emulator puts each frame on the
air *as of* its age before the announce left (modeled time never goes back: at the latest of that
and the model's clock), so waiting costs no modeled time. The emulator sends the releases of one
(src, dst) link that fall due while its previous release frame awaits the broker as one release
frame. Kinds are indices into :class:`broker.topics.Kind`; the topic of an announce names the
sender (the ACL proves it) and that of a release the sender and the receiver of every frame in it.

Both are bounded (:data:`MAX_ENTRIES` entries, exact lengths) before anything is read, and hold no
JSON. The hold buffer is bounded per sender in bodies, bytes and waiting releases, with a timeout;
everything it refuses is counted by reason through ``on_reject``, and nothing it handles raises.
"""

from __future__ import annotations

import math
import struct
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

from broker.chunks import read_chunk
from broker.envelope import FRAME_CHUNK, MAGIC, PREFIX, STAMPS, STAMPS_OFFSET, pack_prefix, unpack_prefix
from broker.header import PROTOCOL_VERSION
from broker.topics import Kind, ParsedTopic, Topics, is_destination
from nmoe.errors import WireError

FRAME_ANNOUNCE = ord("A")
FRAME_RELEASE = ord("R")
MAX_ENTRIES = 4096  # frames per announce or release (a sender splits longer lists)
_COUNT = struct.Struct("<I")
_ANNOUNCE_ENTRY = struct.Struct("<16s32s32sBIId")
_RELEASE_ENTRY = struct.Struct("<16s32sBIIddB")
KINDS: tuple[Kind, ...] = tuple(Kind)
_KIND_INDEX = {k: i for i, k in enumerate(KINDS)}
MAX_AGE_S = 10.0  # an announce older than this at the sender is put on the air as of 10 s ago

REASONS = (
    "bad_announce", "bad_release", "release_mismatch", "release_unmatched", "release_duplicate",
    "release_overflow", "hold_duplicate", "hold_overflow", "hold_expired",
)  # fmt: skip
"""Why the hold buffer (or the emulator, for ``bad_announce``) refused something."""


@dataclass(frozen=True)
class Announce:
    """A sender's header for one frame it published on ``held/<dst>/<src>/<kind>``."""

    msg_id: str
    blake3: str
    dst: str
    kind: Kind
    index: int
    size: int
    age_s: float = 0.0  # how long the header waited at the sender before its announce was sent


@dataclass(frozen=True)
class Release:
    """The channel's verdict on one held frame, for one receiver."""

    msg_id: str
    blake3: str
    kind: Kind
    index: int
    size: int
    t_send: float
    t_arrive: float
    lost: bool = False


def _check_prefix(payload: bytes | memoryview, want: int, reason: str) -> None:
    if len(payload) < PREFIX.size:
        raise WireError(reason, f"{len(payload)} bytes is shorter than the frame prefix")
    magic, version, ftype, _reserved, _raw_id, _a, _b = PREFIX.unpack_from(payload)
    if magic != MAGIC or version != PROTOCOL_VERSION or ftype != want:
        raise WireError(reason, "not a frame of this type")


def _entries(payload: bytes, entry: struct.Struct, reason: str) -> Iterator[tuple[Any, ...]]:
    """The fixed-size entries of a batch frame, after checking its count against its exact length."""
    if len(payload) < PREFIX.size + _COUNT.size:
        raise WireError(reason, "cut short")
    (n,) = _COUNT.unpack_from(payload, PREFIX.size)
    start = PREFIX.size + _COUNT.size
    if not 1 <= n <= MAX_ENTRIES or len(payload) != start + n * entry.size:
        raise WireError(reason, f"{n} entries in {len(payload)} bytes")
    return entry.iter_unpack(memoryview(payload)[start:])


def _kind(index: int, reason: str) -> Kind:
    if index >= len(KINDS):
        raise WireError(reason, f"unknown kind {index}")
    return KINDS[index]


def frame_type(payload: bytes | bytearray | memoryview) -> int | None:
    """The frame type byte of an nmoe frame (None when it is not one)."""
    if len(payload) < PREFIX.size or bytes(payload[:4]) != MAGIC:
        return None
    return payload[5]


def pack_announces(entries: Sequence[Announce]) -> list[bytes]:
    """Announce frames for ``entries`` (in order; a new frame every MAX_ENTRIES)."""
    out = []
    for start in range(0, len(entries), MAX_ENTRIES):
        part = entries[start : start + MAX_ENTRIES]
        body = [_ANNOUNCE_ENTRY.pack(bytes.fromhex(a.msg_id), bytes.fromhex(a.blake3), a.dst.encode(),
                                     _KIND_INDEX[a.kind], a.index, a.size, a.age_s) for a in part]  # fmt: skip
        out.append(b"".join((pack_prefix(FRAME_ANNOUNCE, part[0].msg_id), _COUNT.pack(len(part)), *body)))
    return out


def read_announce(payload: bytes) -> list[Announce]:
    """Parse an announce; WireError('bad_announce') unless every entry is well formed."""
    _check_prefix(payload, FRAME_ANNOUNCE, "bad_announce")
    out = []
    for raw_id, digest, raw_dst, kind, index, size, age in _entries(payload, _ANNOUNCE_ENTRY, "bad_announce"):
        dst = raw_dst.rstrip(b"\0").decode("ascii", errors="replace")
        if not is_destination(dst):
            raise WireError("bad_announce", f"bad destination {dst[:32]!r}")
        if size < PREFIX.size:
            raise WireError("bad_announce", "a frame is shorter than its prefix")
        age = min(max(age, 0.0), MAX_AGE_S) if math.isfinite(age) else 0.0  # a sender cannot move the clock far
        out.append(Announce(raw_id.hex(), digest.hex(), dst, _kind(kind, "bad_announce"), index, size, age))
    return out


def pack_releases(releases: Sequence[Release]) -> bytes:
    """One release frame for up to MAX_ENTRIES releases (all of one link: one sender, one receiver)."""
    if not 1 <= len(releases) <= MAX_ENTRIES:
        raise ValueError(f"1..{MAX_ENTRIES} releases per frame, got {len(releases)}")
    parts = [pack_prefix(FRAME_RELEASE, releases[0].msg_id), _COUNT.pack(len(releases))]
    for r in releases:
        parts.append(_RELEASE_ENTRY.pack(bytes.fromhex(r.msg_id), bytes.fromhex(r.blake3), _KIND_INDEX[r.kind],
                                         r.index, r.size, r.t_send, r.t_arrive, int(r.lost)))  # fmt: skip
    return b"".join(parts)


def read_releases(payload: bytes) -> list[Release]:
    """Parse a release frame; WireError('bad_release') unless every entry is well formed."""
    _check_prefix(payload, FRAME_RELEASE, "bad_release")
    out = []
    for raw_id, digest, kind, index, size, t_send, t_arrive, lost in _entries(payload, _RELEASE_ENTRY, "bad_release"):
        if lost not in (0, 1) or not (lost or (math.isfinite(t_send) and math.isfinite(t_arrive))):
            raise WireError("bad_release", "a delivered frame needs finite stamps")
        out.append(Release(raw_id.hex(), digest.hex(), _kind(kind, "bad_release"), index, size, t_send, t_arrive,
                           bool(lost)))  # fmt: skip
    return out


@dataclass(frozen=True)
class HoldLimits:
    """Bounds of one receiver's hold buffer, per sender (a flood only costs the flooder)."""

    max_bodies_per_source: int = 4096
    """Held frames of one sender awaiting their release; over it, its oldest go (``hold_overflow``)."""
    max_bytes_per_source: int = 128 * 1024 * 1024
    """Bytes of one sender's held frames; a frame alone over it is ``oversized``."""
    max_releases_per_source: int = 4096
    """Releases from one sender's link waiting for their body; more are ``release_overflow``."""
    timeout_s: float = 600.0
    """A body unreleased (``hold_expired``) or a release without its body (``release_unmatched``)
    this long is dropped (checked at most every :attr:`HoldBuffer.check_every_s`); generous, since
    the model may hold a frame for its whole modeled transfer."""
    settled_window: int = 65536
    """Frames remembered after their release, to tell a duplicate from a new frame."""
    body_grace_s: float = 10.0
    """A release whose body has not come this long, while a later frame of the same link is ready
    (its body and its release both here), is dropped (``release_unmatched``) and the link goes on.
    A sender publishes a body before its announce on one connection, and the broker delivers one
    sender's publishes in order, so such a body was lost in the broker (one killed with the body
    still queued for its receiver, say); without this the link would wait ``timeout_s``."""

    def __post_init__(self) -> None:
        for name in ("max_bodies_per_source", "max_bytes_per_source", "max_releases_per_source", "settled_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not (self.timeout_s > 0 and self.body_grace_s > 0):
            raise ValueError("timeout_s and body_grace_s must be > 0")


@dataclass(frozen=True)
class Ready:
    """A released frame for the decoder, as if the full relay had delivered it on ``topic`` with
    ``stamps`` (modeled send, arrival) in its prefix: the decoder takes them instead of the prefix's,
    which saves a copy of the frame (:meth:`stamped` makes that copy, for other uses)."""

    topic: str
    parsed: ParsedTopic
    frame: bytes
    stamps: tuple[float, float]

    def stamped(self) -> bytes:
        """The frame with the stamps written where the full relay writes them."""
        out = bytearray(self.frame)
        STAMPS.pack_into(out, STAMPS_OFFSET, *self.stamps)
        return bytes(out)


_Key = tuple[str, Kind, str, int]  # src, kind, message id, chunk index


@dataclass
class _Body:
    payload: bytes
    dst: str
    since: float


class HoldBuffer:
    """One receiver's held bodies and the releases waiting for them; never raises on input."""

    def __init__(
        self,
        topics: Topics,
        limits: HoldLimits | None = None,
        on_reject: Callable[[WireError, str], None] = lambda err, topic: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topics = topics
        self.limits = limits or HoldLimits()
        self._reject, self._clock = on_reject, clock
        self._bodies: OrderedDict[_Key, _Body] = OrderedDict()  # oldest first
        self._by_source: dict[str, OrderedDict[_Key, None]] = {}
        self._source_bytes: dict[str, int] = {}
        # releases per sender's link, in order: (release, kind, arrival time, the receiver it names)
        self._queues: dict[str, deque[tuple[Release, Kind, float, str]]] = {}
        self._queued: set[_Key] = set()  # keys of the releases in _queues
        self._settled: OrderedDict[_Key, bool] = OrderedDict()  # True: delivered, False: lost or refused
        self._expected: OrderedDict[tuple[str, str], str] = OrderedDict()  # (src, msg id) -> blake3
        self.lost = 0
        """Frames the channel reported lost (the model's drops; not a rejection)."""
        self.check_every_s = min(1.0, self.limits.timeout_s / 16, self.limits.body_grace_s / 4)
        """How often input checks for expiry (a timeout is late by at most this much; :meth:`expire`
        itself always checks). An owner that wants timeouts kept without input calls
        :meth:`expire` this often while :attr:`waiting`."""
        self._expire_next = -math.inf

    @property
    def held(self) -> int:
        return len(self._bodies)

    @property
    def waiting(self) -> bool:
        """Whether any body awaits its release or any release its body (something may expire)."""
        return bool(self._bodies or self._queued)

    def held_bytes(self, src: str) -> int:
        return self._source_bytes.get(src, 0)

    def pending(self) -> list[tuple[str, str, str, int, int]]:
        """(src, kind, message id, chunk index, size) of every frame held, oldest first."""
        return [(k[0], k[1].value, k[2], k[3], len(b.payload)) for k, b in self._bodies.items()]

    # -- input -----------------------------------------------------------------------------------
    def body(self, parsed: ParsedTopic, topic: str, payload: bytes) -> list[Ready]:
        """A frame arrived on ``held/<dst>/<src>/<kind>``: hold it; what it unblocks comes back."""
        now = self._clock()
        out = self._expire_due(now)
        try:
            key = self._body_key(parsed, payload)
        except WireError as err:
            self._reject(err, topic)
            return out
        src = parsed.src
        if key in self._settled:
            if self._settled[key]:
                self._reject(WireError("hold_duplicate", f"frame {key[3]} of {key[2]} was released already"), topic)
            return out  # a body the channel lost (its release overtook it) is dropped quietly
        if key in self._bodies:
            self._reject(WireError("hold_duplicate", f"frame {key[3]} of {key[2]} is held already"), topic)
            return out
        lim = self.limits
        if len(payload) > lim.max_bytes_per_source:
            self._reject(WireError("oversized", f"{len(payload)} bytes > {lim.max_bytes_per_source} per sender"),
                         topic)  # fmt: skip
            return out
        mine = self._by_source.setdefault(src, OrderedDict())
        while mine and (len(mine) >= lim.max_bodies_per_source
                        or self._source_bytes.get(src, 0) + len(payload) > lim.max_bytes_per_source):  # fmt: skip
            oldest = next(iter(mine))
            self._drop_body(oldest)
            self._settle(oldest, False)
            self._reject(WireError("hold_overflow", f"{src} is over its hold budget"), topic)
        self._bodies[key] = _Body(payload, parsed.dst, now)
        mine[key] = None
        self._source_bytes[src] = self._source_bytes.get(src, 0) + len(payload)
        return out + self._drain(src, now)

    def release(self, parsed: ParsedTopic, topic: str, payload: bytes) -> list[Ready]:
        """A release frame arrived on ``rx/<dst>/<src>/<kind>``; the frames it frees come back in order."""
        now = self._clock()
        out = self._expire_due(now)
        try:
            releases = read_releases(payload)
        except WireError as err:
            self._reject(err, topic)
            return out
        src = parsed.src
        queue = self._queues.setdefault(src, deque())
        for rel in releases:
            key = (src, rel.kind, rel.msg_id, rel.index)
            if key in self._settled or key in self._queued:
                self._reject(WireError("release_duplicate", f"frame {rel.index} of {rel.msg_id} again"), topic)
            elif len(queue) >= self.limits.max_releases_per_source:
                self._reject(WireError("release_overflow", f"over {len(queue)} releases wait for {src}"), topic)
            else:
                queue.append((rel, rel.kind, now, parsed.dst))
                self._queued.add(key)
        return out + self._drain(src, now)

    def verify(self, src: str, msg_id: str, blake3: str) -> bool:
        """Whether a decoded message is the one the channel released (True when none was held)."""
        expected = self._expected.pop((src, msg_id), None)
        return expected is None or expected == blake3

    def expire(self, now: float | None = None) -> list[Ready]:
        """Drop what waited too long; frames a dropped release was blocking come back."""
        now = self._clock() if now is None else now
        cutoff = now - self.limits.timeout_s
        while self._bodies:
            key, body = next(iter(self._bodies.items()))
            if body.since > cutoff:
                break
            self._drop_body(key)
            self._settle(key, False)
            self._reject(WireError("hold_expired", f"frame {key[3]} of {key[2]} from {key[0]} never released"), "")
        out: list[Ready] = []
        for src, queue in self._queues.items():
            stale = False
            while queue and queue[0][2] <= cutoff and _key_of(src, queue[0][1], queue[0][0]) not in self._bodies:
                rel, kind, _t, _dst = queue.popleft()
                self._queued.discard(_key_of(src, kind, rel))
                self._settle(_key_of(src, kind, rel), False)
                stale = True
                if not rel.lost:
                    self._reject(WireError("release_unmatched", f"no body for frame {rel.index} of {rel.msg_id}"), "")
            if stale or (queue and queue[0][2] <= now - self.limits.body_grace_s):
                out += self._drain(src, now)  # (a release past its grace may give way)
        return out

    # -- internals -------------------------------------------------------------------------------
    def _expire_due(self, now: float) -> list[Ready]:
        if now < self._expire_next:
            return []
        self._expire_next = now + self.check_every_s
        return self.expire(now)

    def _body_key(self, parsed: ParsedTopic, payload: bytes) -> _Key:
        return (parsed.src, parsed.kind, *_frame_id(payload))

    def _drain(self, src: str, now: float) -> list[Ready]:
        """Hand on, in release order, every frame of ``src``'s link whose release and body are both here."""
        queue = self._queues.get(src)
        out: list[Ready] = []
        while queue:
            rel, kind, _t, dst = queue[0]
            key = _key_of(src, kind, rel)
            body = self._bodies.get(key)
            if rel.lost:
                queue.popleft()
                self._queued.discard(key)
                if body is not None:
                    self._drop_body(key)
                self._settle(key, False)
                self.lost += 1
                continue
            if body is None:
                if now - queue[0][2] < self.limits.body_grace_s or not self._later_ready(src, queue):
                    break  # its body is still on its way: later releases of this link wait (FIFO)
                queue.popleft()  # lost in the broker (see HoldLimits.body_grace_s)
                self._queued.discard(key)
                self._settle(key, False)
                self._reject(WireError("release_unmatched", f"no body for frame {rel.index} of {rel.msg_id}, "
                                       "while later frames of its link are here"), "")  # fmt: skip
                continue
            queue.popleft()
            self._queued.discard(key)
            self._drop_body(key)
            ok = self._settle_digest(src, rel)
            if len(body.payload) != rel.size or not ok:
                self._settle(key, False)
                what = "size" if ok else "digest"
                self._reject(WireError("release_mismatch", f"frame {rel.index} of {rel.msg_id}: {what} differs"),
                             self.topics.rx(body.dst, src, kind))  # fmt: skip
                continue
            self._settle(key, True)
            # as the full relay delivers it: on the release's topic (a broadcast on each receiver's own)
            topic = self.topics.rx(dst, src, kind)
            out.append(Ready(topic, self.topics.parse(topic), body.payload, (rel.t_send, rel.t_arrive)))
        return out

    def _later_ready(self, src: str, queue: deque[tuple[Release, Kind, float, str]]) -> bool:
        """Whether one of the next releases (up to 64) behind the head of ``src``'s link has its body."""
        return any(_key_of(src, kind, rel) in self._bodies for rel, kind, _t, _dst in islice(queue, 1, 65))

    def _settle_digest(self, src: str, rel: Release) -> bool:
        key = (src, rel.msg_id)
        known = self._expected.get(key)
        if known is None:
            self._expected[key] = rel.blake3
            if len(self._expected) > self.limits.settled_window:
                self._expected.popitem(last=False)
            return True
        return known == rel.blake3

    def _drop_body(self, key: _Key) -> None:
        body = self._bodies.pop(key)
        src = key[0]
        self._by_source[src].pop(key, None)
        self._source_bytes[src] -= len(body.payload)

    def _settle(self, key: _Key, delivered: bool) -> None:
        self._settled[key] = delivered
        if len(self._settled) > self.limits.settled_window:
            self._settled.popitem(last=False)


def _key_of(src: str, kind: Kind, rel: Release) -> _Key:
    return (src, kind, rel.msg_id, rel.index)


def announce_frames(frames: Iterable[bytes | bytearray]) -> list[tuple[int, int]]:
    """(chunk index, size) of each frame a sender publishes, for its announce."""
    return [(_frame_id(frame)[1], len(frame)) for frame in frames]


def _frame_id(frame: bytes | bytearray) -> tuple[str, int]:
    """(message id, chunk index) of a frame, read once (WireError when it is not a frame)."""
    if frame_type(frame) == FRAME_CHUNK:
        info = read_chunk(frame)
        return info.msg_id, info.index
    return unpack_prefix(frame)[1], 0


__all__ = [
    "FRAME_ANNOUNCE", "FRAME_RELEASE", "KINDS", "MAX_AGE_S", "MAX_ENTRIES", "REASONS", "Announce", "HoldBuffer",
    "HoldLimits", "Ready", "Release", "announce_frames", "frame_type", "pack_announces", "pack_releases",
    "read_announce", "read_releases",
]  # fmt: skip
