"""The bus session: how one agent talks to the others, over a real MQTT broker (aiomqtt 2.x).

::

    async with BusSession(BusConfig(run_id, "client-0", address)) as bus:
        await bus.send("coordinator", Kind.UPDATE, {"w": w}, round=3)
        async for msg in bus.messages():
            ...
        reply = await bus.request("client-1", Kind.LATENT, {"h": h}, deadline_s=2.0)

One background task per session owns the connection: it connects with the agent's credentials,
sets a retained ``offline`` last will, subscribes the inbox (``rx/<self>/#``, ``rx/all/#``, and
``status/#`` when watching), publishes a retained ``online``, then decodes what arrives. When the
broker goes away it reconnects with exponential backoff (aiomqtt's Client is reusable by entering
``async with`` again) and re-subscribes; sends wait for the reconnection up to their timeout.
The session is persistent (``clean_session=False``, the client id being the username), so a broker
that keeps sessions queues our QoS 1 traffic while we reconnect.
Received messages are validated by :class:`broker.wire.Decoder`, de-duplicated by message id (QoS 1
may deliver twice), and either handed to the ``request`` awaiting them (by ``reply_to``) or queued
for :meth:`BusSession.messages`. Rejections are counted in ``stats.rejected`` and never raise.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import numpy as np

from broker.auth import CHANNEL_MODES, BrokerAddress, ChannelMode
from broker.channel.config import RelayMode
from broker.held import (
    FRAME_RELEASE,
    Announce,
    HoldBuffer,
    HoldLimits,
    Ready,
    announce_frames,
    frame_type,
    pack_announces,
)
from broker.mqtt import Connection, ConnectionOptions
from broker.topics import BROADCAST, Kind, ParsedTopic, Status, Topics, check_agent_id, is_destination, parse_kind
from broker.wire import (
    COMPRESSIONS,
    MIN_CHUNK_SIZE,
    DecodePipeline,
    Decoder,
    Framed,
    Message,
    MetaValue,
    ReassemblyLimits,
    Schema,
    check_finite,
    draft,
    new_message_id,
)
from nmoe.errors import BusError, WireError

log = logging.getLogger(__name__)


class RequestTimeout(BusError, TimeoutError):
    """No reply arrived before the request's deadline (also an ``asyncio.TimeoutError``)."""


class PublishTimeout(BusError, TimeoutError):
    """A publish was not acknowledged by the broker in time (connection down or too slow)."""


@dataclass(frozen=True)
class BusConfig:
    """Everything one bus session needs; one per agent."""

    run_id: str
    agent_id: str
    address: BrokerAddress
    channel_mode: ChannelMode = "direct"  # direct: publish to rx/...; emulated: through the channel emulator
    relay: RelayMode = "headers"  # emulated: body to held/..., header to tx/... (broker/held.py); bodies: to tx/...
    held_min_bytes: int = 128 * 1024  # relay headers: smaller messages still go to tx/... whole (cheaper)
    chunk_size: int = 256 * 1024  # largest MQTT payload we publish; bigger messages are chunked
    qos: int = 1  # 1: at least once (duplicates are suppressed); 0: at most once
    compression: str = "none"  # default for float32 tensors: none | fp16 | int8
    publish_timeout_s: float = 10.0  # base publish timeout ...
    publish_min_rate: float = 1_000_000.0  # ... plus payload bytes / this rate (bytes per second)
    connect_timeout_s: float = 10.0  # first connection
    reconnect_initial_s: float = 0.1  # reconnect backoff starts here, doubles ...
    reconnect_max_s: float = 5.0  # ... up to this
    keepalive_s: int = 30
    max_inflight: int = 64  # QoS 1 publishes awaiting PUBACK at once (paho's window)
    dedup_window: int = 8192  # message ids remembered to drop QoS 1 duplicates
    late_reply_window: int = 4096  # expired request ids remembered to count late replies
    limits: ReassemblyLimits = field(default_factory=ReassemblyLimits)
    hold: HoldLimits = field(default_factory=HoldLimits)  # held bodies awaiting the channel's release

    def __post_init__(self) -> None:
        Topics(self.run_id)
        check_agent_id(self.agent_id)
        if self.channel_mode not in CHANNEL_MODES:
            raise ValueError(f"channel_mode must be one of {CHANNEL_MODES}")
        if self.chunk_size < MIN_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be >= {MIN_CHUNK_SIZE}")
        if self.qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        if self.relay not in ("headers", "bodies"):
            raise ValueError("relay must be headers or bodies")
        if self.held_min_bytes < 0:
            raise ValueError("held_min_bytes must be >= 0")
        if self.compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {COMPRESSIONS}")
        positive = ("publish_timeout_s", "publish_min_rate", "connect_timeout_s", "reconnect_initial_s")
        bad_backoff = self.reconnect_max_s < self.reconnect_initial_s
        if any(not getattr(self, name) > 0 for name in positive) or bad_backoff:
            raise ValueError("timeouts and rates must be > 0 and reconnect_max_s >= reconnect_initial_s")

    def publish_timeout(self, nbytes: int) -> float:
        return self.publish_timeout_s + nbytes / self.publish_min_rate


