"""Seeded random streams and per-packet loss processes (vectorized over the packets of a message).

Every random draw of the channel comes from :func:`stream`, keyed by the seed and a name such as
``("uplink", "client-3", "loss")``: a stream depends on nothing but its own key, so adding a link,
an agent or a draw elsewhere never shifts another link's draws.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import numpy as np

from broker.channel.config import LinkParams


def stream(seed: int, *names: str) -> np.random.Generator:
    """The generator of the named purpose: a SeedSequence keyed by (seed, hashes of the names)."""
    key = tuple(int.from_bytes(hashlib.blake2b(n.encode(), digest_size=8).digest(), "little") for n in names)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


class PacketLoss(Protocol):
    """Decides which of the next ``n`` packets sent on one link are lost."""

    def draw(self, n: int) -> np.ndarray:
        """Boolean mask of shape (n,), True where the packet is lost; advances any state."""
        ...


class BernoulliLoss:
    """Each packet is lost independently with probability ``p``."""

    def __init__(self, p: float, rng: np.random.Generator) -> None:
        self.p = p
        self._rng = rng

    def draw(self, n: int) -> np.ndarray:
        return self._rng.random(n) < self.p  # (n,)


class GilbertElliottLoss:
    """Two-state Markov chain per packet, with netem's ``gemodel p r 1-h 1-k`` parameters.

    The state of a packet decides its loss probability (``loss_good`` = 1-k in the good state,
    ``loss_bad`` = 1-h in the bad one); after each packet the chain moves good -> bad with
    probability ``p`` and bad -> good with probability ``r``, so a bad burst lasts 1/r packets on
    average. The chain starts good and keeps its state across messages: it advances once per packet
    sent on the link (retransmissions included), never with idle time, as netem's does.
    """

    def __init__(self, p: float, r: float, loss_bad: float, loss_good: float,
                 rng: np.random.Generator) -> None:
        assert 0 <= p <= 1 and 0 < r <= 1, (p, r)
        self.p, self.r = p, r
        self.loss_bad, self.loss_good = loss_bad, loss_good
        self.bad = False
        """State of the next packet."""
        self._rng = rng

    def states(self, n: int) -> np.ndarray:
        """States of the next ``n`` packets (True: bad), advancing the chain.

        Sojourns are geometric, so the chain is sampled run by run (a few draws per message, not one
        per packet); a run cut by the end of the message is memoryless and simply redrawn next time.
        """
        out = np.empty(n, dtype=bool)  # (n,)
        pos, bad = 0, self.bad
        while pos < n:
            leave = self.r if bad else self.p
            if leave == 0:  # p == 0: the good state is absorbing
                out[pos:] = bad
                break
            run = int(self._rng.geometric(leave))
            out[pos : pos + run] = bad
            if pos + run <= n:  # the run ended within these packets: the next packet is in the other state
                bad = not bad
            pos += run
        self.bad = bad
        return out

    def draw(self, n: int) -> np.ndarray:
        bad = self.states(n)
        return self._rng.random(n) < np.where(bad, self.loss_bad, self.loss_good)  # (n,)


def make_loss(params: LinkParams, rng: np.random.Generator) -> PacketLoss | None:
    """The loss process a link's parameters describe, or None when packets are never lost."""
    if not params.lossy:
        return None
    if params.loss == "bernoulli":
        return BernoulliLoss(params.loss_p, rng)
    return GilbertElliottLoss(params.ge_p, params.ge_r, params.ge_loss_bad, params.ge_loss_good, rng)
