"""Who takes part in a networked run (:class:`Membership`) and what the clients reported about
themselves (:class:`Telemetry`): the coordinator's bookkeeping, apart from routing replies."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .messages import Bye, Hello, Usage

TaskUsage = tuple[str, int, dict[int, Usage], dict[int, str]]
"""(op, round, client -> usage, client -> failure) of one task."""


class Membership:
    """Clients that said hello (with their sample counts), and whether JOIN is over."""

    def __init__(self, clients: Sequence[int], sync_interval_s: float = 1.0) -> None:
        self.clients = list(clients)
        self.joined: dict[int, int] = {}  # client -> samples it announced
        self.data_seconds: dict[int, float] = {}  # client -> time it took to load its data
        self.all_joined = asyncio.Event()
        self.join_over = False  # JOIN has decided who takes part
        self.sync_interval_s = sync_interval_s
        self._synced: dict[int, tuple[int, float]] = {}  # client -> (session, time.monotonic()) of its last sync

    def needs_sync(self, client: int, hello: Hello) -> str | None:
        """None when a hello earns a sync (a session not synced yet, not too soon after the last);
        else why not: 'hello_repeat' or 'hello_rate_limited' (one sync per change of the client's
        state: twenty hellos must not cost twenty copies of the model)."""
        last = self._synced.get(client)
        if last is not None and last[0] == hello.session:
            return "hello_repeat"
        if last is not None and time.monotonic() - last[1] < self.sync_interval_s:
            return "hello_rate_limited"
        self._synced[client] = (hello.session, time.monotonic())
        return None

    def hello(self, client: int, hello: Hello) -> bool:
        """Record a hello; returns whether the client had joined before (a rejoin)."""
        rejoin = client in self.joined
        self.joined[client] = hello.samples
        self.data_seconds[client] = hello.data_s
        if len(self.joined) == len(self.clients):
            self.all_joined.set()
        return rejoin

    def targets(self) -> list[int]:
        """Who a broadcast task waits for: clients that joined (the others take part from the task
        after their hello)."""
        return [i for i in self.clients if i in self.joined]

    def never_joined(self) -> list[int]:
        return [i for i in self.clients if i not in self.joined]


@dataclass
class Telemetry:
    """The clients' traffic reports (their Bye) and the run's wall-clock milestones."""

    byes: dict[int, Bye] = field(default_factory=dict)
    timeline: dict[str, float] = field(default_factory=dict)  # milestone -> time.time()
    all_byes: asyncio.Event = field(default_factory=asyncio.Event)
    usage: dict[str, TaskUsage] = field(default_factory=dict)
    """task id -> what each client's modeled device spent on it (scenarios with ``devices:``)."""

    def task_sent(self, task_id: str, op: str, round_index: int) -> None:
        self.usage[task_id] = (op, round_index, {}, {})

    def task_usage(self, task_id: str, client: int, usage: Usage) -> None:
        if task_id in self.usage:
            self.usage[task_id][2][client] = usage

    def task_closed(self, task_id: str, failures: Mapping[int, str]) -> None:
        if task_id in self.usage:
            self.usage[task_id][3].update(failures)

    def bye(self, client: int, bye: Bye, expected: int) -> None:
        self.byes[client] = bye
        if len(self.byes) >= expected:
            self.all_byes.set()

    def mark(self, milestone: str) -> None:
        self.timeline.setdefault(milestone, time.time())

    def client_stats(self) -> dict[int, dict[str, int]]:
        return {i: bye.flat() for i, bye in sorted(self.byes.items())}
