"""The channel's configuration: the scenario's ``channel:`` section and a link's resolved parameters.

Three layers, each a frozen dataclass validated on construction:

- :class:`LinkParams`: everything one direction of one client's radio link needs, complete.
- :class:`RadioProfile`: a client's radio, what a preset defines (uplink, downlink, availability).
- :class:`ChannelConfig`: what a scenario writes. Its ``link`` and ``clients`` sections hold
  *partial* settings (:class:`LinkOverrides`, :class:`ClientOverrides`; ``None`` means inherit),
  resolved onto a preset by :func:`broker.channel.presets.resolve_profile`.

Invalid values raise ``ConfigError("<field>: <what is allowed>")``; the scenario loader prefixes the
key path. Units are SI throughout: seconds, bits per second, hertz, bytes; SNRs in dB.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

from nmoe.errors import check

ChannelMode = Literal["direct", "emulated"]
RelayMode = Literal["headers", "bodies"]
PresetName = Literal["ideal", "wifi", "lte", "edge-poor"]
RateModel = Literal["unlimited", "fixed", "shannon"]
LossModel = Literal["none", "bernoulli", "gilbert_elliott"]

PRESET_NAMES: tuple[str, ...] = get_args(PresetName)
KINDS: tuple[str, ...] = ("model", "update", "corr", "latent", "logits", "ctrl", "metrics")
"""Message kinds of the topic scheme (mirrors broker.topics.Kind; a test keeps the two equal)."""


def _finite(x: float) -> bool:
    return math.isfinite(x)


MAX_DELAY_S = 3600.0  # a per-packet delay, jitter or resend timer of over an hour is a typo
TIME_SCALES = (1e-3, 1e3)  # wall-clock seconds per modeled second
MAX_SEED = 2**32 - 1


# One rule per link field, shared by the complete LinkParams and the partial overrides, so that a
# bad value is reported where the user wrote it.
_LINK_RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "rate_bps": ("must be a finite number > 0", lambda v: _finite(v) and v > 0),
    "bandwidth_hz": ("must be a finite number > 0", lambda v: _finite(v) and v > 0),
    "snr_db": ("must be a finite number", _finite),
    "coherence_s": ("must be a finite number > 0", lambda v: _finite(v) and v > 0),
    "min_snr_db": ("must be a finite number", _finite),
    "outage_timeout_s": ("must be a number > 0 (.inf: never)", lambda v: v > 0),
    "delay_s": ("must be a number in 0..3600", lambda v: 0 <= v <= MAX_DELAY_S),
    "jitter_s": ("must be a number in 0..3600", lambda v: 0 <= v <= MAX_DELAY_S),
    "loss_p": ("must be in [0, 1]", lambda v: 0 <= v <= 1),
    "ge_p": ("must be in [0, 1]", lambda v: 0 <= v <= 1),
    "ge_r": ("must be in (0, 1]", lambda v: 0 < v <= 1),
    "ge_loss_bad": ("must be in [0, 1]", lambda v: 0 <= v <= 1),
    "ge_loss_good": ("must be in [0, 1]", lambda v: 0 <= v <= 1),
    "mtu_bytes": ("must be an integer in 64..65535", lambda v: 64 <= v <= 65535),
    "rto_s": ("must be a number in 0..3600", lambda v: 0 <= v <= MAX_DELAY_S),
    "max_retries": ("must be an integer in 0..100", lambda v: 0 <= v <= 100),
    "mean_online_s": ("must be a number > 0 (.inf: always online)", lambda v: v > 0),
    "mean_offline_s": ("must be a finite number >= 0 (0: never offline)", lambda v: _finite(v) and v >= 0),
}


def _check_fields(obj: Any) -> None:
    for f in fields(obj):
        rule = _LINK_RULES.get(f.name)
        value = getattr(obj, f.name)
        if rule is None or value is None:
            continue
        msg, ok = rule
        check(ok(value), f.name, f"{msg} (got {value!r})")
    for name, allowed in (("rate", get_args(RateModel)), ("loss", get_args(LossModel))):
        value = getattr(obj, name, None)
        check(value is None or value in allowed, name, f"must be one of {', '.join(allowed)} (got {value!r})")


@dataclass(frozen=True)
class LinkParams:
    """One direction (uplink: client -> base station, or downlink) of one client's radio link."""

    rate: RateModel = "unlimited"
    """'unlimited' (no airtime), 'fixed' (rate_bps) or 'shannon' (B log2(1 + SNR X), Rayleigh X)."""
    rate_bps: float = 1e9
    """Fixed rate: the link's rate when it has the medium to itself, bits per second."""
    bandwidth_hz: float = 10e6
    """Shannon: bandwidth B in hertz."""
    snr_db: float = 10.0
    """Shannon: mean SNR in dB; each coherence block draws a power gain X ~ Exp(1) (Rayleigh)."""
    coherence_s: float = 0.05
    """Shannon: coherence time; the fading gain is redrawn every block of this length."""
    min_snr_db: float = -100.0
    """Shannon: a block whose SNR X is below this carries nothing (an outage; LTE's lowest CQI: ~-6.7)."""
    outage_timeout_s: float = math.inf
    """A message stalled by outages this long is dropped with reason 'outage'."""
    delay_s: float = 0.0
    """One-way propagation and processing delay, added after the last bit is sent (0..3600 s)."""
    jitter_s: float = 0.0
    """Standard deviation of a normal jitter added to delay_s (netem's default shape), clipped at 0
    (0..3600 s)."""
    loss: LossModel = "none"
    """Per-packet loss: none, independent (Bernoulli) or Gilbert-Elliott bursts."""
    loss_p: float = 0.0
    """Bernoulli: loss probability of each packet."""
    ge_p: float = 0.0
    """Gilbert-Elliott (netem 'gemodel p r 1-h 1-k'): good -> bad transition probability per packet."""
    ge_r: float = 1.0
    """Gilbert-Elliott: bad -> good transition probability per packet (mean burst 1/r packets)."""
    ge_loss_bad: float = 1.0
    """Gilbert-Elliott: loss probability in the bad state (netem's 1-h)."""
    ge_loss_good: float = 0.0
    """Gilbert-Elliott: loss probability in the good state (netem's 1-k)."""
    mtu_bytes: int = 1500
    """Packet size: a message of S bytes is ceil(S / mtu_bytes) packets, each lost or not."""
    rto_s: float = 0.2
    """Reliable traffic: delay before lost packets are resent (one round of selective repeat), 0..3600 s."""
    max_retries: int = 7
    """Reliable traffic: a packet lost more often than this loses its message (reason 'loss')."""

    def __post_init__(self) -> None:
        _check_fields(self)

    @property
    def lossy(self) -> bool:
        """Whether a packet can be lost at all."""
        if self.loss == "bernoulli":
            return self.loss_p > 0
        if self.loss == "gilbert_elliott":
            return self.ge_loss_good > 0 or (self.ge_p > 0 and self.ge_loss_bad > 0)
        return False

    @property
    def is_ideal(self) -> bool:
        """No airtime, no delay, no loss: the hop can be crossed without any SimPy event."""
        return self.rate == "unlimited" and self.delay_s == 0 and self.jitter_s == 0 and not self.lossy


