"""The wire format in one import: envelope, chunks, tensor schemas, and the receiving Decoder.

Sending::

    enc = encode(kind=Kind.UPDATE, run="r1", src="client-0", dst="coordinator", tensors={"w": w})
    for frame in split(enc.payload, enc.header.id, chunk_size):
        publish(topics.rx("coordinator", "client-0", Kind.UPDATE), frame)

Receiving: ``Decoder.feed(topic, payload)`` returns a validated :class:`Message`, or None while a
chunked message is incomplete or when the frame was rejected; rejections never raise, they are
counted per reason in ``Decoder.rejected`` and logged.

Relaying (the channel emulator): :func:`peek` / :func:`read_chunk` read a frame's id, chunk index
and modeled stamps from its fixed prefix; :func:`restamp` rewrites the stamps; neither touches the
JSON header or the body.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from broker.chunks import (
    CHUNK_OVERHEAD,
    MIN_CHUNK_SIZE,
    Assembled,
    ChunkInfo,
    Framed,
    Reassembler,
    ReassemblyLimits,
    chunk_count,
    covering,
    join_parts,
    read_chunk,
    split,
)
from broker.envelope import (
    FRAME_CHUNK,
    Draft,
    Encoded,
    FrameInfo,
    Message,
    check_topic,
    decode,
    draft,
    encode,
    new_message_id,
    peek,
    restamp,
    unpack_prefix,
)
from broker.header import MAX_META_BYTES, PROTOCOL_VERSION, Header, MetaValue
from broker.held import REASONS as HELD_REASONS
from broker.tensors import ANY, COMPRESSIONS, Schema, TensorSpec, check_finite
from broker.topics import Direction, Kind, ParsedTopic, Topics
from nmoe.errors import WireError

__all__ = [
    "ANY", "CHUNK_OVERHEAD", "COMPRESSIONS", "MAX_META_BYTES", "MIN_CHUNK_SIZE", "PROTOCOL_VERSION",
    "REASONS", "Assembled", "ChunkInfo", "DecodeJob", "DecodePipeline", "Decoder", "Draft",
    "Encoded", "FrameInfo", "Framed", "Header", "Message", "MetaValue", "Reassembler", "ReassemblyLimits",
    "Schema", "TensorSpec", "WireError", "check_finite", "check_topic", "chunk_count", "covering",
    "decode", "draft", "encode", "new_message_id", "peek", "read_chunk", "restamp", "split",
]  # fmt: skip

log = logging.getLogger(__name__)

# Every reason a received frame can be rejected for (the keys of Decoder.rejected).
REASONS = (
    "bad_magic", "truncated", "bad_header", "bad_version", "bad_topic", "topic_mismatch",
    "hash_mismatch", "bad_body", "missing_tensor", "unexpected_tensor", "bad_dtype", "bad_shape",
    "non_finite", "oversized", "too_deep", "bad_chunk", "chunk_overflow", "chunk_expired",
    "decode_error", *HELD_REASONS,
)  # fmt: skip
_LOUD_PER_REASON = 10  # log the first rejections of each reason as warnings, the rest at debug


@dataclass(frozen=True)
class DecodeJob:
    """A whole frame ready for the expensive checks (hash, body, schema); ``run`` is thread-safe."""

    frame: bytes
    topic: str
    expect: ParsedTopic
    run_id: str
    schema: Schema | None
    max_bytes: int
    wire_bytes: int | None
    received_at: float | None
    stamps: tuple[float | None, float | None] | None
    body_parts: tuple[memoryview, ...] | None = None  # the body apart from ``frame`` (reassembled messages)

    @property
    def size(self) -> int:
        return len(self.frame) + (0 if self.body_parts is None else sum(len(p) for p in self.body_parts))

    def run(self) -> Message:
        with _contained(self.topic):
            body = None if self.body_parts is None else join_parts(self.body_parts)  # here: off the loop
            return decode(
                self.frame, topic=self.topic, expect=self.expect, run_id=self.run_id, schema=self.schema,
                max_bytes=self.max_bytes, wire_bytes=self.wire_bytes, received_at=self.received_at,
                stamps=self.stamps, body=body,
            )  # fmt: skip


@contextmanager
def _contained(topic: str) -> Iterator[None]:
    """Turn any exception but a WireError into WireError('decode_error'), logged with its traceback.

    The decoders raise only WireError on purpose; anything else is a bug they did not foresee, and
    must cost the one message that caused it, counted, rather than the receiver's connection.
    """
    try:
        yield
    except WireError:
        raise
    except Exception as err:
        log.exception("decoding a frame on %s raised %s", topic or "?", type(err).__name__)
        raise WireError("decode_error", f"{type(err).__name__}: {err}"[:200]) from err


class Decoder:
    """Validates what one receiver hears; one per bus session (or channel emulator).

    ``schemas`` maps a kind to the tensors expected for it; kinds without a schema accept any
    tensors that pass the generic checks (dtype whitelist, finiteness, size limits).
    """

    def __init__(
        self,
        topics: Topics,
        *,
        schemas: Mapping[Kind, Schema] | None = None,
        limits: ReassemblyLimits | None = None,
        direction: Direction = "rx",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.topics = topics
        self.schemas = {Kind(k): v for k, v in (schemas or {}).items()}
        self.limits = limits or ReassemblyLimits()
        self.direction = direction
        self.rejected: Counter[str] = Counter()
        self.reassembler = Reassembler(self.limits, clock, on_drop=self.reject)

    def reject(self, err: WireError, topic: str = "") -> None:
        """Count and log one rejection."""
        self.rejected[err.reason] += 1
        level = logging.WARNING if self.rejected[err.reason] <= _LOUD_PER_REASON else logging.DEBUG
        log.log(level, "rejected frame on %s: %s", topic or "?", err)

    def expire(self) -> int:
        """Drop stale incomplete messages, counting each as ``chunk_expired``."""
        n = self.reassembler.expire()
        for _ in range(n):
            self.reject(WireError("chunk_expired", "incomplete message dropped"))
        return n

    def feed(self, topic: str, payload: bytes, *, received_at: float | None = None) -> Message | None:
        """Decode one MQTT publish; None while incomplete or when rejected (and counted)."""
        job = self.accept(topic, payload, received_at=received_at)
        if job is None:
            return None
        try:
            return job.run()
        except WireError as err:
            self.reject(err, topic)
            return None

    def accept(
        self, topic: str, payload: bytes, *, received_at: float | None = None, parsed: ParsedTopic | None = None,
        stamps: tuple[float, float] | None = None,
    ) -> DecodeJob | None:
        """The cheap part of decoding (topic, framing, reassembly): a job for a whole frame, or None.

        ``parsed`` saves parsing the topic again when the caller already did; ``stamps`` stand for
        the modeled stamps in the frame's prefix (a held frame's release carries them).
        """
        try:
            with _contained(topic):
                return self._accept(topic, payload, received_at, parsed, stamps)
        except WireError as err:
            self.reject(err, topic)
            return None

    def _accept(
        self, topic: str, payload: bytes, received_at: float | None, parsed: ParsedTopic | None,
        given: tuple[float, float] | None = None,
    ) -> DecodeJob | None:
        self.expire()
        parsed = parsed or self.topics.parse(topic)
        if parsed.direction != self.direction:
            raise WireError("bad_topic", f"expected a {self.direction} topic")
        frame: bytes = payload
        body: tuple[memoryview, ...] | None = None
        wire_bytes: int | None = None
        stamps: tuple[float | None, float | None] | None = given
        if unpack_prefix(payload)[0] == FRAME_CHUNK:
            done = self.reassembler.add(topic, parsed.src, payload, given)
            if done is None:
                return None
            frame, body, wire_bytes, stamps = done.payload, done.body_parts, done.wire_bytes, done.stamps
        elif len(payload) > self.limits.max_message_bytes:
            raise WireError("oversized", f"{len(payload)} bytes > {self.limits.max_message_bytes}")
        return DecodeJob(
            frame, topic, parsed, self.topics.run_id, self.schemas.get(parsed.kind),
            self.limits.max_message_bytes, wire_bytes, received_at, stamps, body,
        )  # fmt: skip


OFFLOAD_BYTES = 4 << 20
"""Frames this big or bigger are decoded in :class:`DecodePipeline`'s worker thread."""


