"""The emulator's side of the bus: one aiomqtt session that reads the air and publishes in order.

:class:`RelaySession` owns the connection of the ``channel`` account (aiomqtt 2.x, in the style of
agents/bus.py, which broker/ may not import): it connects, subscribes ``tx/#``, hands every payload
to a callback, and reconnects with exponential backoff. The session is persistent
(``clean_session=False``, a stable client id) so that the broker queues the air traffic while the
emulator reconnects; a clean exit unsubscribes first, so that nothing piles up afterwards.

:class:`Outbox` publishes what the channel delivers. The model hands deliveries over synchronously,
from inside ``env.run``, so :meth:`Outbox.put` never waits: it starts a QoS 1 publish task while
fewer than ``max_inflight`` await their PUBACK, and queues the payload behind the others otherwise.
Tasks take their first step in creation order and aiomqtt gives the payload to paho in that step,
so payloads leave in the order they were put and each link keeps its FIFO order. Once paho has a
payload it resends it across reconnections until the broker acknowledges it; a payload that
cannot even be handed over within ``publish_timeout_s`` (no connection) is counted as failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import aiomqtt

from broker.auth import BrokerAddress
from broker.mqtt import Connection, ConnectionOptions
from broker.topics import Topics
from nmoe.errors import ChannelError

log = logging.getLogger(__name__)
_Done = Callable[[], None] | None



@dataclass(frozen=True)
class RelayOptions:
    """How the emulator uses the bus (the channel itself is configured by ChannelConfig)."""

    qos: int = 1
    """QoS of the subscription to tx/# and of the relayed publishes."""
    max_inflight: int = 256
    """Relayed publishes awaiting their PUBACK at once; later deliveries wait in order."""
    publish_timeout_s: float = 30.0
    """A delivery that finds no connection for this long is given up (counted in publish_failed)."""
    connect_timeout_s: float = 10.0
    """First connection and subscription."""
    reconnect_initial_s: float = 0.1
    """Reconnect backoff starts here and doubles ..."""
    reconnect_max_s: float = 5.0
    """... up to this."""
    keepalive_s: int = 30
    announce_status: bool = True
    """Publish a retained ``online`` on status/<username> (``offline`` as the last will)."""
    flush_on_exit_s: float = 2.0
    """On exit, wait this long for deliveries already handed over to be acknowledged."""

    def __post_init__(self) -> None:
        if self.qos not in (0, 1):
            raise ValueError("qos: must be 0 or 1")
        if self.max_inflight < 1:
            raise ValueError("max_inflight: must be >= 1")
        for name in ("publish_timeout_s", "connect_timeout_s", "reconnect_initial_s", "keepalive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0")
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s: must be >= reconnect_initial_s")
        if self.flush_on_exit_s < 0:
            raise ValueError("flush_on_exit_s: must be >= 0")


class Outbox:
    """Ordered publishes over one aiomqtt client; ``connected`` is set while the session is up."""

    def __init__(
        self, client: aiomqtt.Client, connected: asyncio.Event, options: RelayOptions, counts: Counter[str]
    ) -> None:
        self.client = client
        self.connected = connected
        self.options = options
        self.counts = counts
        """published, bytes_out, publish_failed, backlog_peak (added to ``counts``)."""
        self._backlog: deque[tuple[str, bytes | bytearray, _Done]] = deque()
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._closed = False

    @property
    def pending(self) -> int:
        """Payloads put and not yet acknowledged (in flight or waiting)."""
        return self._inflight + len(self._backlog)

    def put(self, topic: str, payload: bytes | bytearray, on_done: _Done = None) -> None:
        """Publish ``payload`` on ``topic`` after everything put before it (never blocks).

        ``on_done`` is called once the broker acknowledged it, or it was given up or cancelled.
        """
        if self._closed:
            if on_done is not None:
                on_done()
            return
        if self._backlog or self._inflight >= self.options.max_inflight:
            self._backlog.append((topic, payload, on_done))
            self.counts["backlog_peak"] = max(self.counts["backlog_peak"], len(self._backlog))
        else:
            self._start(topic, payload, on_done)

    async def wait_idle(self) -> None:
        """Return once every payload put so far is acknowledged or given up."""
        while self.pending:
            self._idle.clear()
            await self._idle.wait()

    async def close(self) -> None:
        """Give up what is pending (cancelled publishes are not counted as failed)."""
        self._closed = True
        backlog, self._backlog = self._backlog, deque()
        for _topic, _payload, on_done in backlog:
            if on_done is not None:
                on_done()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _start(self, topic: str, payload: bytes | bytearray, on_done: _Done) -> None:
        self._inflight += 1
        task = asyncio.get_running_loop().create_task(self._publish(topic, payload, on_done))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, topic: str, payload: bytes | bytearray, on_done: _Done) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.publish_timeout_s
        try:
            while True:
                try:
                    if not self.connected.is_set():
                        await asyncio.wait_for(self.connected.wait(), deadline - loop.time())
                    # No timeout once paho has it (it resends after a reconnection), and none is
                    # cheaper: aiomqtt then awaits the PUBACK without a wait_for task.
                    await self.client.publish(topic, payload, qos=self.options.qos, timeout=math.inf)
                    self.counts["published"] += 1
                    self.counts["bytes_out"] += len(payload)
                    return
                except aiomqtt.MqttError as err:  # not connected at this moment
                    if loop.time() >= deadline:
                        raise asyncio.TimeoutError from err
                    await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))  # let the session notice
        except asyncio.TimeoutError:
            self.counts["publish_failed"] += 1
            log.warning("gave up publishing %d bytes on %s after %.1fs", len(payload), topic,
                        self.options.publish_timeout_s)  # fmt: skip
        finally:
            self._inflight -= 1
            if on_done is not None:
                on_done()
            while self._backlog and self._inflight < self.options.max_inflight and not self._closed:
                self._start(*self._backlog.popleft())
            if not self.pending:
                self._idle.set()


