"""The in-process fleet: every client's learner in this process, called directly.

This is the reference the networked system must reproduce (the same ``Strategy``, the same
``execute`` and the same reply collection; only the transport differs) and the compute floor its
benchmarks are measured against. Clients run one after another; nothing is copied but the state
dicts FedAvg needs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Literal, TypeVar

import torch

from nmoe.errors import RejectedReply
from nmoe_models.learner import ClientLearner

from .compute import TRAIN_OPS, counted
from .devices import Device
from .protocol import ExpertAnswer, execute, run_inline
from .rounds import Collector, RoundOutcome, Step

T = TypeVar("T")


class InProcessPool:
    """Experts reached by direct calls: no latency, no bytes on any wire."""

    def __init__(self, learners: Mapping[int, ClientLearner]) -> None:
        self.learners = learners

    async def query(self, expert: int, latents: torch.Tensor) -> ExpertAnswer:
        return ExpertAnswer(self.learners[expert].expert_logprobs(latents))

    def wire_bytes(self) -> int:
        return 0

    def would_miss(self, expert: int, rows: int) -> bool:
        return False  # no network: every expert answers at once


class _DeviceClock:
    """A ``blocking`` that runs the work inline and adds up the modeled seconds its FLOPs take on
    ``device`` (no waiting: in one process nothing races the modeled clock)."""

    def __init__(self, device: Device, kind: Literal["train", "infer"]) -> None:
        self.device, self.kind, self.seconds = device, kind, 0.0

    async def __call__(self, fn: Callable[[], T]) -> T:
        result, flops = counted(fn)
        self.seconds += self.device.profile.seconds(flops, self.kind)
        return result


class InProcessFleet:
    """``devices``: each client's modeled device; a step's modeled duration (``RoundOutcome.modeled_s``)
    is then the longest of its clients' modeled compute times (the clients of a round work in
    parallel; no channel, so no transit). Without devices it is the longest of their compute times
    on this host."""

    def __init__(self, learners: Mapping[int, ClientLearner], devices: Mapping[int, Device] | None = None) -> None:
        self.learners = dict(sorted(learners.items()))
        self.clients = list(self.learners)
        self.pool = InProcessPool(self.learners)
        self.devices = dict(devices or {})

    async def run(self, step: Step) -> RoundOutcome:
        targets = sorted(step.personal) if step.personal else self.clients
        collector = Collector(step, targets)
        longest = 0.0
        for i in targets:
            device = self.devices.get(i)
            clock = _DeviceClock(device, "train" if step.op in TRAIN_OPS else "infer") if device else None
            start = time.perf_counter()
            reply = await execute(self.learners[i], step.task_for(i), self.pool, clock or run_inline)
            longest = max(longest, clock.seconds if clock is not None else time.perf_counter() - start)
            # the same checks a networked coordinator applies; in one process a rejection is a bug
            if collector.offer(i, reply) == "rejected":
                raise RejectedReply(f"client-{i}'s {step.op.value} reply: {collector.failures[i]}")
        return replace(collector.close(), modeled_s=longest)
