"""The channel emulator on the bus: every message between agents crosses the SimPy channel model.

::

    async with ChannelEmulator(cfg, run_id, address, agents=["coordinator", "client-0"], seed=0) as emu:
        ...                      # agents talk (BusSession in channel_mode='emulated')
        print(emu.stats())       # per-link counts and modeled latencies, JSON-ready

One more client on the bus, with the ``channel`` account (read ``tx/#``, write ``rx/#``). Each MQTT
payload a sender puts on the air (``tx/<src>/<dst>/<kind>``, a whole message or one chunk of a
chunked message) is one unit on the link: it is submitted to the (src, dst) link of a
:class:`~broker.channel.model.ChannelModel` with its size and the kind's reliability; a broadcast
(dst ``all``) crosses the sender's uplink once and is forked at the base station, each copy with
its own draws. On delivery the payload is republished on ``rx/<dst>/<src>/<kind>`` (per
destination, broadcasts included) with its modeled send and arrival times written into its frame
prefix by :func:`broker.wire.restamp`; a dropped one is only counted. A lost chunk makes the
receiver's reassembly expire, as a lost packet of an unacknowledged transfer would. Agents are the
same code in both channel modes.

Modeled time reaches receivers in the headers: ``msg.header.t_model_send`` is when the emulator
took the payload off the air (modeled seconds since the emulator started), ``t_model_arrive`` when
the channel delivered it; for a chunked message the earliest chunk send and the latest chunk
arrival. That is how a coordinator tells who made a deadline: compare ``t_model_arrive`` with the
round's start in modeled time, which an in-process coordinator reads from :meth:`modeled_now` and
one in another process derives from :attr:`epoch_unix` and ``time_scale`` (modeled seconds =
(time.time() - epoch_unix) / time_scale). There is no per-message lookup in the emulator.

Driving: a :class:`~broker.channel.clock.RealtimeDriver` on the asyncio loop runs the model as far
as the loop's clock (scaled by ``time_scale``) on each arrival and on a timer for the next event,
never sleeping. Deliveries are published as QoS 1 tasks in delivery order (so each link keeps its
FIFO order) within a bounded in-flight window; beyond it they wait in a backlog, so the model's
processing never waits for the broker. Malformed input (bad topic, bad frame prefix, unknown agent)
is counted by reason in ``stats()["rejected"]`` and dropped, never raised.

Robustness: the session is persistent (``clean_session=False``) so that the broker queues the air
traffic while the emulator reconnects (with backoff); it unsubscribes on a clean exit. Publishes
retry across reconnections until ``publish_timeout_s``. Messages still inside the model when the
emulator exits are lost, as on a radio that is switched off; :meth:`flush` waits for them first.

Also a process of its own: ``python -m broker.channel.emulator --run-id R --broker mqtt://channel@host:port
--agents coordinator,client-0,client-1 --preset wifi`` (password from $NMOE_BROKER_PASSWORD); it
prints ``ready`` once subscribed and its stats as JSON on exit (SIGINT/SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import random
import signal
import socket
import ssl
import sys
import time
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiomqtt

from broker.auth import PASSWORD_ENV, BrokerAddress
from broker.channel.clock import RealtimeDriver
from broker.channel.config import PRESET_NAMES, ChannelConfig
from broker.channel.model import ChannelModel, Delivery, Result
from broker.channel.outbox import Outbox
from broker.chunks import read_chunk
from broker.envelope import FRAME_CHUNK, restamp, unpack_prefix
from broker.errors import ChannelError, NmoeError, WireError
from broker.topics import Kind, ParsedTopic, Status, Topics

log = logging.getLogger(__name__)

_LOUD_PER_REASON = 10  # log the first rejections of each reason as warnings, the rest at debug
_AUTH_FAILURES = {4, 5, 134, 135}  # CONNACK: bad user name or password / not authorized


@dataclass(frozen=True)
class RelayOptions:
    """How the emulator uses the bus (the channel itself is configured by ChannelConfig)."""

    qos: int = 1
    """QoS of the subscription to tx/# and of the relayed publishes."""
    max_inflight: int = 256
    """Relayed publishes awaiting their PUBACK at once; later deliveries wait in order."""
    publish_timeout_s: float = 30.0
    """A delivery not acknowledged by the broker in this time (reconnections included) is lost."""
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
    """On exit, wait this long for deliveries already handed to the broker to be acknowledged."""

    def __post_init__(self) -> None:
        if self.qos not in (0, 1):
            raise ValueError("qos: must be 0 or 1")
        if self.max_inflight < 1:
            raise ValueError("max_inflight: must be >= 1")
        positive = ("publish_timeout_s", "connect_timeout_s", "reconnect_initial_s", "keepalive_s")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0")
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s: must be >= reconnect_initial_s")
        if self.flush_on_exit_s < 0:
            raise ValueError("flush_on_exit_s: must be >= 0")