class RelaySession:
    """The channel account's connection: ``on_message(topic, payload)`` for each payload on tx/#.

    ``on_subscribed`` runs once, when the first subscription is granted and before any payload is
    handed over. Use as ``async with``; :meth:`publish` sends in order (see :class:`Outbox`). The
    connection itself is a :class:`broker.mqtt.Connection`, like every agent's.
    """

    def __init__(
        self,
        topics: Topics,
        address: BrokerAddress,
        options: RelayOptions,
        on_message: Callable[[str, bytes], None],
        on_subscribed: Callable[[], None] = lambda: None,
    ) -> None:
        self.topics = topics
        self.address = address
        self.options = options
        self.username = address.username or "channel"
        self.counts: Counter[str] = Counter()
        """reconnects, and the outbox's counts."""
        self._on_message, self._on_subscribed = on_message, on_subscribed
        opts = options
        self._conn = Connection(
            address,
            ConnectionOptions(
                # client id: the username (stable, so the broker keeps the session; see ConnectionOptions)
                status_topic=topics.status(self.username) if opts.announce_status else None,
                clean_session=False, keepalive_s=opts.keepalive_s, connect_timeout_s=opts.connect_timeout_s,
                reconnect_initial_s=opts.reconnect_initial_s, reconnect_max_s=opts.reconnect_max_s,
                max_inflight=opts.max_inflight,
            ),
            who="channel emulator", subscriptions=[(topics.tx_filter(), opts.qos)], on_message=self._read,
            on_connect=self._connected, error=ChannelError,
        )  # fmt: skip
        self._outbox: Outbox | None = None

    @property
    def connected(self) -> bool:
        return self._conn.connected

    def publish(self, topic: str, payload: bytes | bytearray, on_done: Callable[[], None] | None = None) -> None:
        """Publish after everything published before (never blocks; see :class:`Outbox`)."""
        if self._outbox is None:
            raise ChannelError("the relay session is not open")
        self._outbox.put(topic, payload, on_done)

    async def wait_published(self) -> None:
        """Return once everything published so far is acknowledged or given up."""
        if self._outbox is not None:
            await self._outbox.wait_idle()

    async def __aenter__(self) -> RelaySession:
        await self._conn.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._conn.connected:
            with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                await self._conn.client.unsubscribe(self.topics.tx_filter(), timeout=2.0)  # the broker stops queueing
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wait_published(), self.options.flush_on_exit_s)
        if self._outbox is not None:
            await self._outbox.close()
        await self._conn.close()

    async def wait_closed(self) -> None:
        """Return when the session ends; raise what ended it if it failed (e.g. refused subscription)."""
        await self._conn.wait_closed()

    async def _connected(self, reconnected: bool) -> None:
        if self._outbox is None:  # the client exists from the first connection on
            self._outbox = Outbox(self._conn.client, self._conn.connected_event, self.options, self.counts)
        if reconnected:
            self.counts["reconnects"] += 1
        else:
            self._on_subscribed()

    def _read(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        self._on_message(message.topic.value, payload if isinstance(payload, bytes) else b"")
