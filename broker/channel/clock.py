"""Run a ChannelModel in (scaled) real time from an asyncio loop, without ever blocking the loop.

The model keeps a plain ``simpy.Environment``. Modeled time is tied to the loop's monotonic clock:

    modeled_now() = (loop.time() - t0) / time_scale

so ``time_scale`` is wall-clock seconds per modeled second (1.0: real time; 0.1: the channel runs
10x faster than the wall clock). Whenever the driver wakes, for a new message or for a timer set at
the wall time of ``env.peek()``, it calls ``model.run_until(modeled_now())``, which processes all that
is due without sleeping; results reach the model's ``on_result`` callback from there. A late wake
only delays the hand-over in wall time: the records keep their exact modeled times.
``simpy.rt.RealtimeEnvironment`` is not used because its ``step()`` sleeps and would stall the loop.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType

from broker.channel.model import ChannelModel


class RealtimeDriver:
    """Drives ``model`` from the running asyncio loop; use ``async with`` or start()/close()."""

    def __init__(self, model: ChannelModel, time_scale: float | None = None) -> None:
        self.model = model
        self.time_scale = model.cfg.time_scale if time_scale is None else time_scale
        if not (math.isfinite(self.time_scale) and self.time_scale > 0):
            raise ValueError(f"time_scale: must be a finite number > 0 (got {self.time_scale!r})")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._t0 = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        """Modeled time the pending timer is for."""

    def start(self) -> None:
        """Bind to the running loop; modeled time continues from ``model.now``."""
        self._loop = asyncio.get_running_loop()
        self._t0 = self._loop.time() - self.model.now * self.time_scale
        self._arm()

    def close(self) -> None:
        """Stop waking up (pending messages stay in the model, frozen in modeled time)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at, self._loop = None, math.inf, None

    async def __aenter__(self) -> RealtimeDriver:
        self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()

    def modeled_now(self) -> float:
        """The modeled time that corresponds to the loop's clock now."""
        return (self._running().time() - self._t0) / self.time_scale

    def wall_time(self, t_model: float) -> float:
        """The loop time (``loop.time()``) at which modeled time ``t_model`` is due."""
        return self._t0 + t_model * self.time_scale

    def advance(self, to: float | None = None) -> None:
        """Process everything due by now (or by modeled time ``to``, if later) and re-arm the timer."""
        t = self.modeled_now()
        self.model.run_until(t if to is None else max(t, to))
        self._arm()

    def submit(
        self, src: str, dst: str, nbytes: int, *, reliable: bool = True, key: object = None, at: float | None = None
    ) -> None:
        """Catch the model up with the clock, then put the message on the air at modeled now.

        ``at``: put it on the air as of that modeled time instead (a header that waited to be
        batched), or as of the model's own clock if that is later: modeled time never goes back.
        Whatever fell due since is processed right after, on the timer.
        """
        if at is None:
            self.advance()
        else:
            self.model.run_until(min(at, self.modeled_now()))
        self.model.submit(src, dst, nbytes, reliable=reliable, key=key)
        self._arm()

    def _running(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError("RealtimeDriver is not started (use 'async with' or start())")
        return self._loop

    def _arm(self) -> None:
        loop = self._running()
        nxt = float(self.model.env.peek())
        if self._timer is not None and self._timer_at <= nxt:
            return  # the pending timer fires first (or on time) and re-arms
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf
        if nxt < math.inf:
            self._timer = loop.call_at(self.wall_time(nxt), self._on_timer, nxt)
            self._timer_at = nxt

    def _on_timer(self, due: float) -> None:
        self._timer, self._timer_at = None, math.inf
        # The loop may fire a timer up to its clock resolution early: what it was set for is due.
        self.advance(to=due)
