"""The wireless channel model: a star of radio links around the base station, in modeled time.

Topology. The broker and the coordinator sit at the base station; the coordinator (and any other
``wired`` agent) is attached by an ideal wire. Every other agent is a client with an uplink (to the
base station) and a downlink (from it), each a :class:`~broker.channel.link.Link`. A message from
a to b crosses a's uplink, then b's downlink; hops of wired agents are skipped.

Hop composition: store-and-forward, as MQTT does it. The broker receives the whole message before
it forwards it, over a second connection, so the downlink hop starts when the uplink hop ends, and
each hop has its own queue, airtime, loss and retransmissions. Latency = uplink + downlink;
a message survives only if it survives both. A broadcast (dst ``all``) crosses its sender's uplink
once and is forked at the base station into one message per destination, every other agent.

Statistics and results are per (src, dst) pair, what the agents see; records carry modeled times.

Drop reasons: ``offline`` (the sender or receiver was offline while the message crossed its hop),
``loss`` (a packet was lost: any, for unreliable traffic; more than max_retries times, for
reliable traffic), ``outage`` (the link was in a fading outage for outage_timeout_s).

Driving. :meth:`ChannelModel.submit` injects a message at ``env.now``; :meth:`run_until` processes
everything due up to a modeled time, without sleeping. Results go to ``on_result`` if given, else
to a queue read with :meth:`drain`. An ideal path (no hop with delay, rate limit or loss) delivers
synchronously, inside ``submit``, without any SimPy event. broker.channel.clock ties this to asyncio.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

import numpy as np
import simpy

from broker.channel.config import ChannelConfig, RadioProfile
from broker.channel.link import Link, Transit
from broker.channel.loss import make_loss, stream
from broker.channel.medium import Medium
from broker.channel.presets import resolve_profile
from broker.channel.processes import OnOff, make_availability, make_rate
from broker.topics import BROADCAST
from nmoe.errors import ChannelError


@dataclass(frozen=True, slots=True)
class Delivery:
    """A message that arrived; times are modeled seconds."""

    key: object
    src: str
    dst: str
    nbytes: int
    t_send: float
    t_arrive: float
    retransmissions: int
    """Packets resent on its way (both hops; a broadcast's uplink resends count for every copy)."""

    @property
    def latency(self) -> float:
        return self.t_arrive - self.t_send


@dataclass(frozen=True, slots=True)
class Drop:
    """A message that never arrived, and why: 'offline', 'loss' or 'outage'."""

    key: object
    src: str
    dst: str
    nbytes: int
    t_send: float
    t_drop: float
    reason: str


Result = Delivery | Drop


@dataclass(frozen=True)
class LinkStats:
    """What one (src, dst) pair saw; latencies in modeled seconds (None before any delivery)."""

    src: str
    dst: str
    delivered: int
    dropped: dict[str, int]
    """Drops by reason."""
    retransmissions: int
    """Packets resent for this pair's messages, delivered or not."""
    bytes_delivered: int
    latency_p50: float | None
    latency_p95: float | None
    latency_p99: float | None

    @property
    def sent(self) -> int:
        return self.delivered + sum(self.dropped.values())


@dataclass
class _Tally:
    delivered: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    retransmissions: int = 0
    bytes_delivered: int = 0
    latencies: list[float] = field(default_factory=list)


class ChannelModel:
    """The channel between ``agents``: submit messages, collect Delivery/Drop results.

    ``seed`` is the scenario's seed, used when ``cfg.seed`` is None. ``wired`` agents (those of them
    in ``agents``) sit at the base station behind an ideal wire. Raises ChannelError for a config
    that names unknown agents or says ``model: direct``.
    """

    def __init__(
        self,
        cfg: ChannelConfig,
        agents: Iterable[str],
        seed: int,
        *,
        wired: Collection[str] = ("coordinator",),
        on_result: Callable[[Result], None] | None = None,
    ) -> None:
        if cfg.model != "emulated":
            raise ChannelError(f"channel.model is {cfg.model!r}: there is no channel to model")
        self.cfg = cfg
        self.agents: tuple[str, ...] = tuple(agents)
        if len(set(self.agents)) != len(self.agents) or BROADCAST in self.agents or "" in self.agents:
            raise ChannelError(f"agents must be distinct ids other than {BROADCAST!r}: {self.agents}")
        self._known = frozenset(self.agents)
        self.clients = tuple(a for a in self.agents if a not in wired)
        for what, names in (("clients", cfg.clients), ("shared_uplink", cfg.shared_uplink),
                            ("shared_downlink", cfg.shared_downlink)):
            unknown = sorted(set(names) - set(self.clients)) if isinstance(names, dict) else []
            if unknown:
                raise ChannelError(f"channel.{what}: {unknown[0]!r} is not a wireless client "
                                   f"(clients: {', '.join(self.clients)})")
        self.seed = cfg.seed if cfg.seed is not None else seed
        self.env = simpy.Environment()
        self.on_result = on_result
        self._results: deque[Result] = deque()
        self._tallies: dict[tuple[str, str], _Tally] = {}
        self._profiles: dict[str, RadioProfile] = {a: resolve_profile(cfg, a) for a in self.clients}
        self._availability: dict[str, OnOff | None] = {
            a: make_availability(p.mean_online_s, p.mean_offline_s, stream(self.seed, "availability", a))
            for a, p in self._profiles.items()
        }
        self._media: dict[tuple[str, str], Medium] = {}
        self._uplinks = {a: self._make_link(a, "uplink", self._at_base_station) for a in self.clients}
        self._downlinks = {a: self._make_link(a, "downlink", self._arrive) for a in self.clients}

    def _make_link(self, agent: str, direction: str, on_exit: Callable[[Transit], None]) -> Link:
        profile = self._profiles[agent]
        params = profile.uplink if direction == "uplink" else profile.downlink
        rate = make_rate(params, stream(self.seed, direction, agent, "rate"))
        cell = self.cfg.cell_of(agent, "uplink" if direction == "uplink" else "downlink")
        medium = None
        if rate is not None and cell is not None:
            medium = self._media.get((direction, cell))
            if medium is None:
                medium = self._media[(direction, cell)] = Medium(self.env, f"{direction}/{cell}")
        return Link(
            self.env, f"{direction}/{agent}", params, rate=rate, medium=medium,
            loss=make_loss(params, stream(self.seed, direction, agent, "loss")),
            jitter_rng=stream(self.seed, direction, agent, "jitter"),
            availability=self._availability[agent], on_exit=on_exit, on_drop=self._drop,
        )

    # -- driving ---------------------------------------------------------------------------------

    @property
    def now(self) -> float:
        """Current modeled time, seconds."""
        return float(self.env.now)

    def submit(self, src: str, dst: str, nbytes: int, *, reliable: bool = True, key: object = None) -> None:
        """Put a message from ``src`` to ``dst`` (an agent or ``all``) on the air at ``env.now``."""
        if src not in self._known:
            raise ChannelError(f"unknown sender {src!r}")
        if dst != BROADCAST and dst not in self._known:
            raise ChannelError(f"unknown destination {dst!r}")
        if nbytes < 0:
            raise ChannelError(f"nbytes must be >= 0 (got {nbytes})")
        msg = Transit(key, src, dst, int(nbytes), reliable, self.now)
        uplink = self._uplinks.get(src)
        if not self.is_online(src):
            self._drop(msg, "offline")
        elif uplink is None:
            self._at_base_station(msg)
        else:
            uplink.send(msg)

    def run_until(self, t: float) -> None:
        """Process every event due at or before modeled time ``t``; afterwards ``now == max(now, t)``."""
        if t > self.env.now:
            self.env.run(until=t)
        while self.env.peek() <= t:
            self.env.step()

    def run(self) -> None:
        """Process events until none is left (every message delivered or dropped)."""
        self.env.run()

    def drain(self) -> list[Result]:
        """Results not yet taken (only used when there is no ``on_result`` callback)."""
        out = list(self._results)
        self._results.clear()
        return out

    # -- availability ----------------------------------------------------------------------------

    def is_online(self, agent: str, t: float | None = None) -> bool:
        """Whether ``agent`` is online at modeled time ``t`` (default: now); wired agents always are."""
        onoff = self._availability.get(agent)
        return True if onoff is None else onoff.online_at(self.now if t is None else t)

    def online_throughout(self, agent: str, t0: float, t1: float) -> bool:
        """Whether ``agent`` is online at every moment of [t0, t1] (modeled times)."""
        onoff = self._availability.get(agent)
        return True if onoff is None else onoff.online_throughout(t0, t1)

    def profile(self, agent: str) -> RadioProfile | None:
        """The resolved radio of a client (None for a wired agent)."""
        return self._profiles.get(agent)

    # -- routing and results ---------------------------------------------------------------------

    def _at_base_station(self, msg: Transit) -> None:
        if msg.dst != BROADCAST:
            self._downlink_or_arrive(msg)
            return
        for dst in self.agents:
            if dst != msg.src:
                self._downlink_or_arrive(msg.fork(dst))

    def _downlink_or_arrive(self, msg: Transit) -> None:
        downlink = self._downlinks.get(msg.dst)
        if downlink is None:
            self._arrive(msg)
        else:
            downlink.send(msg)

    def _arrive(self, msg: Transit) -> None:
        now = self.now
        tally = self._tally(msg.src, msg.dst)
        tally.delivered += 1
        tally.retransmissions += msg.retransmissions
        tally.bytes_delivered += msg.nbytes
        tally.latencies.append(now - msg.t_send)
        self._emit(Delivery(msg.key, msg.src, msg.dst, msg.nbytes, msg.t_send, now, msg.retransmissions))

    def _drop(self, msg: Transit, reason: str) -> None:
        dsts = [a for a in self.agents if a != msg.src] if msg.dst == BROADCAST else [msg.dst]
        for dst in dsts:
            tally = self._tally(msg.src, dst)
            tally.dropped[reason] += 1
            tally.retransmissions += msg.retransmissions
            self._emit(Drop(msg.key, msg.src, dst, msg.nbytes, msg.t_send, self.now, reason))

    def _emit(self, result: Result) -> None:
        if self.on_result is None:
            self._results.append(result)
        else:
            self.on_result(result)

    def _tally(self, src: str, dst: str) -> _Tally:
        tally = self._tallies.get((src, dst))
        if tally is None:
            tally = self._tallies[(src, dst)] = _Tally()
        return tally

    def stats(self) -> dict[tuple[str, str], LinkStats]:
        """Per (src, dst) pair that carried traffic: counts, bytes and modeled latency percentiles."""
        out: dict[tuple[str, str], LinkStats] = {}
        for (src, dst), t in sorted(self._tallies.items()):
            p50 = p95 = p99 = None
            if t.latencies:
                p50, p95, p99 = (float(v) for v in np.percentile(t.latencies, [50, 95, 99]))
            out[(src, dst)] = LinkStats(src, dst, t.delivered, dict(t.dropped), t.retransmissions,
                                        t.bytes_delivered, p50, p95, p99)
        return out