@dataclass
class BusStats:
    """Counters of one session (plain and mutable; read them, or ``as_dict()`` for reports)."""

    sent_messages: Counter[str] = field(default_factory=Counter)  # per kind
    sent_bytes: Counter[str] = field(default_factory=Counter)  # wire bytes per kind, chunks included
    received_messages: Counter[str] = field(default_factory=Counter)
    received_bytes: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)  # per WireError reason
    duplicates: int = 0
    late_replies: int = 0
    reconnects: int = 0
    compression_saved_bytes: int = 0
    announce_failures: int = 0  # relay: headers: frames whose header the broker never took (they stay held)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in vars(self).items():
            out[name] = dict(value) if isinstance(value, Counter) else value
        return out


class _Lru:
    """A bounded set remembering the most recent keys."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._keys: OrderedDict[str, None] = OrderedDict()

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def add(self, key: str) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)
        if len(self._keys) > self._size:
            self._keys.popitem(last=False)




class BusSession:
    """One agent's connection to the bus; use as ``async with BusSession(cfg) as bus``."""

    def __init__(
        self,
        cfg: BusConfig,
        schemas: Mapping[Kind | str, Schema] | None = None,
        watch_status: bool = False,
        watch_agents: Iterable[str] = (),
    ) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.run_id)
        self.stats = BusStats()
        self.watch_status = watch_status
        self.watch_agents = tuple(watch_agents)  # whose status to track without watching all
        self._decoder = Decoder(
            self.topics, schemas={parse_kind(k): s for k, s in (schemas or {}).items()}, limits=cfg.limits
        )
        self.stats.rejected = self._decoder.rejected  # one counter, shared
        self._pipeline = DecodePipeline(self._decoder, self._dispatch)
        self._holder = HoldBuffer(self.topics, cfg.hold, on_reject=self._decoder.reject)
        self._inbox: asyncio.Queue[Message | None] = asyncio.Queue()
        self._waiters: dict[str, asyncio.Future[Message]] = {}
        self._seen = _Lru(cfg.dedup_window)
        self._expired_requests = _Lru(cfg.late_reply_window)
        self._status: dict[str, str] = {}
        self._status_changed = asyncio.Event()  # replaced by a fresh one after each change
        filters = list(self.topics.inbox_filters(self.agent_id))
        if cfg.channel_mode == "emulated":  # held bodies (relay: headers), whatever this session sends with
            filters += self.topics.held_filters(self.agent_id)
        if watch_status:
            filters.append(self.topics.status_filter())
        else:
            filters += [self.topics.status(a) for a in self.watch_agents]
        self._conn = Connection(
            cfg.address,
            ConnectionOptions(
                status_topic=self.topics.status(self.agent_id),  # client id: the username (see ConnectionOptions)
                clean_session=False, keepalive_s=cfg.keepalive_s, connect_timeout_s=cfg.connect_timeout_s,
                reconnect_initial_s=cfg.reconnect_initial_s, reconnect_max_s=cfg.reconnect_max_s,
                max_inflight=cfg.max_inflight,
            ),
            who=self.agent_id, subscriptions=[(f, cfg.qos) for f in filters], on_message=self._on_message,
            on_connect=self._on_connect, error=BusError,
        )  # fmt: skip
        self._closing = False
        # relay: headers: headers of published frames waiting for their announce, with when they left
        self._announces: list[tuple[Announce, float]] = []
        self._announcing: asyncio.Handle | asyncio.Task[None] | None = None  # the flush to come, then the publish
        self._announced = asyncio.Event()
        self._announced.set()
        self._hold_check: asyncio.TimerHandle | None = None  # the hold buffer's timeouts, while it holds anything
        # relay: headers: publishes of announced bodies, which go on past their send's deadline
        self._held_bodies: set[asyncio.Task[None]] = set()

    @property
    def agent_id(self) -> str:
        return self.cfg.agent_id

    @property
    def connected(self) -> bool:
        return self._conn.connected

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> BusSession:
        try:
            await self._conn.__aenter__()
        except BusError:
            self._close_inbox()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self._announced.is_set():  # what we sent must still reach the channel
            if isinstance(self._announcing, asyncio.Handle):
                self._announcing.cancel()
                self._flush_announces()
            try:
                await asyncio.wait_for(self._announced.wait(), self.cfg.publish_timeout_s)
            except asyncio.TimeoutError:
                log.warning("%s: closing with %d headers not announced", self.agent_id, len(self._announces))
        if self._held_bodies:  # announced: their receivers' links wait for them
            _done, late = await asyncio.wait(self._held_bodies, timeout=self.cfg.publish_timeout_s)
            if late:
                log.warning("%s: closing with %d announced body publishes the broker has not acknowledged; "
                            "their receivers drop the releases after their hold timeouts", self.agent_id, len(late))
                for task in late:
                    task.cancel()
        self._closing = True
        await self._conn.close()
        self._close_inbox()

    def _close_inbox(self) -> None:
        self._closing = True
        if self._hold_check is not None:
            self._hold_check.cancel()
            self._hold_check = None
        self._pipeline.close()
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(BusError("bus session closed"))
        self._inbox.put_nowait(None)

    async def _on_connect(self, reconnected: bool) -> None:
        if reconnected:
            self.stats.reconnects += 1

    # -- receiving -------------------------------------------------------------------------------
    def _on_message(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload
        if topic.startswith(f"{self.topics.prefix}/status/"):
            if self.watch_status or self.watch_agents:
                self._on_status(topic, payload if isinstance(payload, bytes) else b"")
            return
        if not isinstance(payload, bytes | bytearray):
            self._decoder.reject(WireError("bad_magic", "empty or non-binary payload"), topic)
            return
        try:
            parsed = self.topics.parse(topic)
        except WireError as err:
            self._decoder.reject(err, topic)
            return
        if parsed.src == self.agent_id:
            return  # our own broadcast, echoed back
        if parsed.direction == "held" or frame_type(payload) == FRAME_RELEASE:
            self._on_held(parsed, topic, bytes(payload))
            return
        self._pipeline.feed(topic, bytes(payload), received_at=time.time(), parsed=parsed)

    def _on_held(self, parsed: ParsedTopic, topic: str, payload: bytes) -> None:
        """A held body or a release (broker/held.py); what they free goes on to the decoder in order."""
        try:
            if parsed.direction == "held":
                ready = self._holder.body(parsed, topic, payload)
            else:
                ready = self._holder.release(parsed, topic, payload)
        except Exception as err:  # a bug in the hold buffer costs this frame, never the session
            log.exception("%s: handling a held frame on %s raised", self.agent_id, topic[:200])
            self._decoder.reject(WireError("decode_error", f"{type(err).__name__}: {err}"[:200]), topic)
            return
        self._feed_ready(ready)
        if self._hold_check is None:
            self._arm_hold_check()

    def _arm_hold_check(self) -> None:
        """Run the hold buffer's timeouts in ``check_every_s`` while it holds anything."""
        if self._holder.waiting:
            self._hold_check = asyncio.get_running_loop().call_later(self._holder.check_every_s, self._check_held)

    def _check_held(self) -> None:
        """The hold buffer's timeouts while nothing arrives (a link blocked behind a body the broker
        lost, say, whose later frames are all here already)."""
        self._hold_check = None
        if self._closing:
            return
        try:
            ready = self._holder.expire()
        except Exception:  # a bug in the hold buffer: logged; the next input checks again
            log.exception("%s: checking held frames for expiry raised", self.agent_id)
            return
        self._feed_ready(ready)
        self._arm_hold_check()

    def _feed_ready(self, ready: list[Ready]) -> None:
        now = time.time()
        for r in ready:
            self._pipeline.feed(r.topic, r.frame, received_at=now, parsed=r.parsed, stamps=r.stamps)

    def _dispatch(self, msg: Message) -> None:
        """A decoded message: drop duplicates, wake its request, or queue it for messages()."""
        if not self._holder.verify(msg.src, msg.id, msg.header.blake3):
            self._decoder.reject(WireError("release_mismatch", "not the message the channel released"), msg.topic)
            return
        if msg.id in self._seen:
            self.stats.duplicates += 1
            return
        self._seen.add(msg.id)
        kind = msg.kind.value
        self.stats.received_messages[kind] += 1
        self.stats.received_bytes[kind] += msg.wire_bytes
        reply_to = msg.header.reply_to
        if reply_to is not None:
            waiter = self._waiters.pop(reply_to, None)
            if waiter is not None:
                if not waiter.done():
                    waiter.set_result(msg)
                return
            if reply_to in self._expired_requests:
                self.stats.late_replies += 1
                log.info("%s dropped a late reply from %s to %s", self.agent_id, msg.src, reply_to)
                return
        self._inbox.put_nowait(msg)

    def _on_status(self, topic: str, payload: bytes) -> None:
        try:
            agent = self.topics.parse_status(topic)
        except WireError as err:
            self._decoder.reject(err, topic)
            return
        text = payload.decode(errors="replace")
        if text not in (Status.ONLINE.value, Status.OFFLINE.value):
            if text:
                log.warning("ignoring status %r of %s", text[:32], agent)
            self._status.pop(agent, None)
        else:
            self._status[agent] = text
        changed, self._status_changed = self._status_changed, asyncio.Event()
        changed.set()

    async def messages(self) -> AsyncIterator[Message]:
        """Decoded, validated, de-duplicated messages (replies to ``request`` excluded), until close."""
        while True:
            msg = await self._inbox.get()
            if msg is None:
                self._inbox.put_nowait(None)  # let other iterators end too
                return
            yield msg

    async def receive(self, timeout: float | None = None) -> Message:
        """The next message; raises asyncio.TimeoutError after ``timeout`` or BusError once closed."""
        msg = await asyncio.wait_for(self._inbox.get(), timeout)
        if msg is None:
            self._inbox.put_nowait(None)
            raise BusError("bus session closed")
        return msg

    def held_frames(self) -> list[tuple[str, str, str, int, int]]:
        """Frames held for the channel's release: (src, kind, message id, chunk index, size)."""
        return self._holder.pending()

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> dict[str, str]:
        """agent id -> ``online`` / ``offline`` as last seen (of all with ``watch_status=True``, else of
        ``watch_agents``)."""
        return dict(self._status)

    def online(self) -> set[str]:
        return {a for a, s in self._status.items() if s == Status.ONLINE.value}

    async def wait_status(
        self, predicate: Callable[[Mapping[str, str]], bool], timeout: float | None = None
    ) -> dict[str, str]:
        """Wait until ``predicate(status)`` holds; raises asyncio.TimeoutError after ``timeout``."""
        if not self.watch_status and not self.watch_agents:
            raise BusError("this session does not watch status (watch_status=False, no watch_agents)")

        async def wait() -> dict[str, str]:
            while True:
                changed = self._status_changed
                if predicate(self._status):
                    return dict(self._status)
                await changed.wait()

        return await asyncio.wait_for(wait(), timeout)

    async def wait_online(self, agents: Iterable[str], timeout: float | None = None) -> dict[str, str]:
        wanted = set(agents)
        return await self.wait_status(lambda s: all(s.get(a) == Status.ONLINE.value for a in wanted), timeout)

    # -- sending ---------------------------------------------------------------------------------
    async def send(
        self,
        dst: str,
        kind: Kind | str,
        tensors: Mapping[str, np.ndarray] | None = None,
        *,
        round: int = -1,
        stage: str = "",
        meta: Mapping[str, MetaValue] | None = None,
        reply_to: str | None = None,
        compression: str | None = None,
        msg_id: str | None = None,
    ) -> str:
        """Send one message to an agent or to ``all``; returns its message id once the broker has it."""
        if self._closing or not self._conn.is_open:
            raise BusError("bus session is not open")
        if not is_destination(dst) or dst == self.agent_id:
            raise BusError(f"cannot send to {dst!r}")
        kind = parse_kind(kind)
        d = draft(
            kind=kind, run=self.cfg.run_id, src=self.agent_id, dst=dst, tensors=tensors, round=round,
            stage=stage, meta=meta, reply_to=reply_to, msg_id=msg_id, finite=False,
            compression=self.cfg.compression if compression is None else compression,
        )  # fmt: skip
        # Every frame is built here, before the first await: the body's one copy (from the arrays).
        framed = Framed.of(d, self.cfg.chunk_size)
        frames, total = framed.frames, len(framed.frames)
        nbytes = sum(len(f) for f in frames)
        held = self.cfg.channel_mode == "emulated" and self.cfg.relay == "headers" and nbytes >= self.cfg.held_min_bytes
        if self.cfg.channel_mode == "direct":
            topic = self.topics.rx(dst, self.agent_id, kind)
        elif held:  # the body straight to the receiver, a header to the channel (broker/held.py)
            topic = self.topics.held(dst, self.agent_id, kind)
        else:
            topic = self.topics.tx(self.agent_id, dst, kind)
            if not self._announced.is_set():  # a held message before it must reach the channel first
                await self._announced.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.cfg.publish_timeout(nbytes)
        started = loop.time()

        def headers(body_hash: str) -> list[Announce]:  # a held message's, in publish order (once hashed)
            order = announce_frames(frames[framed.head :] + frames[: framed.head])
            return [Announce(d.header.id, body_hash, dst, kind, i, n) for i, n in order]

        if framed.head == total:  # nothing to overlap with the hash
            check_finite(tensors or {})
            body_hash = framed.digest()
            framed.seal(body_hash)
            if held:
                await self._publish_held(topic, frames, headers(body_hash), started, deadline)
            else:
                await self._publish(topic, frames, deadline)
        else:
            # Publish the body-only chunks while the body is checked and hashed off the loop (numpy
            # and BLAKE3 release the GIL), then the chunks holding the header. Should the tensors
            # not be finite after all, the receiver drops the incomplete (or never released)
            # message when it expires.
            digest = loop.run_in_executor(None, _checked_digest, framed, tensors or {})
            tail = frames[framed.head :]
            if held:  # what is announced must reach the receiver: see _publish_held
                tail_sent = self._keep(loop.create_task(self._publish(topic, tail, math.inf)))
                body_hash = await digest
                framed.seal(body_hash)
                await self._publish_held(topic, frames[: framed.head], headers(body_hash), started, deadline,
                                         tail_sent)  # fmt: skip
            else:
                tail_sent = asyncio.ensure_future(self._publish(topic, tail, deadline))
                try:
                    body_hash = await digest
                    framed.seal(body_hash)
                    await self._publish(topic, frames[: framed.head], deadline)
                finally:
                    await tail_sent
        self.stats.sent_messages[kind.value] += 1
        self.stats.sent_bytes[kind.value] += nbytes
        self.stats.compression_saved_bytes += d.saved_bytes
        return d.header.id

    # -- announces (relay: headers) ----------------------------------------------------------------
    async def _publish_held(
        self, topic: str, frames: list[bytes | bytearray], headers: list[Announce], started: float, deadline: float,
        before: asyncio.Future[None] | None = None,
    ) -> None:
        """Publish a held message's last ``frames`` (``before``: the publish of those already on
        their way) and announce all of the message's ``headers`` right behind them.

        The announce is queued after the body's publishes on this one connection, and MQTT keeps a
        connection's order, so the broker has the body before the channel hears of it; the release
        then meets the body at the receiver instead of following it a broker round trip later
        (docs/SCALE.md, "Eighth pass"). An announced body is published until the broker has it or
        the session closes, past this send's deadline, since its receiver's link waits for it; the
        send itself raises PublishTimeout at the deadline, as any other.
        """
        loop = asyncio.get_running_loop()
        sent = self._keep(loop.create_task(self._publish(topic, frames, math.inf)))
        self._announce(headers, started)
        waits = [sent] if before is None else [before, sent]
        _done, late = await asyncio.wait(waits, timeout=max(0.0, deadline - loop.time()))
        if late:
            raise PublishTimeout(f"publish on {topic} not acknowledged in time")
        for task in waits:
            task.result()

    def _keep(self, task: asyncio.Task[None]) -> asyncio.Task[None]:
        """Hold on to an announced body's publish until it ends (the session's close waits for it)."""
        self._held_bodies.add(task)
        task.add_done_callback(self._body_done)
        return task

    def _body_done(self, task: asyncio.Task[None]) -> None:
        self._held_bodies.discard(task)
        err = None if task.cancelled() else task.exception()
        if err is not None and not self._closing:  # at the close, its warning says it
            log.warning("%s: an announced body was not published (%s); its receiver drops the release after "
                        "its hold timeouts", self.agent_id, err)  # fmt: skip

    def _announce(self, headers: list[Announce], since: float) -> None:
        """Queue headers of frames published (handed to the connection) since loop time ``since``;
        never blocks.

        They go out at once when no announce of ours awaits the broker, else together when it is
        acknowledged (so concurrent sends share announces; a waiting timer would cost latency and,
        measured, throughput too). Their age tells the emulator how long ago the frames left.
        """
        self._announces += [(h, since) for h in headers]
        if self._announcing is None:
            self._announced.clear()
            self._announcing = asyncio.get_running_loop().call_soon(self._flush_announces)

    def _flush_announces(self) -> None:
        """Publish every queued header in one announce (in order), each with its age; the next batch
        goes when the broker has acknowledged this one."""
        if not self._announces:
            self._announcing = None
            self._announced.set()
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        batch = [Announce(h.msg_id, h.blake3, h.dst, h.kind, h.index, h.size, now - since)
                 for h, since in self._announces]  # fmt: skip
        self._announces = []
        frames = pack_announces(batch)
        topic = self.topics.tx(self.agent_id, batch[0].dst, batch[0].kind)
        deadline = now + self.cfg.publish_timeout(sum(len(f) for f in frames))
        task = loop.create_task(self._publish(topic, frames, deadline))
        self._announcing = task

        def done(task: asyncio.Task[None]) -> None:
            err = None if task.cancelled() else task.exception()
            if task.cancelled() or err is not None:
                self.stats.announce_failures += len(batch)
                log.warning("%s: %d headers were not announced (%s); their frames stay held until they expire",
                            self.agent_id, len(batch), err or "cancelled")  # fmt: skip
            self._flush_announces()  # what queued meanwhile has waited a round trip already

        task.add_done_callback(done)

    async def _publish(self, topic: str, frames: Sequence[bytes | bytearray], deadline: float) -> None:
        """Publish frames on a topic until the broker acknowledged all, across reconnections, or time out."""
        client = self._conn.client
        loop = asyncio.get_running_loop()
        pending = list(frames)
        while pending:
            try:
                if deadline <= loop.time():
                    raise asyncio.TimeoutError
                if not self._conn.connected:
                    await asyncio.wait_for(self._conn.connected_event.wait(), deadline - loop.time())
                results = await asyncio.wait_for(client.publish_frames(topic, pending, self.cfg.qos),
                                                 deadline - loop.time())  # fmt: skip
            except asyncio.TimeoutError:
                raise PublishTimeout(f"publish on {topic} not acknowledged in time") from None
            pending = [f for f, r in zip(pending, results, strict=True) if r is not None]
            if pending:  # the connection dropped: let the runner notice before trying again
                await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
            if self._closing:
                raise BusError("bus session closed during a send")

    async def request(
        self,
        dst: str,
        kind: Kind | str,
        tensors: Mapping[str, np.ndarray] | None = None,
        *,
        deadline_s: float,
        round: int = -1,
        stage: str = "",
        meta: Mapping[str, MetaValue] | None = None,
        compression: str | None = None,
    ) -> Message:
        """Send and await the first message whose ``reply_to`` is this request's id.

        Raises :class:`RequestTimeout` (a BusError and asyncio.TimeoutError) after ``deadline_s``;
        a reply arriving later is counted in ``stats.late_replies`` and dropped.
        """
        msg_id = new_message_id()
        waiter: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._waiters[msg_id] = waiter

        async def exchange() -> Message:
            await self.send(dst, kind, tensors, round=round, stage=stage, meta=meta,
                            compression=compression, msg_id=msg_id)  # fmt: skip
            return await waiter

        try:
            return await asyncio.wait_for(exchange(), deadline_s)
        except asyncio.TimeoutError:
            self._expired_requests.add(msg_id)
            what = parse_kind(kind).value
            raise RequestTimeout(f"no reply from {dst} to {what} within {deadline_s}s") from None
        finally:
            self._waiters.pop(msg_id, None)

    async def reply(
        self,
        request: Message,
        kind: Kind | str,
        tensors: Mapping[str, np.ndarray] | None = None,
        *,
        meta: Mapping[str, MetaValue] | None = None,
        compression: str | None = None,
    ) -> str:
        """Answer a request: sent to its sender with ``reply_to`` = its id, same round and stage."""
        if request.src == BROADCAST:
            raise BusError("cannot reply to a broadcast source")
        return await self.send(
            request.src, kind, tensors, round=request.header.round, stage=request.header.stage,
            meta=meta, reply_to=request.id, compression=compression,
        )  # fmt: skip


def _checked_digest(framed: Framed, tensors: Mapping[str, np.ndarray]) -> str:
    check_finite(tensors)
    return framed.digest()

