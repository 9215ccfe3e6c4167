"""Deadline-aware routing: predict each expert's response time from what a client knows.

With ``eval.routing: deadline`` a client asks, before it routes a batch, how long each chosen expert
would take to answer, and swaps an expert predicted to miss ``network.inference_deadline_s`` for the
next-best one by gate score (or serves the row locally: its own expert is always in time).

A prediction is a model of the request's path plus what recent replies taught it:

- the model: the request's bytes over the client's uplink and the expert's downlink, the expert's
  modeled service time (the expert's FLOPs per row / its device's inference throughput), and the
  reply's bytes back over the expert's uplink and the client's downlink; each hop is
  bytes / mean rate / (1 - loss rate) + one-way delay (``agents.energy.mean_rate_bps``), and an
  expert offline more than half the time (its availability) is predicted to miss;
- the measurement: an exponentially weighted mean of (measured - modeled) latency per expert, a
  missed reply counting as twice the deadline. A residual decays while the expert is not asked
  (x0.7 a batch), so a link that recovered gets probed again instead of being shunned forever.

Pure bookkeeping (no bus, no clock): ``agents.client.BusPool`` feeds it what its replies measured.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from broker.channel.config import LinkParams, RadioProfile

from .devices import DeviceProfile
from .energy import loss_rate, mean_rate_bps

HEADER_BYTES = 600  # a message's frame prefix, JSON header and safetensors header, roughly
EWMA = 0.5
DECAY = 0.7


@dataclass(frozen=True)
class Peer:
    """What a client knows about an expert's owner (or itself): its radio and its device."""

    radio: RadioProfile | None
    """None: a direct channel (nothing is modeled)."""
    device: DeviceProfile | None
    """None: no device modeled (service time counts as 0)."""


def hop_s(link: LinkParams, nbytes: float) -> float:
    rate = mean_rate_bps(link)
    air = 0.0 if math.isinf(rate) else 8.0 * nbytes / rate / max(1e-9, 1.0 - loss_rate(link))
    return air + link.delay_s


class LatencyPredictor:
    """Response-time predictions of client ``me``'s expert requests, in modeled seconds."""

    def __init__(self, me: int, peers: Mapping[int, Peer], latent_dim: int, hidden: int, classes: int,
                 deadline_s: float) -> None:
        self.me = me
        self.peers = dict(peers)
        self.latent_dim, self.classes = latent_dim, classes
        self.flops_per_row = 2.0 * (latent_dim * hidden + 2 * hidden * hidden + hidden * classes)
        self.deadline_s = deadline_s
        self.residual: dict[int, float] = {}
        self.skipped: dict[int, int] = {}

    def modeled(self, expert: int, rows: int) -> float:
        mine, theirs = self.peers.get(self.me), self.peers.get(expert)
        req, rep = HEADER_BYTES + 4.0 * rows * self.latent_dim, HEADER_BYTES + 4.0 * rows * self.classes
        t = 0.0
        if mine is not None and mine.radio is not None:
            t += hop_s(mine.radio.uplink, req) + hop_s(mine.radio.downlink, rep)
        if theirs is not None and theirs.radio is not None:
            radio = theirs.radio
            if not radio.always_online and radio.mean_offline_s > radio.mean_online_s:
                return math.inf  # offline more often than not
            t += hop_s(radio.downlink, req) + hop_s(radio.uplink, rep)
        if theirs is not None and theirs.device is not None:
            t += theirs.device.seconds(self.flops_per_row * rows, "infer")
        return t

    def predict(self, expert: int, rows: int) -> float:
        """Predicted response time of ``rows`` latents sent to ``expert`` (modeled seconds)."""
        skipped = self.skipped.get(expert, 0)
        self.skipped[expert] = skipped + 1
        return max(0.0, self.modeled(expert, rows) + self.residual.get(expert, 0.0) * DECAY ** skipped)

    def would_miss(self, expert: int, rows: int) -> bool:
        return self.predict(expert, rows) > self.deadline_s

    def observe(self, expert: int, rows: int, latency_s: float | None) -> None:
        """What a reply measured (None: no reply in time)."""
        measured = 2.0 * self.deadline_s if latency_s is None else latency_s
        model = self.modeled(expert, rows)
        if math.isinf(model):
            return
        old = self.residual.get(expert)
        err = measured - model
        self.residual[expert] = err if old is None else (1 - EWMA) * old + EWMA * err
        self.skipped[expert] = 0
