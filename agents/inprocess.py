"""The in-process fleet: every client's learner in this process, called directly.

This is the reference the networked system must reproduce (the same ``Strategy`` and the same
``execute``; only the transport differs) and the compute floor its benchmarks are measured against.
Clients run one after another; nothing is copied but the state dicts FedAvg needs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from nmoe_models.learner import ClientLearner

from .protocol import ExpertAnswer, Reply, Task, check_reply, execute
from .strategy import RoundOutcome


class InProcessPool:
    """Experts reached by direct calls: no latency, no bytes on any wire."""

    def __init__(self, learners: Mapping[int, ClientLearner]) -> None:
        self.learners = learners

    async def query(self, expert: int, latents: torch.Tensor) -> ExpertAnswer:
        return ExpertAnswer(self.learners[expert].expert_logprobs(latents))

    def wire_bytes(self) -> int:
        return 0


class InProcessFleet:
    def __init__(self, learners: Mapping[int, ClientLearner]) -> None:
        self.learners = dict(sorted(learners.items()))
        self.clients = list(self.learners)
        self.pool = InProcessPool(self.learners)

    async def run(self, task: Task) -> RoundOutcome:
        targets = sorted(task.personal) if task.personal else self.clients
        replies: dict[int, Reply] = {}
        for i in targets:
            reply = await execute(self.learners[i], task, self.pool)
            check_reply(task, reply)  # the same checks a networked coordinator applies
            replies[i] = reply
        return RoundOutcome(replies)
