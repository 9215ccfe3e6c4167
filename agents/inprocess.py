"""The in-process fleet: every client's learner in this process, called directly.

This is the reference the networked system must reproduce (the same ``Strategy``, the same
``execute`` and the same reply collection; only the transport differs) and the compute floor its
benchmarks are measured against. Clients run one after another; nothing is copied but the state
dicts FedAvg needs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from nmoe.errors import RejectedReply
from nmoe_models.learner import ClientLearner

from .protocol import ExpertAnswer, execute
from .rounds import Collector, RoundOutcome, Step


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


class InProcessFleet:
    def __init__(self, learners: Mapping[int, ClientLearner]) -> None:
        self.learners = dict(sorted(learners.items()))
        self.clients = list(self.learners)
        self.pool = InProcessPool(self.learners)

    async def run(self, step: Step) -> RoundOutcome:
        targets = sorted(step.personal) if step.personal else self.clients
        collector = Collector(step, targets)
        for i in targets:
            # the same checks a networked coordinator applies; in one process a rejection is a bug
            if collector.offer(i, await execute(self.learners[i], step.task_for(i), self.pool)) == "rejected":
                raise RejectedReply(f"client-{i}'s {step.op.value} reply: {collector.failures[i]}")
        return collector.close()
