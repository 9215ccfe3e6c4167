"""The emulator's outbox: relayed payloads published in order, without blocking the channel model.

The channel model hands over deliveries synchronously, from inside ``env.run``; :meth:`Outbox.put`
starts a QoS 1 publish task at once while fewer than ``max_inflight`` await their PUBACK, and
otherwise queues the payload behind the others. Tasks take their first step in creation order, and
aiomqtt hands the payload to paho in that first step, so payloads leave in the order they were put
(each link's FIFO order survives). A publish that fails because the connection dropped is retried
once the session is back, until ``timeout_s``; then it is counted as failed and logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque

import aiomqtt

log = logging.getLogger(__name__)


class Outbox:
    """Ordered publishes over one aiomqtt client; ``connected`` is set while the session is up."""

    def __init__(
        self, client: aiomqtt.Client, connected: asyncio.Event, *, qos: int, max_inflight: int, timeout_s: float
    ) -> None:
        self.client = client
        self.connected = connected
        self.qos = qos
        self.max_inflight = max_inflight
        self.timeout_s = timeout_s
        self.counts: Counter[str] = Counter()
        """published, bytes_out, publish_failed, backlog_peak."""
        self._backlog: deque[tuple[str, bytes]] = deque()
        self._inflight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._closed = False

    @property
    def pending(self) -> int:
        """Payloads put and not yet acknowledged (in flight or waiting)."""
        return self._inflight + len(self._backlog)

    def put(self, topic: str, payload: bytes) -> None:
        """Publish ``payload`` on ``topic`` after everything put before it (never blocks)."""
        if self._closed:
            return
        if self._backlog or self._inflight >= self.max_inflight:
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

    def _start(self, topic: str, payload: bytes) -> None:
        self._inflight += 1
        task = asyncio.get_running_loop().create_task(self._publish(topic, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, topic: str, payload: bytes) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        try:
            while True:
                try:
                    if not self.connected.is_set():
                        await asyncio.wait_for(self.connected.wait(), deadline - loop.time())
                    await self.client.publish(topic, payload, qos=self.qos, timeout=max(1e-3, deadline - loop.time()))
                    self.counts["published"] += 1
                    self.counts["bytes_out"] += len(payload)
                    return
                except aiomqtt.MqttError as err:
                    if loop.time() >= deadline:
                        raise asyncio.TimeoutError from err
                    await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))  # let the session notice
        except asyncio.TimeoutError:
            self.counts["publish_failed"] += 1
            log.warning("could not publish %d bytes on %s within %.1fs", len(payload), topic, self.timeout_s)
        finally:
            self._inflight -= 1
            while self._backlog and self._inflight < self.max_inflight and not self._closed:
                self._start(*self._backlog.popleft())
            if not self.pending:
                self._idle.set()
