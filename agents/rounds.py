"""Rounds as data: what the strategy asks of a fleet (a :class:`Step`), how replies to it are
collected (:class:`Collector`), and which open or closed step a reply belongs to (:class:`TaskBook`).

Pure and transport-free: the in-process fleet, the networked fleet and the tests' scripted fleet
all collect through these, so the rules are the same everywhere. The first *valid* reply of each
target counts; a rejected one is recorded until a valid one replaces it; a client's refusal is
its final word; an answer to a closed step is a :class:`LateAnswer` event, never a change to the
closed step's record.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

import torch

from nmoe.errors import RejectedReply

from .messages import Op, Refusal, Reply, ReplySpec, Task, check_reply


@dataclass(frozen=True)
class Step:
    """One step of one round: ``common`` goes to every joined client (one broadcast); or, when
    ``personal`` is set, each client in it gets its own task (a unicast) and only they are asked."""

    spec: ReplySpec
    common: Task | None = None
    personal: Mapping[int, Task] = field(default_factory=dict)
    reference: Mapping[str, torch.Tensor] | None = None
    """The state the clients' updates start from (robust aggregation measures them against it)."""

    def __post_init__(self) -> None:
        if (self.common is None) == (not self.personal):
            raise ValueError("a step has either a common task or personal tasks")
        if len({(t.op, t.round) for t in self.tasks()}) != 1:
            raise ValueError("the tasks of one step share their op and round")

    def tasks(self) -> list[Task]:
        return [self.common] if self.common is not None else list(self.personal.values())

    @property
    def op(self) -> Op:
        return self.tasks()[0].op

    @property
    def round(self) -> int:
        return self.tasks()[0].round

    def task_for(self, client: int) -> Task:
        task = self.personal.get(client, self.common)
        if task is None:
            raise KeyError(f"client {client} is not asked in this step")
        return task


@dataclass(frozen=True)
class RoundOutcome:
    """What one step got: the accepted replies and, for every other target, why it has none:
    'missing', 'offline', 'never joined', 'rejected: <reason>', 'error: <the client's reason>'."""

    replies: Mapping[int, Reply]
    failures: Mapping[int, str] = field(default_factory=dict)
    modeled_s: float | None = None
    """How long the step took on the modeled clock (the channel's transit times and the devices'
    compute, not this host's speed); None when the fleet cannot say."""

    def __post_init__(self) -> None:  # immutable copies: nobody can change a round after the fact
        object.__setattr__(self, "replies", MappingProxyType(dict(sorted(self.replies.items()))))
        object.__setattr__(self, "failures", MappingProxyType(dict(sorted(self.failures.items()))))


Offered = Literal["accepted", "rejected", "refused", "duplicate", "not_asked"]


class Collector:
    """The replies to one step, as they arrive."""

    def __init__(self, step: Step, targets: Iterable[int]) -> None:
        self.step = step
        self.targets = frozenset(targets)
        self.replies: dict[int, Reply] = {}
        self.failures: dict[int, str] = {}
        self.done = asyncio.Event()  # every target answered validly or refused
        self._rejected_at: dict[int, float] = {}  # client -> time.monotonic() of its latest rejected reply

    def offer(self, client: int, reply: Reply) -> Offered:
        if client not in self.targets:
            return "not_asked"
        if client in self.replies or self.failures.get(client, "").startswith("error: "):
            return "duplicate"  # the first valid answer (or the client's own refusal) stands
        outcome: Offered
        if isinstance(reply, Refusal):
            self.failures[client] = f"error: {reply.reason}"
            self._rejected_at.pop(client, None)  # its own word settles it, whatever came before
            outcome = "refused"
        else:
            try:
                check_reply(self.step.spec, reply)
            except RejectedReply as err:
                self.failures[client] = f"rejected: {err}"  # until a valid reply replaces it
                self._rejected_at[client] = time.monotonic()
                outcome = "rejected"
            else:
                self.failures.pop(client, None)
                self._rejected_at.pop(client, None)
                self.replies[client] = reply
                outcome = "accepted"
        if not self.silent() and not self._rejected_at:
            self.done.set()
        return outcome

    def settled(self, grace_s: float) -> bool:
        """Every target answered validly or refused, or its rejected reply is ``grace_s`` old: a
        rejected reply does not close the round at once, so that a genuine reply right behind a
        malformed one still counts."""
        if self.done.is_set():
            return True
        now = time.monotonic()
        return not self.silent() and all(now - t >= grace_s for t in self._rejected_at.values())

    def silent(self) -> set[int]:
        """Targets that have not answered at all."""
        return set(self.targets) - self.replies.keys() - self.failures.keys()

    def close(self, offline: Callable[[int], bool] = lambda i: False,
              never_joined: Iterable[int] = ()) -> RoundOutcome:
        failures = dict(self.failures)
        for i in self.silent():
            failures[i] = "offline" if offline(i) else "missing"
        failures |= {i: "never joined" for i in never_joined}
        return RoundOutcome(self.replies, failures)


@dataclass(frozen=True)
class LateAnswer:
    """A reply that arrived after its step closed: a straggler, not a loss (an event)."""

    op: Op
    round: int
    client: int
    after_s: float  # seconds after the step closed


Routed = Literal["open", "late", "sync", "unknown"]


class TaskBook:
    """Open steps by task id, and the recently closed ones (to tell late answers from unknown ids)."""

    def __init__(self, remember: int = 4096) -> None:
        self.open: dict[str, Collector] = {}
        self._closed: OrderedDict[str, tuple[Op, int, float]] = OrderedDict()
        self._remember = remember
        self.syncs: OrderedDict[str, None] = OrderedDict()

    def opened(self, task_id: str, collector: Collector) -> None:
        self.open[task_id] = collector

    def closed(self, task_id: str) -> None:
        collector = self.open.pop(task_id)
        self._closed[task_id] = (collector.step.op, collector.step.round, time.monotonic())
        while len(self._closed) > self._remember:
            self._closed.popitem(last=False)

    def sync_sent(self, task_id: str) -> None:
        self.syncs[task_id] = None
        while len(self.syncs) > self._remember:
            self.syncs.popitem(last=False)

    def route(self, task_id: str) -> Routed:
        if task_id in self.open:
            return "open"
        if task_id in self._closed:
            return "late"
        if task_id in self.syncs:
            return "sync"
        return "unknown"

    def late(self, task_id: str, client: int) -> LateAnswer:
        op, round_index, closed_at = self._closed[task_id]
        return LateAnswer(op, round_index, client, time.monotonic() - closed_at)
