"""The channel emulator on the bus: every message between agents crosses the SimPy channel model.

::

    async with ChannelEmulator(cfg, run_id, address, agents=["coordinator", "client-0"], seed=0) as emu:
        ...                      # agents talk (BusSession in channel_mode='emulated')
        print(emu.stats())       # per-link counts and modeled latencies, JSON-ready

One more client on the bus, with the ``channel`` account (read ``tx/#``, write ``rx/#``). Each frame
a sender puts on the air (a whole message or one chunk of a chunked message) is one unit on the
link: it is submitted to the (src, dst) link of a :class:`~broker.channel.model.ChannelModel` with
its size and the kind's reliability; a broadcast (dst ``all``) crosses the sender's uplink once and
is forked at the base station, each copy with its own draws. Frames reach the emulator two ways,
both served at once (a session picks one with ``channel.relay``):

- ``headers`` (the default, for messages of ``held_min_bytes`` or more; broker/held.py): the body
  went straight to the receiver, who holds it;
  the emulator reads an *announce* on ``tx/<src>/...`` listing frames (message id, blake3,
  destination, kind, chunk index, size, and how long ago each left), submits each as of when it
  left, and at its delivery (or drop) publishes a *release* with the modeled times (or "lost") on
  ``rx/<dst>/<src>/<kind>``; the releases of one link that fall due while its previous release frame
  awaits the broker go out together. Bodies cross the broker once.
- ``bodies``: the frame itself arrives on ``tx/<src>/<dst>/<kind>``; on delivery it is republished on
  ``rx/<dst>/<src>/<kind>`` (per destination, broadcasts included) with its modeled send and arrival
  times written into its frame prefix (what :func:`broker.wire.restamp` does, with one copy less);
  a dropped one is only counted. Bodies cross the broker twice.

A lost chunk makes the receiver's reassembly expire, as a lost packet of an unacknowledged
transfer would. Agents are the same code in both channel modes and both relays.

Modeled time reaches receivers in the headers: ``msg.header.t_model_send`` is when the frame went
on the air (the emulator read it; with ``relay: headers``, the sender published it; modeled seconds
since the epoch: by default the moment the emulator subscribed), ``t_model_arrive`` when the
channel delivered it; for a chunked message the earliest chunk send and the latest chunk arrival.
That is how a coordinator tells who made a deadline: compare ``t_model_arrive`` with the round's
start in modeled time, which an in-process coordinator reads from :meth:`modeled_now` and one in
another process derives from :attr:`epoch_unix` and ``time_scale`` (modeled seconds =
(time.time() - epoch_unix) / time_scale). A runner that starts the emulator as a process of its own
picks the epoch itself and passes it to both (``epoch_unix=`` here, ``--epoch-unix`` on the command
line). There is no per-message lookup in the emulator.

Driving: a :class:`~broker.channel.clock.RealtimeDriver` on the asyncio loop runs the model as far
as the loop's clock (scaled by ``time_scale``) on each arrival and on a timer for the next event,
never sleeping. Deliveries and releases go to the ordered outbox of broker/channel/relay.py (QoS 1
publishes in delivery order, a bounded in-flight window, a backlog behind it), so the model never
waits for the broker. Malformed input (bad topic, bad frame prefix or announce, unknown agent) is counted by reason in
``stats()["rejected"]`` and dropped, never raised. The connection (persistent session, reconnects
with backoff) is broker/channel/relay.py's too. Messages still inside the model when the emulator
exits are lost, as on a radio switched off; :meth:`flush` waits for them first.

Also a process of its own: ``python -m broker.channel.emulator --run-id R --broker mqtt://channel@host:port
--agents coordinator,client-0,client-1 [--config channel.json | --preset wifi]`` (password from
$NMOE_BROKER_PASSWORD; channel.json is ``dataclasses.asdict`` of the scenario's ChannelConfig); it
prints ``ready`` once subscribed and its stats as JSON on exit (SIGINT/SIGTERM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from broker.auth import PASSWORD_ENV, BrokerAddress
from broker.channel.clock import RealtimeDriver
from broker.channel.config import (
    PRESET_NAMES,
    ChannelConfig,
    ClientOverrides,
    DirectionOverrides,
    LinkOverrides,
)
from broker.channel.model import ChannelModel, Delivery, Result
from broker.channel.relay import RelayOptions, RelaySession
from broker.chunks import read_chunk
from broker.envelope import FRAME_CHUNK, STAMPS, STAMPS_OFFSET, unpack_prefix
from broker.held import FRAME_ANNOUNCE, MAX_ENTRIES, Announce, Release, frame_type, pack_releases, read_announce
from broker.topics import Kind, ParsedTopic, Topics
from nmoe.errors import ChannelError, NmoeError, WireError

__all__ = ["ChannelEmulator", "RelayOptions", "config_from_dict", "main"]

log = logging.getLogger(__name__)

_LOUD_PER_REASON = 10  # log the first rejections of each reason as warnings, the rest at debug


class _Frame:
    """One payload taken off the air; the model carries it as the key of its message."""

    __slots__ = ("parsed", "payload")

    def __init__(self, parsed: ParsedTopic, payload: bytes) -> None:
        self.parsed, self.payload = parsed, payload


class _Held:
    """One frame of a held body (``relay: headers``): only its header is on the air."""

    __slots__ = ("announce", "src")

    def __init__(self, src: str, announce: Announce) -> None:
        self.src, self.announce = src, announce


class _ReleaseLink:
    """Releases of one (src, dst) link: one frame awaits the broker at a time, the rest batch behind it.

    A relayed body of the link (a message under ``held_min_bytes``) delivered while releases wait
    queues behind them, so that the link's deliveries reach the receiver in the model's order.
    """

    __slots__ = ("busy", "pending", "topic")

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.pending: list[Release | tuple[str, bytearray]] = []  # releases, or (rx topic, relayed frame)
        self.busy = False  # a publish of this link is scheduled or awaits its PUBACK


class ChannelEmulator:
    """The channel between ``agents`` on the bus of run ``run_id``; use as ``async with``.

    ``address`` carries the channel account's credentials; ``seed`` is the scenario's (used when
    ``cfg.seed`` is None); ``wired`` agents sit at the base station behind an ideal wire.
    ``epoch_unix`` anchors modeled time 0 to that ``time.time()`` (default: when subscribed). Raises
    ChannelError for a config the model refuses (``model: direct``, unknown agents) and, at entry,
    when the broker cannot be used (the message names the redacted address).
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
        epoch_unix: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.topics = Topics(run_id)
        self.model = ChannelModel(cfg, agents, seed, wired=wired, on_result=self._on_result)
        self.driver = RealtimeDriver(self.model, cfg.time_scale)
        self.session = RelaySession(self.topics, address, options or RelayOptions(), self._on_message,
                                    on_subscribed=self._start_clock)  # fmt: skip
        self._rx_topics: dict[tuple[str, str, Kind], str] = {}
        self._release_links: dict[tuple[str, str], _ReleaseLink] = {}  # (src, dst) -> its releases
        self._rejected: Counter[str] = Counter()
        self._counts: Counter[str] = Counter()
        if epoch_unix is not None and not math.isfinite(epoch_unix):
            raise ValueError("epoch_unix: must be a finite number")
        self._epoch_unix = epoch_unix

    # -- time ------------------------------------------------------------------------------------
    def modeled_now(self) -> float:
        """Modeled seconds since the epoch (the model's clock before the emulator subscribed)."""
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

    def _start_clock(self) -> None:
        """Runs once subscribed, before the first payload is read."""
        if self._epoch_unix is not None:  # the model is idle: moving its clock on draws nothing
            self.model.run_until(max(0.0, (time.time() - self._epoch_unix) / self.time_scale))
        self.driver.start()
        if self._epoch_unix is None:
            self._epoch_unix = time.time() - self.driver.modeled_now() * self.time_scale

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        """Whether the bus session is up (it reconnects by itself)."""
        return self.session.connected

    async def __aenter__(self) -> ChannelEmulator:
        await self.session.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            for link in self._release_links.values():  # releases still batched go out too
                while link.pending:
                    topic, payload = self._next_publish(link)
                    self.session.publish(topic, payload)
            await self.session.__aexit__(*exc)
        finally:
            self.driver.close()

    async def wait_closed(self) -> None:
        """Return when the bus session ends; raise what ended it if it failed."""
        await self.session.wait_closed()

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until nothing is in the model and every delivery is acknowledged by the broker."""

        async def idle() -> None:
            loop = asyncio.get_running_loop()
            while True:
                nxt = self.model.env.peek()
                if nxt < math.inf:  # messages on their way: wake when the next one is due
                    await asyncio.sleep(max(0.0, self.driver.wall_time(nxt) - loop.time()))
                    await asyncio.sleep(0)  # let the driver's timer run first
                    continue
                await self.session.wait_published()
                if self._releases_waiting():  # batched behind a frame just acknowledged
                    await asyncio.sleep(0)
                    continue
                if self.model.env.peek() == math.inf:
                    return

        await asyncio.wait_for(idle(), timeout)

    # -- off the air -----------------------------------------------------------------------------
    def _reject(self, reason: str, topic: str, detail: object) -> None:
        self._rejected[reason] += 1
        level = logging.WARNING if self._rejected[reason] <= _LOUD_PER_REASON else logging.DEBUG
        log.log(level, "channel emulator dropped a payload on %s: %s", topic[:200], detail)

    def _on_message(self, topic: str, payload: bytes) -> None:
        try:
            parsed = self.topics.parse(topic)
            if parsed.direction != "tx":
                raise WireError("bad_topic", "not a tx topic")
            if frame_type(payload) == FRAME_ANNOUNCE:
                self._on_announce(topic, parsed, payload)
                return
        except WireError as err:
            self._counts["frames_in"] += 1
            self._counts["bytes_in"] += len(payload)
            self._reject(err.reason, topic, err)
            return
        self._counts["frames_in"] += 1
        self._counts["bytes_in"] += len(payload)
        try:
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

    def _on_announce(self, topic: str, parsed: ParsedTopic, payload: bytes) -> None:
        """Frames the sender published on held topics: each goes on the air by its size alone, as of
        when the sender published it (its age when the announce left, bounded by broker/held.py)."""
        entries = read_announce(payload)
        self._counts["announces"] += 1
        now = self.modeled_now()
        for entry in entries:
            # the frames it announces are what is on the air (counted as the full relay counts them)
            self._counts["frames_in"] += 1
            self._counts["bytes_in"] += entry.size
            self._counts["announced"] += 1
            if entry.dst == parsed.src:
                self._reject("bad_announce", topic, "a frame to its own sender")
                continue
            try:
                self.driver.submit(parsed.src, entry.dst, entry.size, reliable=self.cfg.is_reliable(entry.kind.value),
                                   key=_Held(parsed.src, entry), at=now - entry.age_s / self.time_scale)  # fmt: skip
            except ChannelError as err:
                self._reject("unknown_agent", topic, err)

    # -- onto the air ----------------------------------------------------------------------------
    def _rx_topic(self, dst: str, parsed: ParsedTopic) -> str:
        key = (dst, parsed.src, parsed.kind)
        topic = self._rx_topics.get(key)
        if topic is None:
            topic = self._rx_topics[key] = self.topics.rx(dst, parsed.src, parsed.kind)
        return topic

    def _on_result(self, result: Result) -> None:
        """Called by the model in modeled-time order; drops are tallied by the model itself."""
        key = result.key
        if isinstance(key, _Held):  # relay: headers: release (or report lost) the receiver's held frame
            a = key.announce
            t_arrive = result.t_arrive if isinstance(result, Delivery) else math.nan
            lost = not isinstance(result, Delivery)
            self._queue_release(key.src, result.dst, a.kind, Release(a.msg_id, a.blake3, a.kind, a.index, a.size,
                                                                    result.t_send, t_arrive, lost))  # fmt: skip
            return
        if not isinstance(result, Delivery):
            return
        assert isinstance(key, _Frame)
        # restamp() without its second copy: paho takes a bytearray as it is (the prefix was checked).
        payload = bytearray(key.payload)
        STAMPS.pack_into(payload, STAMPS_OFFSET, result.t_send, result.t_arrive)
        topic = self._rx_topic(result.dst, key.parsed)
        link = self._release_links.get((key.parsed.src, result.dst))
        if link is not None and link.busy:  # not before the releases the model delivered ahead of it
            link.pending.append((topic, payload))
        else:
            self.session.publish(topic, payload)

    def _queue_release(self, src: str, dst: str, kind: Kind, release: Release) -> None:
        link = self._release_links.get((src, dst))
        if link is None:
            link = self._release_links[(src, dst)] = _ReleaseLink(self.topics.rx(dst, src, kind))
        link.pending.append(release)
        if not link.busy:  # batch what falls due in this loop step; later ones wait for its PUBACK
            link.busy = True
            try:
                asyncio.get_running_loop().call_soon(self._send_releases, link)
            except RuntimeError:  # driven outside a loop (tests of the model): publish at once
                self._send_releases(link)

    def _send_releases(self, link: _ReleaseLink) -> None:
        """Publish the link's next pending item, in order; the one after it when it is acknowledged."""
        if not link.pending:
            link.busy = False
            return
        link.busy = True
        topic, payload = self._next_publish(link)
        self.session.publish(topic, payload, on_done=lambda: self._send_releases(link))

    def _next_publish(self, link: _ReleaseLink) -> tuple[str, bytes | bytearray]:
        """Take the link's next publish: a relayed frame, or one frame of the releases ahead of it."""
        head = link.pending[0]
        if isinstance(head, tuple):
            link.pending.pop(0)
            return head
        n = 0
        while n < len(link.pending) and n < MAX_ENTRIES and isinstance(link.pending[n], Release):
            n += 1
        batch = [r for r in link.pending[:n] if isinstance(r, Release)]
        del link.pending[:n]
        self._counts["releases"] += len(batch)
        self._counts["releases_lost"] += sum(r.lost for r in batch)
        self._counts["release_frames"] += 1
        return link.topic, pack_releases(batch)

    def _releases_waiting(self) -> bool:
        return any(link.pending for link in self._release_links.values())

    # -- reporting -------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Per-link and total counts, JSON-ready; the unit is the MQTT payload (one per chunk).

        ``links["src->dst"]``: delivered, dropped (by reason), retransmissions (packets resent),
        bytes (delivered), latency_p50_s/p95_s/p99_s (modeled seconds, None before a delivery).
        ``totals``: the same summed, plus frames_in/bytes_in (taken off the air; a held frame counts
        when its announce is read, with its own size), published/
        bytes_out (acknowledged by the broker), publish_failed, backlog_peak, reconnects, and for
        held bodies (``relay: headers``) announces (MQTT publishes read), announced (the frames
        they listed, submitted by size), releases (sent to
        receivers, one per frame and destination), releases_lost (of them, reporting a drop) and
        release_frames (the MQTT publishes they were batched into).
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
        counts = self._counts + self.session.counts
        names = ("frames_in", "bytes_in", "published", "bytes_out", "publish_failed", "backlog_peak", "reconnects",
                 "announces", "announced", "releases", "releases_lost", "release_frames")
        totals: dict[str, Any] = {
            "delivered": summed["delivered"], "dropped": dict(dropped), "retransmissions": summed["retransmissions"],
            "bytes": summed["bytes"], **{k: counts[k] for k in names},
        }  # fmt: skip
        return {
            "modeled_now_s": self.modeled_now(), "time_scale": self.time_scale, "epoch_unix": self.epoch_unix,
            "links": links, "totals": totals, "rejected": dict(self._rejected),
        }  # fmt: skip