@dataclass(slots=True, eq=False)
class _Frame:
    """One payload taken off the air; the model carries it as the key of its message."""

    parsed: ParsedTopic
    payload: bytes


class ChannelEmulator:
    """The channel between ``agents`` on the bus of run ``run_id``; use as ``async with``.

    ``address`` carries the channel account's credentials; ``seed`` is the scenario's (used when
    ``cfg.seed`` is None); ``wired`` agents sit at the base station behind an ideal wire.
    Raises ChannelError for a config the model refuses (``model: direct``, unknown agents), and
    BrokerError-free: connection problems at entry raise ChannelError naming the redacted address.
    """

    def __init__(
        self,
        cfg: ChannelConfig,
        run_id: str,
        address: BrokerAddress,
        agents: Iterable[str],
        seed: int,
        wired: Collection[str] = ("coordinator",),
        *,
        options: RelayOptions | None = None,
    ) -> None:
        self.cfg = cfg
        self.topics = Topics(run_id)
        self.address = address
        self.options = options or RelayOptions()
        self.model = ChannelModel(cfg, agents, seed, wired=wired, on_result=self._on_result)
        self.driver = RealtimeDriver(self.model, cfg.time_scale)
        self.username = address.username or "channel"
        self._rx_topics: dict[tuple[str, str, Kind], str] = {}
        self._rejected: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()
        self._connected = asyncio.Event()
        self._closing = False
        self._fatal: BaseException | None = None
        self._client: aiomqtt.Client | None = None
        self._outbox: Outbox | None = None
        self._runner: asyncio.Task[None] | None = None
        self._epoch_unix: float | None = None

    # -- time ------------------------------------------------------------------------------------
    def modeled_now(self) -> float:
        """Modeled seconds since the emulator started (the model's clock before it started)."""
        try:
            return self.driver.modeled_now()
        except RuntimeError:
            return self.model.now

    def wall_time(self, t_model: float) -> float:
        """The loop time (``loop.time()``) at which modeled time ``t_model`` is due."""
        return self.driver.wall_time(t_model)

    @property
    def epoch_unix(self) -> float | None:
        """``time.time()`` at modeled time 0 (None before start): for clocks in other processes."""
        return self._epoch_unix

    @property
    def time_scale(self) -> float:
        return self.driver.time_scale

    # -- lifecycle -------------------------------------------------------------------------------
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
            tls_context=ssl.create_default_context() if addr.tls else None,
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            logger=logging.getLogger(f"{__name__}.mqtt"),
        )  # fmt: skip
        client.pending_calls_threshold = 1 << 30  # the window below bounds what is pending
        return client

    async def __aenter__(self) -> ChannelEmulator:
        loop = asyncio.get_running_loop()
        self._client = self._make_client()
        opts = self.options
        self._outbox = Outbox(self._client, self._connected, qos=opts.qos, max_inflight=opts.max_inflight,
                              timeout_s=opts.publish_timeout_s)  # fmt: skip
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
        client = self._client
        if client is not None and self._connected.is_set():
            with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                await client.unsubscribe(self.topics.tx_filter(), timeout=2.0)  # the broker stops queueing
            if self.options.flush_on_exit_s > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wait_published(), self.options.flush_on_exit_s)
            if self.options.announce_status:
                with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                    await client.publish(self.topics.status(self.username), Status.OFFLINE.value, qos=1,
                                         retain=True, timeout=2.0)  # fmt: skip
        await self._shutdown()

    async def _shutdown(self) -> None:
        self._closing = True
        self.driver.close()
        if self._outbox is not None:
            await self._outbox.close()
        if self._runner is not None and not self._runner.done():
            self._runner.cancel()
        if self._runner is not None:
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._runner
        self._connected.clear()

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until nothing is in the model and every delivery is acknowledged by the broker."""

        async def idle() -> None:
            while True:
                nxt = self.model.env.peek()
                if nxt < math.inf:  # messages on their way: wake when the next one is due
                    await asyncio.sleep(max(0.0, self.driver.wall_time(nxt) - asyncio.get_running_loop().time()))
                    await asyncio.sleep(0)  # let the driver's timer run first
                    continue
                await self._wait_published()
                if self.model.env.peek() == math.inf:
                    return

        await asyncio.wait_for(idle(), timeout)

    async def _wait_published(self) -> None:
        if self._outbox is not None:
            await self._outbox.wait_idle()

    async def _run(self) -> None:
        """The connection loop: connect, subscribe, read; reconnect with backoff."""
        assert self._client is not None
        opts = self.options
        backoff = opts.reconnect_initial_s
        ever_connected = False
        while not self._closing:
            try:
                async with self._client:
                    await self._on_connect()
                    if ever_connected:
                        self._counts["reconnects"] += 1
                        log.info("channel emulator reconnected to %s", self.address.redacted())
                    else:
                        self.driver.start()  # modeled time 0 = subscribed
                        self._epoch_unix = time.time()
                    ever_connected = True
                    backoff = opts.reconnect_initial_s
                    self._connected.set()
                    async for message in self._client.messages:
                        self._on_message(message)
            except aiomqtt.MqttError as err:
                self._connected.clear()
                if self._closing:
                    return
                refused = isinstance(err, aiomqtt.MqttCodeError) and _code(err.rc) in _AUTH_FAILURES
                if refused and not ever_connected:
                    self._fatal = ChannelError(f"broker refused the credentials ({err})")
                    return
                log.warning("channel emulator lost the broker (%s); retrying in %.2fs", err, backoff)
            except ChannelError as err:  # a refused subscription: configuration, not weather
                self._fatal = err
                self._connected.clear()
                return
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, opts.reconnect_max_s)

    async def _on_connect(self) -> None:
        assert self._client is not None
        granted = await self._client.subscribe(self.topics.tx_filter(), qos=self.options.qos)
        if any(_code(code) >= 0x80 for code in granted):
            raise ChannelError(f"broker refused the subscription to {self.topics.tx_filter()}")
        if self.options.announce_status:
            await self._client.publish(self.topics.status(self.username), Status.ONLINE.value, qos=1, retain=True)

    # -- off the air -----------------------------------------------------------------------------
    def _reject(self, reason: str, topic: str, detail: object) -> None:
        self._rejected[reason] += 1
        level = logging.WARNING if self._rejected[reason] <= _LOUD_PER_REASON else logging.DEBUG
        log.log(level, "channel emulator dropped a payload on %s: %s", topic[:200], detail)

    def _on_message(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload
        if not isinstance(payload, bytes):
            self._reject("bad_magic", topic, "empty or non-binary payload")
            return
        self._counts["frames_in"] += 1
        self._counts["bytes_in"] += len(payload)
        try:
            parsed = self.topics.parse(topic)
            if parsed.direction != "tx":
                raise WireError("bad_topic", "not a tx topic")
            if unpack_prefix(payload)[0] == FRAME_CHUNK:
                read_chunk(payload)  # index, total and length must make sense
        except WireError as err:
            self._reject(err.reason, topic, err)
            return
        reliable = self.cfg.is_reliable(parsed.kind.value)
        try:
            self.driver.submit(parsed.src, parsed.dst, len(payload), reliable=reliable, key=_Frame(parsed, payload))
        except ChannelError as err:  # an agent the channel does not know
            self._reject("unknown_agent", topic, err)

    # -- onto the air ----------------------------------------------------------------------------
    def _rx_topic(self, dst: str, parsed: ParsedTopic) -> str:
        key = (dst, parsed.src, parsed.kind)
        topic = self._rx_topics.get(key)
        if topic is None:
            topic = self._rx_topics[key] = self.topics.rx(dst, parsed.src, parsed.kind)
        return topic

    def _on_result(self, result: Result) -> None:
        """Called by the model, in modeled-time order; drops are tallied by the model itself."""
        if not isinstance(result, Delivery) or self._closing:
            return
        frame = result.key
        assert isinstance(frame, _Frame)
        topic = self._rx_topic(result.dst, frame.parsed)
        payload = restamp(frame.payload, t_model_send=result.t_send, t_model_arrive=result.t_arrive)
        assert self._outbox is not None
        self._outbox.put(topic, payload)

    # -- reporting -------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Per-link and total counts, JSON-ready; the unit is the MQTT payload (one per chunk).

        ``links["src->dst"]``: delivered, dropped (by reason), retransmissions (packets resent),
        bytes (delivered), latency_p50_s/p95_s/p99_s (modeled seconds, None before a delivery).
        ``totals``: the same summed, plus frames_in/bytes_in (taken off the air), published/
        bytes_out (acknowledged by the broker), publish_failed, backlog_peak, reconnects.
        ``rejected``: malformed input by reason (bad_topic, bad_magic, truncated, bad_chunk, ...).
        """
        links: dict[str, dict[str, Any]] = {}
        dropped: Counter[str] = Counter()
        summed: Counter[str] = Counter()
        for (src, dst), s in self.model.stats().items():
            links[f"{src}->{dst}"] = {
                "delivered": s.delivered, "dropped": dict(s.dropped), "retransmissions": s.retransmissions,
                "bytes": s.bytes_delivered, "latency_p50_s": s.latency_p50, "latency_p95_s": s.latency_p95,
                "latency_p99_s": s.latency_p99,
            }  # fmt: skip
            dropped.update(s.dropped)
            summed.update(delivered=s.delivered, retransmissions=s.retransmissions, bytes=s.bytes_delivered)
        counts = self._counts + (self._outbox.counts if self._outbox is not None else Counter())
        names = ("frames_in", "bytes_in", "published", "bytes_out", "publish_failed", "backlog_peak", "reconnects")
        totals: dict[str, Any] = {
            "delivered": summed["delivered"], "dropped": dict(dropped), "retransmissions": summed["retransmissions"],
            "bytes": summed["bytes"], **{k: counts[k] for k in names},
        }  # fmt: skip
        return {
            "modeled_now_s": self.modeled_now(), "time_scale": self.time_scale, "links": links,
            "totals": totals, "rejected": dict(self._rejected),
        }  # fmt: skip


