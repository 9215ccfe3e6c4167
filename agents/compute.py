"""A client's compute on its modeled device: FLOPs counted, time modeled, the reply released on time.

:class:`ComputeMeter` is what a client agent hands ``agents.protocol.execute`` as its ``blocking``
when the scenario models devices. Each piece of heavy work runs in a worker thread under
``torch.utils.flop_counter.FlopCounterMode`` (torch's own counter of matmul and convolution FLOPs,
forward and backward; the mode stack is per thread, so the event loop's own work is not counted),
and then lasts as long as the client's device would take for those FLOPs: the meter waits until
``start + modeled seconds x time_scale`` before it returns. So the reply enters the channel at the
modeled time the device finished, and a round deadline cuts a slow device as it would in the field.

When this host takes longer than the modeled time (it cannot keep up at this ``time_scale``), the
piece returns late and the lag (modeled seconds) is recorded, never hidden. A task whose modeled
compute would end after its deadline is declined at once with :class:`TooSlow` (a real device that
knows its throughput and the task's FLOPs, fixed by its data and model, would not start it); the
client answers with a refusal saying so, and no compute energy is charged for it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from torch.utils.flop_counter import FlopCounterMode

from nmoe.errors import TaskError

from .devices import Device
from .energy import RadioModel
from .messages import Op, Usage

T = TypeVar("T")
TRAIN_OPS = frozenset({Op.SYNC, Op.STAGE1_FIT, Op.STAGE2_FIT, Op.STAGE3_FIT})
"""Tasks whose compute is training (forward and backward); the others are inference only."""


class TooSlow(TaskError):
    """The device cannot finish the task's compute before the task's deadline."""


def counted(fn: Callable[[], T]) -> tuple[T, float]:
    """``fn()`` and the FLOPs it ran (in the calling thread only)."""
    with FlopCounterMode(display=False) as mode:
        result = fn()
    return result, float(mode.get_total_flops())


@dataclass
class _Tally:
    flops: float = 0.0
    compute_s: float = 0.0
    host_s: float = 0.0
    lag_s: float = 0.0

    def add(self, flops: float, compute_s: float, host_s: float, lag_s: float) -> None:
        self.flops += flops
        self.compute_s += compute_s
        self.host_s += host_s
        self.lag_s += lag_s


class ComputeMeter:
    """Compute of one client on ``device``; ``time_scale`` wall seconds per modeled second."""

    def __init__(self, device: Device, time_scale: float, radio: RadioModel | None = None) -> None:
        self.device = device
        self.time_scale = time_scale
        self.radio = radio
        self._kind: Literal["train", "infer"] = "infer"
        self._deadline_at = math.inf
        self._op = Op.SYNC
        self._task = _Tally()
        self._served = _Tally()  # expert queries served since the last report
        self._serving = asyncio.Lock()  # the device answers one query at a time

    @property
    def task_compute_s(self) -> float:
        """Modeled compute seconds of the current task so far."""
        return self._task.compute_s

    def begin(self, op: Op, deadline_at: float = math.inf) -> None:
        """A new task: ``deadline_at`` is the loop time (``loop.time()``) its reply is due by."""
        self._op, self._deadline_at, self._task = op, deadline_at, _Tally()
        self._kind = "train" if op in TRAIN_OPS else "infer"

    async def __call__(self, fn: Callable[[], T]) -> T:
        """Run one piece of the current task's compute; returns when the device would have finished."""
        return await self._run(fn, self._kind, self._task, self._deadline_at)

    async def serve(self, fn: Callable[[], T], deadline_at: float = math.inf) -> tuple[T, float]:
        """Answer another client's expert query (inference), one at a time, on the device's clock;
        returns the answer and its modeled service time (seconds). TooSlow when the answer could
        not be ready by ``deadline_at`` (loop time), the requester's deadline."""
        async with self._serving:
            before = self._served.compute_s
            result = await self._run(fn, "infer", self._served, deadline_at)
            return result, self._served.compute_s - before

    async def _run(self, fn: Callable[[], T], kind: Literal["train", "infer"], tally: _Tally, deadline_at: float) -> T:
        loop = asyncio.get_running_loop()
        start, clock = loop.time(), time.perf_counter()
        result, flops = await asyncio.to_thread(counted, fn)
        host = time.perf_counter() - clock
        modeled = self.device.profile.seconds(flops, kind)
        due = start + modeled * self.time_scale
        if due > deadline_at:
            what = "an expert query"
            if tally is self._task:  # what the task would have needed (a declined query costs nothing)
                tally.add(flops, modeled, host, 0.0)
                what = self._op.value
            over = (due - deadline_at) / self.time_scale
            raise TooSlow(f"too slow: {self.device.name} needs {tally.compute_s:.2f} s (modeled) of compute "
                          f"for {what}, {over:.2f} s past its deadline")
        wait = due - loop.time()
        lag = 0.0
        if wait > 0:
            await asyncio.sleep(wait)
        else:
            lag = -wait / self.time_scale
        tally.add(flops, modeled, host, lag)
        return result

    def report(self, tx_bytes: int, rx_bytes: int, too_slow: bool = False) -> Usage:
        """The current task's usage (with the queries served since the previous report), then reset."""
        t, s = self._task, self._served
        p = self.device.profile
        compute_j = (0.0 if too_slow else p.active_w * t.compute_s) + p.active_w * s.compute_s
        radio_j = self.radio.joules(tx_bytes, rx_bytes) if self.radio is not None else 0.0
        usage = Usage(self.device.name, t.flops + s.flops, t.compute_s + s.compute_s, t.host_s + s.host_s,
                      t.lag_s + s.lag_s, compute_j, radio_j, tx_bytes, rx_bytes, too_slow)
        self._task, self._served = _Tally(), _Tally()
        return usage