# -- as a process of its own ------------------------------------------------------------------------
def config_from_dict(data: dict[str, Any]) -> ChannelConfig:
    """The inverse of ``dataclasses.asdict(cfg)`` (e.g. after a JSON round trip); ValueError if invalid."""

    def link(raw: dict[str, Any], cls: type[LinkOverrides]) -> LinkOverrides:
        sides = {k: None if raw.get(k) is None else DirectionOverrides(**raw[k]) for k in ("uplink", "downlink")}
        return cls(**(raw | sides))

    try:
        fields = dict(data)
        fields["link"] = link(fields.get("link") or {}, LinkOverrides)
        fields["clients"] = {k: link(v, ClientOverrides) for k, v in (fields.get("clients") or {}).items()}
        if "reliable_kinds" in fields:
            fields["reliable_kinds"] = tuple(fields["reliable_kinds"])
        return ChannelConfig(**fields)
    except TypeError as err:  # an unknown key
        raise ValueError(f"channel config: {err}") from err


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m broker.channel.emulator",
        description="Relay one run's traffic through the SimPy channel model (the channel account).",
    )
    p.add_argument("--run-id", required=True)
    p.add_argument("--broker", required=True, help=f"mqtt[s]://channel@host:port (password from ${PASSWORD_ENV})")
    p.add_argument("--agents", required=True, help="comma-separated agent ids, wired ones included")
    p.add_argument("--wired", default="coordinator", help="comma-separated wired agents ('' for none)")
    p.add_argument("--config", type=Path, default=None,
                   help="the channel section as JSON (dataclasses.asdict of a ChannelConfig); default: wifi")
    p.add_argument("--preset", default=None, choices=PRESET_NAMES, help="overrides the config's preset")
    p.add_argument("--time-scale", type=float, default=None, help="wall seconds per modeled second (overrides)")
    p.add_argument("--seed", type=int, default=0, help="the scenario's seed (the config's seed wins if set)")
    p.add_argument("--epoch-unix", type=float, default=None, help="time.time() of modeled time 0 (default: start)")
    p.add_argument("--stats", type=Path, default=None, help="write the stats JSON here (default: stdout)")
    p.add_argument("--stats-every", type=float, default=None, metavar="SECONDS",
                   help="with --stats: also rewrite the file (atomically) this often while running (live views)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run until SIGINT/SIGTERM; print ``ready`` once subscribed and the stats as JSON on exit."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        address = BrokerAddress.parse(args.broker)
        if address.username is None:
            address = replace(address, username="channel")
        cfg = config_from_dict(json.loads(args.config.read_text())) if args.config else ChannelConfig()
        changes = {"preset": args.preset, "time_scale": args.time_scale}
        cfg = replace(cfg, **{k: v for k, v in changes.items() if v is not None})
        agents = [a for a in args.agents.split(",") if a]
        wired = [a for a in args.wired.split(",") if a]
        emulator = ChannelEmulator(cfg, args.run_id, address, agents, args.seed, wired, epoch_unix=args.epoch_unix)
        if args.stats_every is not None and (args.stats is None or not args.stats_every > 0):
            raise ValueError("--stats-every needs --stats FILE and a positive number of seconds")
        stats = asyncio.run(_serve(emulator, args.stats if args.stats_every else None, args.stats_every or 0.0))
    except (NmoeError, ValueError, OSError) as err:
        print(f"channel emulator: {err}", file=sys.stderr)
        return 2
    text = json.dumps(stats, indent=2)
    if args.stats is None:
        print(text, flush=True)
    else:
        _write_atomic(args.stats, text + "\n")
    return 0


def _write_atomic(path: Path, text: str) -> None:
    """A reader polling the file sees the previous stats or the new ones, never half of them."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def _keep_writing(emulator: ChannelEmulator, path: Path, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        try:
            _write_atomic(path, json.dumps(emulator.stats()))
        except OSError as err:  # a full disk costs the live view, never the relay
            logging.getLogger(__name__).warning("could not write the live stats to %s: %s", path, err)


async def _serve(emulator: ChannelEmulator, live_stats: Path | None = None, every_s: float = 0.0) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with emulator:
        print("ready", flush=True)
        writer = loop.create_task(_keep_writing(emulator, live_stats, every_s)) if live_stats is not None else None
        stopped, closed = loop.create_task(stop.wait()), loop.create_task(emulator.wait_closed())
        await asyncio.wait({stopped, closed}, return_when=asyncio.FIRST_COMPLETED)
        if writer is not None:
            writer.cancel()
        stopped.cancel()
        if closed.done():
            closed.result()  # raises what ended the session
        closed.cancel()
    return emulator.stats()


if __name__ == "__main__":
    sys.exit(main())
