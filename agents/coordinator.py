"""The coordinator agent: JOIN, then the Strategy's stages over the bus, then shutdown.

``BusFleet`` is the networked ``Fleet``. It only moves messages: it publishes a step's task (one
broadcast, or a unicast per client), routes each reply by its task id to that step's
``Collector`` (``agents.rounds``), and closes the step when every target answered, when every
silent one is offline, or at the deadline. Who takes part lives in ``Membership``, what clients
report about themselves in ``Telemetry``. What a rejoining client needs comes from the injected
``sync`` callable (``Strategy.sync_task``): the fleet never calls back into the strategy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from broker.topics import BROADCAST, Status
from broker.wire import Message
from nmoe.errors import NmoeError, ProtocolError

from .bus import BusSession
from .codec import (
    Wire,
    client_index,
    client_name,
    decode_control,
    decode_elapsed,
    decode_reply,
    decode_usage,
    encode_control,
    encode_task,
    is_control,
)
from .config import NetworkConfig
from .membership import Membership, Telemetry
from .messages import Bye, Hello, Op, Refusal, Shutdown, Sync, Task
from .rounds import Collector, LateAnswer, RoundOutcome, Step, TaskBook

log = logging.getLogger(__name__)


class JoinFailed(NmoeError):
    """Too few clients joined before the join timeout."""


class BusFleet:
    """The scenario's clients, reached over the bus; see the module docstring."""

    def __init__(self, bus: BusSession, clients: int, net: NetworkConfig, time_scale: float = 1.0, *,
                 sync: Callable[[], Sync | None] = lambda: None,
                 on_event: Callable[[str], None] | None = None,
                 on_task: Callable[[Task], None] | None = None) -> None:
        self.bus = bus
        self.net = net
        self.time_scale = time_scale
        self.sync = sync
        self.members = Membership(range(clients))
        self.telemetry = Telemetry()
        self.book = TaskBook()
        self.late: list[LateAnswer] = []
        self.on_event = on_event or (lambda text: None)
        self.on_task = on_task or (lambda task: None)  # told of every task once it is sent
        self._pump: asyncio.Task[None] | None = None
        self._reissuer: asyncio.Task[None] | None = None
        self.reissued = 0  # tasks sent again after the coordinator's session reconnected
        self._elapsed: dict[str, dict[int, float]] = {}  # open task id -> client -> modeled s, send to reply

    @property
    def clients(self) -> Sequence[int]:
        return self.members.clients

    async def __aenter__(self) -> BusFleet:
        self._pump = asyncio.create_task(self._read(), name="coordinator-pump")
        self._reissuer = asyncio.create_task(self._reissue_after_reconnects(), name="coordinator-reissue")
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in (self._pump, self._reissuer):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    # -- receiving ---------------------------------------------------------------------------------
    async def _read(self) -> None:
        async for msg in self.bus.messages():
            client = client_index(msg.src)
            if client is None or client not in self.clients:
                log.warning("ignoring %s from %s: not a client of this run", msg.kind.value, msg.src)
                continue
            wire = Wire(msg.kind, dict(msg.tensors), dict(msg.header.meta), msg.header.round, msg.header.stage)
            try:
                if is_control(wire.meta):
                    await self._control(client, wire)
                else:
                    self._reply(client, msg, wire)
            except ProtocolError as err:  # counted with the bus's own rejections
                self.bus.stats.rejected[err.reason] += 1
                log.warning("rejected %s from %s: %s", msg.kind.value, msg.src, err)

    async def _control(self, client: int, wire: Wire) -> None:
        message = decode_control(wire)
        if isinstance(message, Hello):
            await self._hello(client, message)
        elif isinstance(message, Bye):
            self.telemetry.bye(client, message, len(self.members.joined))
        else:
            raise ProtocolError("unknown_op", "a client cannot send shutdown")

    def _reply(self, client: int, msg: Message, wire: Wire) -> None:
        task_id, reply = decode_reply(wire)
        usage = decode_usage(wire.meta)
        if usage is not None:  # late or not, the device spent it
            self.telemetry.task_usage(task_id, client, usage)
        route = self.book.route(task_id)
        if route == "open":
            elapsed = decode_elapsed(wire.meta)
            if self.book.open[task_id].offer(client, reply) == "accepted" and elapsed is not None:
                self._elapsed.setdefault(task_id, {})[client] = elapsed + (msg.header.transit_s or 0.0)
        elif route == "late":
            late = self.book.late(task_id, client)
            self.late.append(late)
            self.on_event(f"late answer from {msg.src} to {late.op.value} round {late.round} "
                          f"({late.after_s:.1f}s after it closed)")
        elif route == "sync":
            if isinstance(reply, Refusal):
                self.on_event(f"{msg.src} could not catch up with the run: {reply.reason}")
            else:
                log.info("%s caught up with the run", msg.src)
        else:
            raise ProtocolError("unknown_task", f"a reply to unknown task {task_id[:40]!r}")

    async def _hello(self, client: int, hello: Hello) -> None:
        rejoin = self.members.hello(client, hello)
        if self.members.all_joined.is_set():
            self.telemetry.mark("all_joined_at")
        sync = self.sync()
        if sync is None:  # still joining: JOIN itself sends nothing
            return
        refused = self.members.needs_sync(client, hello)
        if refused is not None:
            self.bus.stats.rejected[refused] += 1
            return
        self.on_event(f"{client_name(client)} {'rejoined' if rejoin else 'joined late'}; sending the current state")
        try:
            task_id = f"sync-{uuid.uuid4().hex[:12]}"
            self.book.sync_sent(task_id)
            await self._send(client_name(client), encode_task(sync, task_id))
            for task_id, collector in list(self.book.open.items()):  # a task it may have missed while away
                if client in collector.targets and client not in collector.replies:
                    await self._send(client_name(client), encode_task(collector.step.task_for(client), task_id))
        except NmoeError as err:  # the pump must go on: the next hello tries again
            self.on_event(f"could not send {client_name(client)} the current state: {err}")

    # -- broker restarts ------------------------------------------------------------------------------
    async def _reissue_after_reconnects(self, poll_s: float = 0.25) -> None:
        """After the coordinator's session reconnects (the broker went away), send each open task
        once more to its targets that have not answered: the task, or their reply, may have been
        lost with the broker. Clients answer a task id they already answered from their reply cache."""
        seen = self.bus.stats.reconnects
        while True:
            await asyncio.sleep(poll_s)
            if self.bus.stats.reconnects == seen or not self.bus.connected:
                continue
            seen = self.bus.stats.reconnects
            for task_id, collector in list(self.book.open.items()):
                silent = sorted(collector.silent())
                if not silent:
                    continue
                self.on_event(f"reconnected to the broker: re-sending {collector.step.op.value} round "
                              f"{collector.step.round} to {', '.join(client_name(i) for i in silent)}")
                for i in silent:
                    try:
                        await self._send(client_name(i), encode_task(collector.step.task_for(i), task_id))
                        self.reissued += 1
                    except NmoeError as err:  # gone again: the next reconnection tries again
                        self.on_event(f"could not re-send the open task to {client_name(i)}: {err}")

    # -- JOIN --------------------------------------------------------------------------------------
    async def join(self) -> None:
        """Wait for every client's hello; go on with at least min_clients, else fail naming who is missing."""
        try:
            await asyncio.wait_for(self.members.all_joined.wait(), self.net.join_timeout_s)
            self.members.join_over = True
            return
        except asyncio.TimeoutError:
            pass
        missing = self.members.never_joined()
        status = self.bus.status()
        named = ", ".join(f"{client_name(i)} ({status.get(client_name(i), 'never connected')})" for i in missing)
        text = (f"{len(missing)} of {len(self.clients)} clients did not join within {self.net.join_timeout_s:g}s: "
                f"{named}")
        if len(self.members.joined) < self.net.min_clients:
            raise JoinFailed(text + f"; min_clients is {self.net.min_clients}")
        self.members.join_over = True
        self.on_event(text + "; going on without them")

    # -- rounds ------------------------------------------------------------------------------------
    def deadline(self, op: Op) -> float:
        """Wall-clock seconds this kind of task may take (modeled deadlines scaled by time_scale)."""
        return self.net.deadline_s(op) * self.time_scale

    async def run(self, step: Step) -> RoundOutcome:
        targets = sorted(step.personal) if step.personal else self.members.targets()
        task_id = f"{step.op.value}-{step.round}-{uuid.uuid4().hex[:12]}"
        collector = Collector(step, targets)
        self.book.opened(task_id, collector)
        self.telemetry.task_sent(task_id, step.op.value, step.round)
        try:
            self.telemetry.mark("first_task_at")
            await self._publish(step, task_id, targets)
            for task in step.tasks():
                self.on_task(task)
            await self._collect(collector)
        finally:
            self.book.closed(task_id)
        status = self.bus.status()
        outcome = collector.close(offline=lambda i: status.get(client_name(i)) == Status.OFFLINE.value,
                                  never_joined=() if step.personal else self.members.never_joined())
        self.telemetry.task_closed(task_id, outcome.failures)
        return replace(outcome, modeled_s=self._modeled_s(step.op, outcome, self._elapsed.pop(task_id, {})))

    def _modeled_s(self, op: Op, outcome: RoundOutcome, elapsed: Mapping[int, float]) -> float:
        """The step's duration on the modeled clock: its slowest accepted reply (the task's transit,
        the client's modeled work, the reply's transit); the whole modeled deadline when a target
        stayed silent or sent a rejected reply (the coordinator waited for it). A client seen going
        offline, or saying it cannot do the task, is not waited for."""
        if any(why == "missing" or why.startswith("rejected") for why in outcome.failures.values()):
            return self.net.deadline_s(op)
        return max(elapsed.values(), default=0.0)

    async def _collect(self, collector: Collector) -> None:
        """Until every target answered, or every one still silent is offline, or the deadline passed
        (the deadline closes the round: failures are data)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.deadline(collector.step.op)
        grace = self.net.rejected_grace_s * self.time_scale
        while not collector.settled(grace) and (left := deadline - loop.time()) > 0:
            if self._pump is not None and self._pump.done():  # nothing can arrive any more: say why
                self._pump.result()
                raise NmoeError("the coordinator stopped reading the bus")
            status = self.bus.status()
            silent = collector.silent()
            if silent and all(status.get(client_name(i)) == Status.OFFLINE.value for i in silent):
                return  # nobody left who could still answer
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(collector.done.wait(), min(left, 0.25))

    async def _publish(self, step: Step, task_id: str, targets: Sequence[int]) -> None:
        if step.personal:
            for i in targets:
                await self._send(client_name(i), encode_task(step.task_for(i), task_id))
        elif step.common is not None:
            dst = client_name(targets[0]) if len(targets) == 1 else BROADCAST
            await self._send(dst, encode_task(step.common, task_id))

    async def _send(self, dst: str, wire: Wire) -> None:
        await self.bus.send(dst, wire.kind, wire.tensors, round=wire.round, stage=wire.stage, meta=wire.meta)

    # -- the end -------------------------------------------------------------------------------------
    async def shutdown(self, timeout: float = 10.0) -> None:
        """Tell every client to stop; wait briefly for their traffic reports."""
        if not self.members.joined:
            return
        try:
            await self._send(BROADCAST, encode_control(Shutdown()))
        except NmoeError as err:  # the broker is gone: agents notice it themselves
            self.on_event(f"could not tell the agents to stop: {err}")
            return
        try:
            await asyncio.wait_for(self.telemetry.all_byes.wait(), timeout)
        except asyncio.TimeoutError:
            missing = sorted(set(self.members.joined) - set(self.telemetry.byes))
            self.on_event(f"no traffic report from {', '.join(client_name(i) for i in missing)}")