@dataclass(frozen=True)
class RadioProfile:
    """A client's radio: both directions of its link to the base station, and its availability."""

    uplink: LinkParams
    """Client -> base station."""
    downlink: LinkParams
    """Base station -> client."""
    mean_online_s: float = math.inf
    """On/off availability: mean of the exponential online periods (inf: always online)."""
    mean_offline_s: float = 0.0
    """On/off availability: mean of the exponential offline periods (0: never offline)."""

    def __post_init__(self) -> None:
        _check_fields(self)

    @property
    def always_online(self) -> bool:
        return self.mean_offline_s == 0 or math.isinf(self.mean_online_s)


@dataclass(frozen=True)
class DirectionOverrides:
    """Partial link settings; a field left None keeps the value it overrides."""

    rate: RateModel | None = None
    """See LinkParams.rate."""
    rate_bps: float | None = None
    """See LinkParams.rate_bps."""
    bandwidth_hz: float | None = None
    """See LinkParams.bandwidth_hz."""
    snr_db: float | None = None
    """See LinkParams.snr_db."""
    coherence_s: float | None = None
    """See LinkParams.coherence_s."""
    min_snr_db: float | None = None
    """See LinkParams.min_snr_db."""
    outage_timeout_s: float | None = None
    """See LinkParams.outage_timeout_s."""
    delay_s: float | None = None
    """See LinkParams.delay_s."""
    jitter_s: float | None = None
    """See LinkParams.jitter_s."""
    loss: LossModel | None = None
    """See LinkParams.loss."""
    loss_p: float | None = None
    """See LinkParams.loss_p."""
    ge_p: float | None = None
    """See LinkParams.ge_p."""
    ge_r: float | None = None
    """See LinkParams.ge_r."""
    ge_loss_bad: float | None = None
    """See LinkParams.ge_loss_bad."""
    ge_loss_good: float | None = None
    """See LinkParams.ge_loss_good."""
    mtu_bytes: int | None = None
    """See LinkParams.mtu_bytes."""
    rto_s: float | None = None
    """See LinkParams.rto_s."""
    max_retries: int | None = None
    """See LinkParams.max_retries."""

    def __post_init__(self) -> None:
        _check_fields(self)

    def link_changes(self) -> dict[str, object]:
        """The LinkParams fields this sets (not None)."""
        names = {f.name for f in fields(LinkParams)}
        return {k: v for k in names if (v := getattr(self, k)) is not None}


