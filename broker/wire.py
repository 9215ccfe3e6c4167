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

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping

from broker.chunks import (
    CHUNK_OVERHEAD,
    MIN_CHUNK_SIZE,
    Assembled,
    ChunkInfo,
    Reassembler,
    ReassemblyLimits,
    read_chunk,
    split,
)
from broker.envelope import (
    FRAME_CHUNK,
    MAX_META_BYTES,
    PROTOCOL_VERSION,
    Encoded,
    FrameInfo,
    Header,
    Message,
    MetaValue,
    check_topic,
    decode,
    encode,
    new_message_id,
    peek,
    restamp,
    unpack_prefix,
)
from broker.errors import WireError
from broker.tensors import ANY, COMPRESSIONS, Schema, TensorSpec, check_finite
from broker.topics import Direction, Kind, Topics

__all__ = [
    "ANY", "CHUNK_OVERHEAD", "COMPRESSIONS", "MAX_META_BYTES", "MIN_CHUNK_SIZE", "PROTOCOL_VERSION",
    "REASONS", "Assembled", "ChunkInfo", "Decoder", "Encoded", "FrameInfo", "Header", "Message",
    "MetaValue", "Reassembler", "ReassemblyLimits", "Schema", "TensorSpec", "WireError", "check_finite",
    "check_topic", "decode", "encode", "new_message_id", "peek", "read_chunk", "restamp", "split",
]  # fmt: skip

log = logging.getLogger(__name__)

# Every reason a received frame can be rejected for (the keys of Decoder.rejected).
REASONS = (
    "bad_magic", "truncated", "bad_header", "bad_version", "bad_topic", "topic_mismatch",
    "hash_mismatch", "bad_body", "missing_tensor", "unexpected_tensor", "bad_dtype", "bad_shape",
    "non_finite", "oversized", "bad_chunk", "chunk_overflow", "chunk_expired",
)  # fmt: skip
_LOUD_PER_REASON = 10  # log the first rejections of each reason as warnings, the rest at debug


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
        self.reassembler = Reassembler(self.limits, clock)
        self.rejected: Counter[str] = Counter()

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
        try:
            return self._feed(topic, payload, received_at)
        except WireError as err:
            self.reject(err, topic)
            return None

    def _feed(self, topic: str, payload: bytes, received_at: float | None) -> Message | None:
        self.expire()
        parsed = self.topics.parse(topic)
        if parsed.direction != self.direction:
            raise WireError("bad_topic", f"expected a {self.direction} topic")
        frame: bytes = payload
        wire_bytes: int | None = None
        stamps: tuple[float | None, float | None] | None = None
        if unpack_prefix(payload)[0] == FRAME_CHUNK:
            done = self.reassembler.add(topic, parsed.src, payload)
            if done is None:
                return None
            frame, wire_bytes, stamps = done.payload, done.wire_bytes, done.stamps
        return decode(
            frame,
            topic=topic,
            expect=parsed,
            run_id=self.topics.run_id,
            schema=self.schemas.get(parsed.kind),
            max_bytes=self.limits.max_message_bytes,
            wire_bytes=wire_bytes,
            received_at=received_at,
            stamps=stamps,
        )
