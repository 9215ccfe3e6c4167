"""Airtime: a medium transmits the bits of the links attached to it, sharing its time fairly.

A medium is either one link's own (a dedicated uplink) or a cell's (the uplinks of all its clients).
While n flows have something to send and a usable channel, each gets 1/n of the airtime and sends
at its own link's current rate during its share (processor sharing, the fluid limit of a
round-robin scheduler). Two equal uploads in one cell therefore both take twice as long as one
alone; a flow in a fading outage (rate 0) gives its share to the others.

The medium computes exactly when the next flow finishes, the next fading block starts, or a flow
must be aborted, and schedules one SimPy timeout for that moment; a new flow reschedules. The cost
is a few events per message, however many packets it holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import simpy

from broker.channel.processes import RateProcess

EPS_S = 1e-9
"""A flow whose remaining airtime is below this is complete (absorbs floating-point rounding)."""


@dataclass(eq=False)
class _Flow:
    rate: RateProcess
    remaining: float
    """Bits still to send."""
    done: simpy.Event
    abort_at: float
    abort_reason: str
    outage_timeout_s: float
    share: float = 0.0
    """Bits per second this flow sends until the next update."""
    stalled_since: float | None = field(default=None)


class Medium:
    """Time-shared airtime for the flows of the links attached to it."""

    def __init__(self, env: simpy.Environment, name: str) -> None:
        self.env = env
        self.name = name
        self._flows: list[_Flow] = []
        self._t_last = env.now
        self._generation = 0

    @property
    def active(self) -> int:
        """Flows now on the medium."""
        return len(self._flows)

    def transmit(self, rate: RateProcess, bits: float, *, abort_at: float = math.inf,
                 abort_reason: str = "offline", outage_timeout_s: float = math.inf) -> simpy.Event:
        """Send ``bits`` at ``rate`` (while sharing the airtime); the event's value is None when all
        bits are sent, or the reason the flow was aborted: ``abort_reason`` at ``abort_at``, or
        'outage' after ``outage_timeout_s`` without a usable channel."""
        self._progress()
        flow = _Flow(rate, float(bits), self.env.event(), abort_at, abort_reason, outage_timeout_s)
        self._flows.append(flow)
        self._update()
        return flow.done

    def _progress(self) -> None:
        """Account for the bits sent since the last update, at the shares then in force."""
        dt = self.env.now - self._t_last
        if dt > 0:
            for f in self._flows:
                f.remaining -= f.share * dt
        self._t_last = self.env.now

    def _update(self) -> None:
        """Finish or abort what is due, share the airtime anew, schedule the next update."""
        now = self.env.now
        keep: list[_Flow] = []
        for f in self._flows:
            if f.remaining <= 0 or (f.share > 0 and f.remaining <= f.share * EPS_S):
                f.done.succeed(None)
            elif now >= f.abort_at:
                f.done.succeed(f.abort_reason)
            elif f.stalled_since is not None and now >= f.stalled_since + f.outage_timeout_s - EPS_S:
                f.done.succeed("outage")
            else:
                keep.append(f)
        self._flows = keep
        rates = [f.rate.rate_at(now) for f in keep]
        usable = sum(1 for r in rates if r > 0)
        t_next = math.inf
        for f, r in zip(keep, rates, strict=True):
            if r > 0:
                f.share = r / usable
                f.stalled_since = None
                t_next = min(t_next, now + f.remaining / f.share)
            else:
                f.share = 0.0
                if f.stalled_since is None:
                    f.stalled_since = now
                t_next = min(t_next, f.stalled_since + f.outage_timeout_s)
            t_next = min(t_next, f.rate.next_change(now), f.abort_at)
        self._generation += 1
        if t_next < math.inf:
            timer = self.env.timeout(max(0.0, t_next - now))
            generation = self._generation
            timer.callbacks.append(lambda _ev: self._on_timer(generation))

    def _on_timer(self, generation: int) -> None:
        if generation != self._generation:  # superseded by a later update
            return
        self._progress()
        self._update()
