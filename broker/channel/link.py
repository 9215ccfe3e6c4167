"""One hop: one direction of one client's radio link, owning its queue and its SimPy process.

Like SimPy's latency example, a :class:`Link` is an object with a Store and a process: ``send``
puts a message in the queue and the process applies airtime, loss, retransmission and delay, then
hands the message on (``on_exit``) or reports why it was dropped (``on_drop``). Neither the sender
nor the receiver sees any of it.

Per message, in FIFO order (one MQTT connection per client, so one message after another):

1. The link's client must have stayed online since the message entered the queue.
2. Airtime: the message's bits go through the link's medium (its own, or its cell's, shared).
3. Loss: each of its ceil(S / MTU) packets is lost or not (one vectorized draw per round).
   Unreliable traffic loses the message with any packet. Reliable traffic resends the lost
   packets after ``rto_s`` (selective repeat, in rounds) and loses the message when a packet
   is lost more than ``max_retries`` times. Every round's airtime counts.
4. Delay: ``delay_s`` plus jitter, after which the message leaves the hop; the next message starts
   its airtime meanwhile (propagation is pipelined), and messages never overtake each other.
5. On leaving, the client must still have been online throughout; otherwise the message is dropped.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
import simpy

from broker.channel.config import LinkParams
from broker.channel.loss import PacketLoss
from broker.channel.medium import EPS_S, Medium
from broker.channel.processes import FixedRate, OnOff, RateProcess


@dataclass(eq=False)
class Transit:
    """A message on its way; a broadcast becomes one Transit per destination at the base station."""

    key: object
    src: str
    dst: str
    nbytes: int
    reliable: bool
    t_send: float
    retransmissions: int = 0
    """Packets resent so far, over every hop crossed."""
    t_hop: float = 0.0
    """When the message entered its current hop."""

    def fork(self, dst: str) -> Transit:
        return Transit(self.key, self.src, dst, self.nbytes, self.reliable, self.t_send, self.retransmissions)


class Link:
    """One direction of one client's link; see the module docstring for what happens to a message.

    ``rate`` is None for an unlimited rate (no airtime). ``medium`` is the cell's shared airtime, or
    None when the link has its airtime to itself. ``availability`` is the client's on/off process
    (None: always online). ``on_exit`` receives each message that crossed the hop, at the modeled
    time it leaves; ``on_drop`` each lost one, with the reason, when the loss is decided.
    """

    def __init__(
        self,
        env: simpy.Environment,
        name: str,
        params: LinkParams,
        *,
        rate: RateProcess | None,
        medium: Medium | None = None,
        loss: PacketLoss | None,
        jitter_rng: np.random.Generator,
        availability: OnOff | None,
        on_exit: Callable[[Transit], None],
        on_drop: Callable[[Transit, str], None],
    ) -> None:
        self.env = env
        self.name = name
        self.params = params
        self.availability = availability
        self._rate, self._loss, self._jitter_rng = rate, loss, jitter_rng
        self._on_exit, self._on_drop = on_exit, on_drop
        self._last_arrival = -math.inf
        self._in_flight: deque[tuple[float, Transit]] = deque()
        """(arrival time, message) of the messages propagating, in order."""
        # A fixed-rate link with its airtime to itself needs no medium: one timeout per round.
        self._solo_fixed = isinstance(rate, FixedRate) and medium is None and availability is None
        self._medium = medium
        if rate is not None and medium is None and not self._solo_fixed:
            self._medium = Medium(env, name)
        self.ideal = params.is_ideal and rate is None
        """Crossed synchronously: no queue, no process, no event."""
        self.store: simpy.Store | None = None
        self.process: simpy.Process | None = None
        if not self.ideal:
            self.store = simpy.Store(env)
            self.process = env.process(self._serve())

    def send(self, msg: Transit) -> None:
        """Enqueue ``msg`` at the current modeled time (an ideal link passes it on at once)."""
        msg.t_hop = self.env.now
        if self.store is not None:
            self.store.put(msg)
        elif self.availability is not None and not self.availability.online_at(self.env.now):
            self._on_drop(msg, "offline")
        else:
            self._on_exit(msg)

    def _serve(self) -> Generator[simpy.Event, Any, None]:
        assert self.store is not None
        while True:
            msg = yield self.store.get()
            if not self._online_since(msg.t_hop):
                self._on_drop(msg, "offline")
                continue
            reason = yield from self._transfer(msg)
            if reason is not None:
                self._on_drop(msg, reason)
                continue
            self._propagate(msg)

    def _transfer(self, msg: Transit) -> Generator[simpy.Event, Any, str | None]:
        """Airtime, loss and retransmission rounds; returns a drop reason, or None when delivered."""
        p = self.params
        n = max(1, -(-msg.nbytes // p.mtu_bytes))
        bits = 8.0 * msg.nbytes
        sizes: np.ndarray | None = None  # (pending,) bytes of the packets still to deliver
        pending = n
        for attempt in range(p.max_retries + 1):
            if attempt > 0 and not self._online_since(msg.t_hop):  # went offline while waiting to resend
                return "offline"
            if self._rate is not None and bits > 0:
                reason = yield from self._airtime(bits)
                if reason is not None:
                    return reason
            if self._loss is None:
                return None
            lost = self._loss.draw(pending)  # (pending,)
            n_lost = int(np.count_nonzero(lost))
            if n_lost == 0:
                return None
            if not msg.reliable or attempt == p.max_retries:
                return "loss"
            if sizes is None:
                sizes = np.full(n, p.mtu_bytes, dtype=np.int64)
                sizes[-1] = msg.nbytes - (n - 1) * p.mtu_bytes
            sizes = sizes[lost]
            bits, pending = 8.0 * float(sizes.sum()), n_lost
            msg.retransmissions += n_lost
            yield self.env.timeout(p.rto_s)
        raise AssertionError("unreachable: the last round returns")

    def _airtime(self, bits: float) -> Generator[simpy.Event, Any, str | None]:
        assert self._rate is not None
        if self._medium is None:  # solo fixed rate
            yield self.env.timeout(bits / self._rate.rate_at(self.env.now))
            return None
        abort_at = math.inf
        if self.availability is not None:
            abort_at = self.availability.next_change(self.env.now)  # online now: this is when it goes offline
        reason: str | None = yield self._medium.transmit(
            self._rate, bits, abort_at=abort_at, abort_reason="offline",
            outage_timeout_s=self.params.outage_timeout_s,
        )
        return reason

    def _propagate(self, msg: Transit) -> None:
        now = self.env.now
        delay = self.params.delay_s
        if self.params.jitter_s > 0:
            delay = max(0.0, delay + float(self._jitter_rng.normal(0.0, self.params.jitter_s)))
        arrival = max(now + delay, self._last_arrival)  # in order, as over one TCP connection
        self._last_arrival = arrival
        self._in_flight.append((arrival, msg))
        if arrival <= now:
            self._release()
        else:
            self.env.timeout(arrival - now).callbacks.append(self._release)

    def _release(self, _event: object = None) -> None:
        # Messages leave from the head only, so rounding in timeouts can never reorder them.
        now = self.env.now + EPS_S
        while self._in_flight and self._in_flight[0][0] <= now:
            self._leave(self._in_flight.popleft()[1])

    def _online_since(self, t: float) -> bool:
        return self.availability is None or self.availability.online_throughout(t, self.env.now)

    def _leave(self, msg: Transit) -> None:
        if not self._online_since(msg.t_hop):
            self._on_drop(msg, "offline")
        else:
            self._on_exit(msg)