def _code(code: object) -> int:
    """A SUBACK/CONNACK result as an int (paho gives ints on 3.1.1 and ReasonCodes on 5)."""
    value = getattr(code, "value", code)
    return int(value) if isinstance(value, int) else 0x80


# -- as a process of its own ------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m broker.channel.emulator",
        description="Relay one run's traffic through the SimPy channel model (the channel account).",
    )
    p.add_argument("--run-id", required=True)
    p.add_argument("--broker", required=True, help=f"mqtt[s]://channel@host:port (password from ${PASSWORD_ENV})")
    p.add_argument("--agents", required=True, help="comma-separated agent ids, wired ones included")
    p.add_argument("--wired", default="coordinator", help="comma-separated wired agents ('' for none)")
    p.add_argument("--preset", default="wifi", choices=PRESET_NAMES)
    p.add_argument("--time-scale", type=float, default=1.0, help="wall seconds per modeled second")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stats", type=Path, default=None, help="write the stats JSON here (default: stdout)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run until SIGINT/SIGTERM; print ``ready`` once subscribed and the stats as JSON on exit."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        address = BrokerAddress.parse(args.broker)
        if address.username is None:
            address = replace(address, username="channel")
        cfg = ChannelConfig(preset=args.preset, time_scale=args.time_scale, seed=args.seed)
        agents = [a for a in args.agents.split(",") if a]
        wired = [a for a in args.wired.split(",") if a]
        emulator = ChannelEmulator(cfg, args.run_id, address, agents, args.seed, wired)
        stats = asyncio.run(_serve(emulator))
    except (NmoeError, ValueError) as err:
        print(f"channel emulator: {err}", file=sys.stderr)
        return 2
    text = json.dumps(stats, indent=2)
    if args.stats is None:
        print(text, flush=True)
    else:
        args.stats.write_text(text + "\n")
    return 0


async def _serve(emulator: ChannelEmulator) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with emulator:
        print("ready", flush=True)
        stopped = loop.create_task(stop.wait())
        assert emulator._runner is not None
        await asyncio.wait({stopped, emulator._runner}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        if emulator._fatal is not None:
            raise emulator._fatal
    return emulator.stats()


if __name__ == "__main__":
    sys.exit(main())
