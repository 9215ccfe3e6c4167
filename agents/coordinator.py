"""The coordinator agent: JOIN, then the Strategy's stages over the bus, then shutdown.

``BusFleet`` is the networked ``Fleet``: it publishes a task (one broadcast, or a unicast per
client for client-specific parts), collects the replies addressed to that task until every
target answered or the deadline passed, and reports failures as data (late, missing, offline,
rejected, error). Replies are matched by task id, so stale and duplicate updates (QoS 1 may
deliver twice; a slow client may answer an old round) never reach an aggregate. A client that says
hello after the run started gets the current global state (``Strategy.sync_task``) and rejoins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.topics import BROADCAST, Kind, Status
from broker.wire import Message
from nmoe.errors import NmoeError, WireError

from .bus import BusSession
from .codec import (
    BYE,
    ERROR,
    HELLO,
    OP,
    SAMPLES,
    SHUTDOWN,
    TASK,
    client_index,
    client_name,
    decode_reply,
    task_kind,
    task_meta,
    to_numpy,
)
from .config import NetworkConfig
from .protocol import Op, Reply, Task, check_reply
from .strategy import RoundOutcome, Strategy

log = logging.getLogger(__name__)


class JoinFailed(NmoeError):
    """Too few clients joined before the join timeout."""


@dataclass
class _Collector:
    task_id: str
    targets: set[int]
    task: Task
    replies: dict[int, Reply] = field(default_factory=dict)
    failures: dict[int, str] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def add(self, client: int, msg: Message) -> None:
        if client not in self.targets or client in self.replies or client in self.failures:
            return  # not asked, or a duplicate: the first answer counts
        error = msg.header.meta.get(ERROR)
        if error is not None:
            self.failures[client] = f"error: {error}"
        else:
            try:
                reply = decode_reply(client, msg)
                check_reply(self.task, reply)
                self.replies[client] = reply
            except (WireError, ValueError) as err:
                self.failures[client] = f"rejected: {err}"
        if len(self.replies) + len(self.failures) == len(self.targets):
            self.done.set()


class BusFleet:
    """The scenario's clients, reached over the bus; see the module docstring."""

    def __init__(self, bus: BusSession, clients: int, net: NetworkConfig, time_scale: float = 1.0,
                 on_event: Callable[[str], None] | None = None,
                 on_task: Callable[[Task], None] | None = None) -> None:
        self.bus = bus
        self.net = net
        self.time_scale = time_scale
        self._clients = list(range(clients))
        self.on_event = on_event or (lambda text: None)
        self.on_task = on_task or (lambda task: None)  # told of every task once it is sent
        self.strategy: Strategy | None = None
        self.joined: dict[int, int] = {}  # client -> samples it announced
        self.late: list[tuple[str, int]] = []  # (task id, client) answers after their round closed
        self.client_stats: dict[int, dict[str, Any]] = {}
        self.data_seconds: dict[int, float] = {}  # client -> time it took to load its data
        self.timeline: dict[str, float] = {}  # wall-clock (time.time()) milestones of the run
        self._open: dict[str, _Collector] = {}
        self._closed: dict[str, dict[int, str]] = {}  # task id -> its round's failures (a late answer updates them)
        self._joined_event = asyncio.Event()
        self.join_over = False  # JOIN has decided who takes part
        self._byes = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None

    @property
    def clients(self) -> Sequence[int]:
        return self._clients

    async def __aenter__(self) -> BusFleet:
        self._pump = asyncio.create_task(self._read(), name="coordinator-pump")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)

    # -- receiving ---------------------------------------------------------------------------------
    async def _read(self) -> None:
        async for msg in self.bus.messages():
            client = client_index(msg.src)
            if client is None or client not in self._clients:
                log.warning("ignoring %s from %s: not a client of this run", msg.kind.value, msg.src)
                continue
            meta = msg.header.meta
            op, task_id = meta.get(OP), str(meta.get(TASK, ""))
            if op == HELLO:
                data_s = meta.get("data_s")
                if isinstance(data_s, float):
                    self.data_seconds[client] = data_s
                await self._hello(client, meta.get(SAMPLES))
            elif op == BYE:  # its bus counters; anything but plain integers is not a counter
                self.client_stats[client] = {k: v for k, v in meta.items()
                                             if isinstance(v, int) and not isinstance(v, bool)}
                if len(self.client_stats) >= len(self.joined):
                    self._byes.set()
            elif task_id in self._open:
                self._open[task_id].add(client, msg)
            elif task_id in self._closed:
                self.late.append((task_id, client))
                failures = self._closed[task_id]
                if failures.get(client) == "missing":
                    failures[client] = "late"  # it answered, after the deadline: a straggler, not a loss
                self.on_event(f"late answer from {msg.src} to a closed round ({task_id.rsplit('-', 1)[0]})")
            elif task_id.startswith("sync-"):
                if ERROR in meta:
                    self.on_event(f"{msg.src} could not catch up with the run: {meta[ERROR]}")
                else:
                    log.info("%s caught up with the run", msg.src)
            else:
                log.warning("ignoring %s from %s for unknown task %r", msg.kind.value, msg.src, task_id[:40])

    async def _hello(self, client: int, samples: object) -> None:
        rejoin = client in self.joined
        self.joined[client] = samples if isinstance(samples, int) and not isinstance(samples, bool) else 0
        if len(self.joined) == len(self._clients):
            self.timeline.setdefault("all_joined_at", time.time())
            self._joined_event.set()
        if self.strategy is None or self.strategy.stage == "join":
            return
        self.on_event(f"{client_name(client)} {'rejoined' if rejoin else 'joined late'}; sending the current state")
        try:
            await self._publish(self.strategy.sync_task(), f"sync-{uuid.uuid4().hex[:12]}", [client])
            for collector in list(self._open.values()):  # a task it may have missed while away: again
                if client in collector.targets and client not in collector.replies:
                    await self._publish(collector.task, collector.task_id, [client])
        except NmoeError as err:  # the pump must go on: the next hello tries again
            self.on_event(f"could not send {client_name(client)} the current state: {err}")

    # -- JOIN --------------------------------------------------------------------------------------
    async def join(self) -> None:
        """Wait for every client's hello; go on with at least min_clients, else fail naming who is missing."""
        try:
            await asyncio.wait_for(self._joined_event.wait(), self.net.join_timeout_s)
            self.join_over = True
            return
        except asyncio.TimeoutError:
            pass
        missing = [i for i in self._clients if i not in self.joined]
        status = self.bus.status()
        named = ", ".join(f"{client_name(i)} ({status.get(client_name(i), 'never connected')})" for i in missing)
        waited = self.net.join_timeout_s
        text = f"{len(missing)} of {len(self._clients)} clients did not join within {waited:g}s: {named}"
        if len(self.joined) < self.net.min_clients:
            raise JoinFailed(text + f"; min_clients is {self.net.min_clients}")
        self.join_over = True
        self.on_event(text + "; going on without them")

    # -- rounds ------------------------------------------------------------------------------------
    def deadline(self, op: Op) -> float:
        """Wall-clock seconds this kind of task may take (modeled deadlines scaled by time_scale)."""
        n = self.net
        modeled = {Op.STAGE2_FIT: n.stage2_timeout_s, Op.STAGE3_PREPARE: n.eval_timeout_s,
                   Op.EVALUATE: n.eval_timeout_s}.get(op, n.round_timeout_s)
        return modeled * self.time_scale

    async def run(self, task: Task) -> RoundOutcome:
        # clients that never joined are not waited for (JOIN went on without them); they take part
        # from the task after their hello
        targets = sorted(task.personal) if task.personal else [i for i in self._clients if i in self.joined]
        task_id = f"{task.op.value}-{task.round}-{uuid.uuid4().hex[:12]}"
        collector = _Collector(task_id, set(targets), task)
        self._open[task_id] = collector
        try:
            self.timeline.setdefault("first_task_at", time.time())
            await self._publish(task, task_id, targets)
            self.on_task(task)
            await self._collect(collector)
        finally:
            del self._open[task_id]
        status = self.bus.status()
        failures = dict(collector.failures)
        for i in targets:
            if i not in collector.replies and i not in failures:
                offline = status.get(client_name(i)) == Status.OFFLINE.value
                failures[i] = "offline" if offline else "missing"
        if not task.personal:
            failures |= {i: "never joined" for i in self._clients if i not in self.joined}
        self._closed[task_id] = failures
        return RoundOutcome(dict(collector.replies), failures)

    async def _collect(self, collector: _Collector) -> None:
        """Until every target answered, or every one still silent is offline, or the deadline passed
        (the deadline closes the round: failures are data)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline(collector.task.op)
        while not collector.done.is_set() and (left := deadline - loop.time()) > 0:
            if self._pump is not None and self._pump.done():  # nothing can arrive any more: say why
                self._pump.result()
                raise NmoeError("the coordinator stopped reading the bus")
            status = self.bus.status()
            silent = collector.targets - collector.replies.keys() - collector.failures.keys()
            if silent and all(status.get(client_name(i)) == Status.OFFLINE.value for i in silent):
                return  # nobody left who could still answer
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(collector.done.wait(), min(left, 0.25))

    async def _publish(self, task: Task, task_id: str, targets: Sequence[int]) -> None:
        stage = task.op.value.split("_")[0]
        if task.personal:
            for i in targets:
                part = task.part_for(i)
                await self.bus.send(client_name(i), Kind.CORR if part.tensors else Kind.CTRL, to_numpy(part.tensors),
                                    round=task.round, stage=stage, meta=task_meta(task, task_id, part))
        elif len(targets) == 1:
            await self.bus.send(client_name(targets[0]), task_kind(task.common), to_numpy(task.common.tensors),
                                round=task.round, stage=stage, meta=task_meta(task, task_id, task.common))
        else:
            await self.bus.send(BROADCAST, task_kind(task.common), to_numpy(task.common.tensors), round=task.round,
                                stage=stage, meta=task_meta(task, task_id, task.common))

    # -- the end -------------------------------------------------------------------------------------
    async def shutdown(self, timeout: float = 10.0) -> None:
        """Tell every client to stop; wait briefly for their traffic reports."""
        if not self.joined:
            return
        try:
            await self.bus.send(BROADCAST, Kind.CTRL, meta={OP: SHUTDOWN, TASK: f"shutdown-{int(time.time())}"})
        except NmoeError as err:  # the broker is gone: agents notice it themselves
            self.on_event(f"could not tell the agents to stop: {err}")
            return
        try:
            await asyncio.wait_for(self._byes.wait(), timeout)
        except asyncio.TimeoutError:
            missing = sorted(set(self.joined) - set(self.client_stats))
            self.on_event(f"no traffic report from {', '.join(client_name(i) for i in missing)}")


async def coordinate(strategy: Strategy, fleet: BusFleet) -> None:
    """JOIN, then every stage; the fleet keeps serving rejoins while the strategy runs."""
    fleet.strategy = strategy
    await fleet.join()
    await strategy.run(fleet)