@dataclass(frozen=True)
class LinkOverrides(DirectionOverrides):
    """Partial settings of a client's radio: the fields above apply to both directions first, then
    ``uplink`` / ``downlink`` override one direction."""

    uplink: DirectionOverrides | None = None
    """Settings of the uplink only (client -> base station)."""
    downlink: DirectionOverrides | None = None
    """Settings of the downlink only (base station -> client)."""
    mean_online_s: float | None = None
    """See RadioProfile.mean_online_s."""
    mean_offline_s: float | None = None
    """See RadioProfile.mean_offline_s."""


@dataclass(frozen=True)
class ClientOverrides(LinkOverrides):
    """One client's settings: its own preset (optional) and partial settings on top."""

    preset: PresetName | None = None
    """Start from this preset instead of the scenario's (the scenario's ``link`` still applies)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.preset is None or self.preset in PRESET_NAMES, "preset",
              f"must be one of {', '.join(PRESET_NAMES)} (got {self.preset!r})")


@dataclass(frozen=True)
class ChannelConfig:
    """The scenario's ``channel:`` section.

    A client's effective radio is resolved in this order, later wins: its preset (``clients.<id>.preset``
    if given, else ``preset``) <- the scenario-wide ``link`` settings <- its own ``clients.<id>``
    settings; within each layer, settings for both directions first, then ``uplink``/``downlink``.
    """

    model: ChannelMode = "emulated"
    """'emulated': the SimPy channel relays every message; 'direct': no emulator (real networks)."""
    relay: RelayMode = "headers"
    """How an emulated channel carries bodies: 'headers' (senders route each body straight to its
    receiver, who holds it until the emulator, which models it from a small header, releases it:
    bodies cross the broker once) or 'bodies' (every body goes through the emulator: twice)."""
    held_min_bytes: int = 128 * 1024
    """With relay 'headers', a message smaller than this (its frames' bytes) still goes through the
    emulator whole: for small messages the announce and release cost more than relaying the body
    (measured in docs/SCALE.md). 0 holds every body."""
    preset: PresetName = "wifi"
    """Radio preset of every client (see broker.channel.presets): ideal, wifi, lte, edge-poor."""
    link: LinkOverrides = field(default_factory=LinkOverrides)
    """Settings overriding the preset for every client."""
    clients: dict[str, ClientOverrides] = field(default_factory=dict)
    """Per-client settings, keyed by agent id (e.g. client-3: {preset: edge-poor})."""
    shared_uplink: bool | dict[str, str] = True
    """Uplinks share airtime: true (clients on the same preset share one cell: a preset is a radio
    access network), false (each client its own), or agent id -> cell name (clients in a cell share
    it; clients not listed have their own)."""
    shared_downlink: bool | dict[str, str] = False
    """Downlinks share the base station's airtime, with the same meaning as shared_uplink."""
    time_scale: float = 1.0
    """Wall-clock seconds per modeled second: 1.0 is real time, 0.1 runs the channel 10x faster than
    the wall clock (a modeled 1 s delay lasts 0.1 s), 10 runs it 10x slower; 0.001..1000."""
    seed: int | None = None
    """Seed of every channel draw (0..2**32-1); None uses the scenario's seed."""
    reliable_kinds: tuple[str, ...] = KINDS
    """Message kinds sent reliably (lost packets resent, as MQTT QoS 1 over TCP); the others are lost
    with their first lost packet."""

    def __post_init__(self) -> None:
        check(self.model in get_args(ChannelMode), "model",
              f"must be direct or emulated (got {self.model!r})")
        check(self.relay in get_args(RelayMode), "relay", f"must be headers or bodies (got {self.relay!r})")
        check(isinstance(self.held_min_bytes, int) and 0 <= self.held_min_bytes <= 2**31, "held_min_bytes",
              f"must be an integer in 0..2**31 (got {self.held_min_bytes!r})")
        check(self.preset in PRESET_NAMES, "preset",
              f"must be one of {', '.join(PRESET_NAMES)} (got {self.preset!r})")
        low, high = TIME_SCALES
        check(low <= self.time_scale <= high, "time_scale", f"must be in {low:g}..{high:g} (got {self.time_scale!r})")
        check(self.seed is None or 0 <= self.seed <= MAX_SEED, "seed",
              f"must be in 0..{MAX_SEED} or null (got {self.seed!r})")
        for name in ("shared_uplink", "shared_downlink"):
            cells = getattr(self, name)
            if isinstance(cells, dict):
                for agent, cell in cells.items():
                    check(bool(agent) and isinstance(cell, str) and bool(cell), f"{name}.{agent}",
                          "must map an agent id to a non-empty cell name")
        for agent in self.clients:
            check(isinstance(agent, str) and bool(agent), "clients", "keys must be non-empty agent ids")
        bad = [k for k in self.reliable_kinds if k not in KINDS]
        check(not bad, "reliable_kinds", f"unknown kind {bad[0] if bad else ''!r}; kinds: {', '.join(KINDS)}")
        check(len(set(self.reliable_kinds)) == len(self.reliable_kinds), "reliable_kinds", "has duplicates")

    def is_reliable(self, kind: str) -> bool:
        """Whether messages of this kind are resent when packets are lost."""
        return kind in self.reliable_kinds

    def cell_of(self, agent: str, direction: Literal["uplink", "downlink"]) -> str | None:
        """The shared cell ``agent``'s link in ``direction`` belongs to, or None for a dedicated link."""
        cells = self.shared_uplink if direction == "uplink" else self.shared_downlink
        if isinstance(cells, dict):
            return cells.get(agent)
        if not cells:
            return None
        own = self.clients.get(agent)
        return f"preset:{own.preset if own is not None and own.preset else self.preset}"