class DecodePipeline:
    """In-order decoding that keeps very big frames off the event loop.

    Frames of at least ``offload_bytes`` are hashed and parsed in one worker thread (BLAKE3 and
    numpy release the GIL), so the loop keeps reading the socket meanwhile; smaller frames are
    decoded inline. Messages reach ``deliver`` in arrival order either way.

    The threshold is high (4 MiB: about 1.5 ms of decoding on the loop) because a hand-over is
    not free: the worker's wake-up, its completion through the loop's self-pipe and the GIL passed
    back and forth cost more than decoding a frame of a few MiB inline. Measured on a 2-core
    machine with 1 MiB messages (bench/bus_throughput.py's trials, alternating, quiet machine),
    offloading them took 18-22 % more CPU and 14-25 % more wall time per message than decoding
    them on the loop (docs/SCALE.md, "Fourth pass").
    """

    def __init__(
        self, decoder: Decoder, deliver: Callable[[Message], None], *, offload_bytes: int = OFFLOAD_BYTES
    ) -> None:
        self.decoder = decoder
        self.deliver = deliver
        self.offload_bytes = offload_bytes
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nmoe-decode")
        self._queue: deque[tuple[str, asyncio.Future[Message]]] = deque()
        self._drainer: asyncio.Task[None] | None = None

    def feed(
        self, topic: str, payload: bytes, *, received_at: float | None = None, parsed: ParsedTopic | None = None,
        stamps: tuple[float, float] | None = None,
    ) -> None:
        job = self.decoder.accept(topic, payload, received_at=received_at, parsed=parsed, stamps=stamps)
        if job is None:
            return
        big = job.size >= self.offload_bytes
        if not big and not self._queue:  # nothing ahead of it: decode right here
            try:
                msg = job.run()
            except WireError as err:
                self.decoder.reject(err, topic)
                return
            self.deliver(msg)
            return
        loop = asyncio.get_running_loop()
        if big:
            fut = loop.run_in_executor(self._pool, job.run)
        else:
            fut = loop.create_future()
            try:
                fut.set_result(job.run())
            except WireError as err:
                fut.set_exception(err)
        self._queue.append((topic, fut))
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())

    async def _drain(self) -> None:
        while self._queue:
            topic, fut = self._queue[0]
            try:
                msg = await fut
            except WireError as err:
                self.decoder.reject(err, topic)
            else:
                self.deliver(msg)
            finally:
                self._queue.popleft()

    def close(self) -> None:
        if self._drainer is not None:
            self._drainer.cancel()
        for _topic, fut in self._queue:
            fut.cancel()
        self._queue.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
