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
import socket
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

import aiomqtt

from broker.auth import BrokerAddress
from broker.mqtt import refused_subscriptions, stay_connected
from broker.tls import client_context
from broker.topics import Status, Topics
from nmoe.errors import ChannelError

log = logging.getLogger(__name__)



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
    identifier: str | None = None
    """MQTT client id; default ``nmoe-<run>-<username>`` (stable, so the broker keeps the session)."""
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
        self._backlog: deque[tuple[str, bytes | bytearray]] = deque()
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._closed = False

    @property
    def pending(self) -> int:
        """Payloads put and not yet acknowledged (in flight or waiting)."""
        return self._inflight + len(self._backlog)

    def put(self, topic: str, payload: bytes | bytearray) -> None:
        """Publish ``payload`` on ``topic`` after everything put before it (never blocks)."""
        if self._closed:
            return
        if self._backlog or self._inflight >= self.options.max_inflight:
            self._backlog.append((topic, payload))
            self.counts["backlog_peak"] = max(self.counts["backlog_peak"], len(self._backlog))
        else:
            self._start(topic, payload)

    async def wait_idle(self) -> None:
        """Return once every payload put so far is acknowledged or given up."""
        while self.pending:
            self._idle.clear()
            await self._idle.wait()

    async def close(self) -> None:
        """Give up what is pending (cancelled publishes are not counted as failed)."""
        self._closed = True
        self._backlog.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _start(self, topic: str, payload: bytes | bytearray) -> None:
        self._inflight += 1
        task = asyncio.get_running_loop().create_task(self._publish(topic, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, topic: str, payload: bytes | bytearray) -> None:
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
            while self._backlog and self._inflight < self.options.max_inflight and not self._closed:
                self._start(*self._backlog.popleft())
            if not self.pending:
                self._idle.set()


class RelaySession:
    """The channel account's connection: ``on_message(topic, payload)`` for each payload on tx/#.

    ``on_subscribed`` runs once, when the first subscription is granted and before any payload is
    handed over. Use as ``async with``; :meth:`publish` sends in order (see :class:`Outbox`).
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
        self._connected = asyncio.Event()
        self._closing = False
        self._fatal: BaseException | None = None
        self._client: aiomqtt.Client | None = None  # made on entry: aiomqtt wants a running loop
        self._outbox: Outbox | None = None
        self._runner: asyncio.Task[None] | None = None

    def _make_client(self) -> aiomqtt.Client:
        addr, opts = self.address, self.options
        will = None
        if opts.announce_status:
            will = aiomqtt.Will(self.topics.status(self.username), Status.OFFLINE.value.encode(), qos=1,
                                retain=True)  # fmt: skip
        client = aiomqtt.Client(
            addr.host, addr.port, username=addr.username, password=addr.password,
            identifier=opts.identifier or f"nmoe-{self.topics.run_id}-{self.username}",
            will=will, clean_session=False, keepalive=opts.keepalive_s, timeout=opts.connect_timeout_s,
            max_inflight_messages=opts.max_inflight,
            tls_context=client_context(addr.ca_file) if addr.tls else None,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            logger=logging.getLogger(f"{__name__}.mqtt"),
        )  # fmt: skip
        client.pending_calls_threshold = 1 << 30  # the outbox's window bounds what is pending
        return client

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def publish(self, topic: str, payload: bytes | bytearray) -> None:
        """Publish after everything published before (never blocks; see :class:`Outbox`)."""
        if self._outbox is None:
            raise ChannelError("the relay session is not open")
        self._outbox.put(topic, payload)

    async def wait_published(self) -> None:
        """Return once everything published so far is acknowledged or given up."""
        if self._outbox is not None:
            await self._outbox.wait_idle()

    async def __aenter__(self) -> RelaySession:
        loop = asyncio.get_running_loop()
        self._client = self._make_client()
        self._outbox = Outbox(self._client, self._connected, self.options, self.counts)
        self._runner = loop.create_task(self._run(), name=f"channel-{self.topics.run_id}")
        connected = loop.create_task(self._connected.wait())
        try:
            await asyncio.wait({connected, self._runner}, timeout=self.options.connect_timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            connected.cancel()
        if not self._connected.is_set():
            await self._shutdown()
            why = self._fatal or f"no connection within {self.options.connect_timeout_s}s"
            raise ChannelError(f"channel emulator cannot use the broker {self.address.redacted()}: {why}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        client, opts = self._client, self.options
        if client is not None and self._connected.is_set():
            with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                await client.unsubscribe(self.topics.tx_filter(), timeout=2.0)  # the broker stops queueing
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wait_published(), opts.flush_on_exit_s)
            if opts.announce_status:
                with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                    await client.publish(self.topics.status(self.username), Status.OFFLINE.value, qos=1,
                                         retain=True, timeout=2.0)  # fmt: skip
        await self._shutdown()

    async def wait_closed(self) -> None:
        """Return when the session ends; raise what ended it if it failed (e.g. refused subscription)."""
        if self._runner is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._runner)
        if self._fatal is not None:
            raise self._fatal

    async def _shutdown(self) -> None:
        self._closing = True
        if self._outbox is not None:
            await self._outbox.close()
        if self._runner is not None and not self._runner.done():
            self._runner.cancel()
        if self._runner is not None:
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._runner
        self._connected.clear()

    async def _run(self) -> None:
        """The connection loop: connect, subscribe, read; reconnect with backoff."""
        assert self._client is not None
        self._fatal = await stay_connected(
            self._client, who="channel emulator", address=self.address, on_connect=self._connect,
            on_message=self._read, connected=self._connected, closing=lambda: self._closing,
            initial_s=self.options.reconnect_initial_s, max_s=self.options.reconnect_max_s,
            config_error=ChannelError,
        )  # fmt: skip

    async def _connect(self, reconnected: bool) -> None:
        await self._subscribe()
        if reconnected:
            self.counts["reconnects"] += 1
        else:
            self._on_subscribed()

    def _read(self, message: aiomqtt.Message) -> None:
        payload = message.payload
        self._on_message(message.topic.value, payload if isinstance(payload, bytes) else b"")

    async def _subscribe(self) -> None:
        assert self._client is not None
        granted = await self._client.subscribe(self.topics.tx_filter(), qos=self.options.qos)
        if refused_subscriptions([self.topics.tx_filter()], granted):
            raise ChannelError(f"broker refused the subscription to {self.topics.tx_filter()}")
        if self.options.announce_status:
            await self._client.publish(self.topics.status(self.username), Status.ONLINE.value, qos=1, retain=True)

