"""Random processes of modeled time, sampled lazily: a link's rate and a client's availability.

Both are pure functions of (seed stream, t): they are drawn ahead in chunks as time advances and
never schedule SimPy events of their own, so an idle channel has an empty event queue
(``env.peek()`` is infinite and the real-time driver sleeps) and traffic never shifts their draws.
"""

from __future__ import annotations

import bisect
import math
from typing import Protocol

import numpy as np

from broker.channel.config import LinkParams


class RateProcess(Protocol):
    """A link's rate over modeled time: piecewise constant, in bits per second."""

    def rate_at(self, t: float) -> float:
        """Rate during the piece that contains ``t``."""
        ...

    def next_change(self, t: float) -> float:
        """Start of the next piece after ``t`` (strictly greater; inf if the rate never changes)."""
        ...


class FixedRate:
    """A constant rate."""

    def __init__(self, bps: float) -> None:
        self.bps = bps

    def rate_at(self, t: float) -> float:
        return self.bps

    def next_change(self, t: float) -> float:
        return math.inf


class BlockRayleighRate:
    """Shannon capacity under block Rayleigh fading.

    Block k covers [k Tc, (k+1) Tc); its power gain X_k ~ Exp(1) is drawn independently (Rayleigh
    amplitude), and its rate is B log2(1 + SNR X_k), or 0 when SNR X_k is below ``min_snr_db``
    (an outage: nothing decodes). Over many blocks the mean rate is E[B log2(1 + SNR X)].
    """

    CHUNK = 1024

    def __init__(self, bandwidth_hz: float, snr_db: float, coherence_s: float, min_snr_db: float,
                 rng: np.random.Generator) -> None:
        self.bandwidth_hz = bandwidth_hz
        self.snr = 10.0 ** (snr_db / 10.0)
        self.min_snr = 10.0 ** (min_snr_db / 10.0)
        self.coherence_s = coherence_s
        self._rng = rng
        self._rates: list[float] = []

    def block(self, t: float) -> int:
        """Index of the block containing ``t`` (robust to t landing on a rounded boundary)."""
        k = int(t // self.coherence_s)
        if (k + 1) * self.coherence_s <= t:
            k += 1
        return k

    def rates(self, k0: int, k1: int) -> np.ndarray:
        """Rates of blocks k0..k1-1, drawing more blocks as needed."""
        while len(self._rates) < k1:
            snr = self.snr * self._rng.exponential(1.0, self.CHUNK)  # (CHUNK,)
            rate = np.where(snr >= self.min_snr, self.bandwidth_hz * np.log2(1.0 + snr), 0.0)
            self._rates.extend(rate.tolist())
        return np.asarray(self._rates[k0:k1])

    def rate_at(self, t: float) -> float:
        k = self.block(t)
        if k >= len(self._rates):
            self.rates(k, k + 1)
        return self._rates[k]

    def next_change(self, t: float) -> float:
        return (self.block(t) + 1) * self.coherence_s


def make_rate(params: LinkParams, rng: np.random.Generator) -> RateProcess | None:
    """The rate process of a link, or None for an unlimited rate (no airtime at all)."""
    if params.rate == "fixed":
        return FixedRate(params.rate_bps)
    if params.rate == "shannon":
        return BlockRayleighRate(params.bandwidth_hz, params.snr_db, params.coherence_s, params.min_snr_db,
                                 rng)
    return None


class OnOff:
    """Alternating online/offline periods, exponential with the given means; online at t = 0.

    ``edges`` holds the switching times t1 < t2 < ...: offline from t1, online again from t2, and so
    on; a time is online when an even number of edges lie at or before it.
    """

    CHUNK = 64

    def __init__(self, mean_online_s: float, mean_offline_s: float, rng: np.random.Generator) -> None:
        self.mean_online_s, self.mean_offline_s = mean_online_s, mean_offline_s
        self._rng = rng
        self.edges: list[float] = []

    def _cover(self, t: float) -> None:
        assert math.isfinite(t), t
        while not self.edges or self.edges[-1] <= t:
            on = self._rng.exponential(self.mean_online_s, self.CHUNK)  # (CHUNK,)
            off = self._rng.exponential(self.mean_offline_s, self.CHUNK)  # (CHUNK,)
            start = self.edges[-1] if self.edges else 0.0
            self.edges.extend((start + np.cumsum(np.stack([on, off], axis=1).ravel())).tolist())

    def online_at(self, t: float) -> bool:
        self._cover(t)
        return bisect.bisect_right(self.edges, t) % 2 == 0

    def online_throughout(self, t0: float, t1: float) -> bool:
        """Online at every moment of [t0, t1]."""
        self._cover(t1)
        i = bisect.bisect_right(self.edges, t0)
        return i % 2 == 0 and bisect.bisect_right(self.edges, t1) == i

    def next_change(self, t: float) -> float:
        """The first switching time after ``t``."""
        self._cover(t)
        return self.edges[bisect.bisect_right(self.edges, t)]


def make_availability(mean_online_s: float, mean_offline_s: float, rng: np.random.Generator) -> OnOff | None:
    """The on/off process of a client, or None when it is always online."""
    if mean_offline_s == 0 or math.isinf(mean_online_s):
        return None
    return OnOff(mean_online_s, mean_offline_s, rng)
