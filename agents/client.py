"""The edge client agent: one process (or task) per client, on a laptop or a Raspberry Pi.

It loads only its own partition, announces itself to the coordinator, runs the tasks the
coordinator sends (the very ``execute`` the in-process pipeline calls), and serves its expert to
other clients' ``latent`` requests at any time. Training runs in a worker thread, so the event loop
keeps answering the bus while the CPU trains.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, TypeVar

import torch

from broker.topics import Kind, Status
from broker.wire import Message, Schema, TensorSpec
from nmoe.errors import BusError, NmoeError, ProtocolError
from nmoe_models.config import ExperimentConfig
from nmoe_models.learner import ClientLearner
from nmoe_models.partition import load_client_data

from .bus import BusConfig, BusSession, BusStats, PublishTimeout, RequestTimeout
from .codec import (
    COORDINATOR,
    LATENTS,
    LOGPROBS,
    Wire,
    client_name,
    decode_control,
    decode_expert_answer,
    decode_task,
    encode_control,
    encode_elapsed,
    encode_expert_answer,
    encode_expert_decline,
    encode_expert_query,
    encode_reply,
    encode_usage,
    is_control,
    query_deadline,
)
from .compute import ComputeMeter, TooSlow
from .config import NetworkConfig
from .devices import Device
from .energy import RadioModel
from .messages import BYE_COUNTERS, BYE_TOTALS, Bye, Hello, Op, Refusal, Shutdown, Usage
from .protocol import Blocking, ExpertAnswer, execute
from .routing import LatencyPredictor

log = logging.getLogger(__name__)
T = TypeVar("T")
TASK_KINDS = (Kind.MODEL, Kind.CORR, Kind.CTRL)


async def in_thread(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform == "linux" else None


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc keeps what a training step freed, tens of
    MB per agent, until the next one); about a millisecond, after each task."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def wire_bytes(wire: Wire) -> int:
    """Bytes of a message's tensors (its header adds a few hundred more)."""
    return sum(int(a.nbytes) for a in wire.tensors.values())


def _moved(stats: BusStats) -> tuple[int, int]:
    return int(sum(stats.sent_bytes.values())), int(sum(stats.received_bytes.values()))


def wire_of(msg: Message) -> Wire:
    h = msg.header
    return Wire(msg.kind, dict(msg.tensors), dict(h.meta), h.round, h.stage)


class BusPool:
    """Other clients' experts, reached by ``latent`` requests over the bus with a deadline."""

    def __init__(self, bus: BusSession, deadline_s: float, time_scale: float,
                 predictor: LatencyPredictor | None = None, rows_per_deadline: int = 0) -> None:
        self.bus = bus
        self.deadline_s = deadline_s
        self.rows_per_deadline = rows_per_deadline
        """> 0: a query of n rows may take ceil(n / rows_per_deadline) deadlines (a bulk exchange)."""
        self.time_scale = time_scale
        self.predictor = predictor
        """Predicts each expert's response time (deadline-aware routing); learns from the answers."""

    async def query(self, expert: int, latents: torch.Tensor) -> ExpertAnswer:
        t0 = time.perf_counter()
        deadline = self.deadline_s
        if self.rows_per_deadline > 0:
            deadline *= max(1, -(-latents.shape[0] // self.rows_per_deadline))
        query = encode_expert_query(latents, deadline / self.time_scale)
        try:
            reply = await self.bus.request(client_name(expert), query.kind, query.tensors, deadline_s=deadline,
                                           meta=query.meta)
        except (RequestTimeout, BusError, ProtocolError):  # no answer in time, or latents we could not send
            if self.predictor is not None:
                self.predictor.observe(expert, latents.shape[0], None)
            return ExpertAnswer(None, deadline / self.time_scale)
        wall = time.perf_counter() - t0
        try:
            answer = decode_expert_answer(reply.tensors, reply.header.meta)
        except ProtocolError as err:
            self.bus.stats.rejected[err.reason] += 1
            return ExpertAnswer(None, wall / self.time_scale)
        if answer.logprobs is None:  # its device cannot answer before our deadline: it said so at once
            self.bus.stats.rejected["expert_declined"] += 1
            if self.predictor is not None:
                self.predictor.observe(expert, latents.shape[0], None)
            return ExpertAnswer(None, wall / self.time_scale)
        if answer.logprobs.shape[0] != latents.shape[0]:
            self.bus.stats.rejected["bad_reply"] += 1
            return ExpertAnswer(None, wall / self.time_scale)
        latency = wall
        if (back := reply.header.transit_s) is not None and answer.req_transit_s is not None:
            # modeled seconds: request transit (reported back by the expert) + service + reply transit
            service = (answer.service_s or 0.0) / self.time_scale
            latency = answer.req_transit_s + service + back
        if self.predictor is not None:
            self.predictor.observe(expert, latents.shape[0], latency)
        return ExpertAnswer(torch.from_numpy(answer.logprobs), latency)

    def would_miss(self, expert: int, rows: int) -> bool:
        return self.predictor is not None and self.predictor.would_miss(expert, rows)

    def wire_bytes(self) -> int:
        s = self.bus.stats
        return int(s.sent_bytes[Kind.LATENT.value] + s.received_bytes[Kind.LOGITS.value])


class CoordinatorGone(BusError):
    """The coordinator went offline (or the broker out of reach) and did not come back in time."""


class ClientAgent:
    def __init__(self, exp: ExperimentConfig, net: NetworkConfig, index: int, bus_cfg: BusConfig,
                 time_scale: float = 1.0, device: Device | None = None, radio: RadioModel | None = None,
                 predictor: LatencyPredictor | None = None, blocking: Blocking[Any] | None = None) -> None:
        self.exp = exp
        self.net = net
        self.index = index
        self.bus_cfg = bus_cfg
        self.time_scale = time_scale
        self.learner: ClientLearner | None = None
        self.data_s = 0.0  # loading the partition and building the models
        self.answered: OrderedDict[str, Wire] = OrderedDict()  # task id -> our reply, the latest few
        self.queued: set[str] = set()  # task ids waiting for or in the worker
        self.resent = 0  # replies sent again from the cache (a task re-issued after a broker restart)
        self.meter = ComputeMeter(device, time_scale, radio) if device is not None else None
        """The modeled device (None: compute at this host's speed, report no usage)."""
        self.predictor = predictor
        self.blocking: Blocking[Any] = blocking or in_thread
        """Where heavy work runs when no device is modeled: a worker thread (one agent per process), or
        a queue shared by every agent of a process, one at a time (``scenarios.agent_tasks``)."""
        self._moved = (0, 0)  # bus bytes (sent, received) at the previous report of usage
        self._serving: set[asyncio.Task[None]] = set()

    def schemas(self) -> Mapping[Kind | str, Schema]:
        d, c = self.exp.model.latent_dim, self.learner.classes if self.learner else 10
        return {
            Kind.LATENT: Schema({LATENTS: TensorSpec("float32", (None, d))}),
            # optional: an expert that declines a query (no expert yet, too slow) answers without logits
            Kind.LOGITS: Schema({LOGPROBS: TensorSpec("float32", (None, c), optional=True)}),
        }

    async def run(self) -> None:
        """Load the partition, join, serve until the coordinator says shutdown."""
        def prepare() -> tuple[ClientLearner, float]:
            clock = time.perf_counter()  # the work itself, not the wait for a shared worker
            return ClientLearner(self.exp, load_client_data(self.exp, self.index)), time.perf_counter() - clock

        self.learner, self.data_s = await self.blocking(prepare)
        queue: asyncio.Queue[tuple[Message, float] | None] = asyncio.Queue()
        async with BusSession(self.bus_cfg, self.schemas(), watch_agents=(COORDINATOR,)) as bus:
            worker = asyncio.create_task(self._work(bus, queue), name=f"{self.bus_cfg.agent_id}-worker")
            rejoin = asyncio.create_task(self._rejoin(bus), name=f"{self.bus_cfg.agent_id}-rejoin")
            watch = asyncio.create_task(self._watch_coordinator(bus), name=f"{self.bus_cfg.agent_id}-watch")
            serve = asyncio.create_task(self._serve_bus(bus, worker, queue), name=f"{self.bus_cfg.agent_id}-serve")
            try:
                await self._hello(bus)
                await asyncio.wait({serve, watch}, return_when=asyncio.FIRST_COMPLETED)
                for ended in (watch, serve):
                    if ended.done():
                        ended.result()  # the watcher ends only by raising CoordinatorGone
            finally:
                queue.put_nowait(None)
                for task in (worker, rejoin, watch, serve, *self._serving):
                    task.cancel()
                await asyncio.gather(worker, rejoin, watch, serve, *self._serving, return_exceptions=True)

    async def _serve_bus(self, bus: BusSession, worker: asyncio.Task[None],
                         queue: asyncio.Queue[tuple[Message, float] | None]) -> None:
        """Hand tasks to the worker and answer latent requests, until shutdown."""
        async for msg in bus.messages():
            if worker.done():  # the worker must never end before shutdown: surface why it did
                worker.result()
                raise BusError("the task worker stopped")
            if msg.kind is Kind.LATENT:
                if self.meter is None:
                    await self._serve(bus, msg)
                else:  # the device's modeled service time must not hold up the bus
                    job = asyncio.create_task(self._serve(bus, msg))
                    self._serving.add(job)
                    job.add_done_callback(self._serving.discard)
            elif msg.src == COORDINATOR and msg.kind in TASK_KINDS:
                if not is_control(msg.header.meta):
                    task_id = str(msg.header.meta.get("task", ""))
                    if task_id in self.queued:  # re-issued while we still work on it: one answer will do
                        log.info("task %s is already queued", task_id[:40])
                        continue
                    self.queued.add(task_id)
                    queue.put_nowait((msg, asyncio.get_running_loop().time()))
                elif await self._control(bus, msg):
                    return
            else:
                log.debug("ignoring %s from %s", msg.kind.value, msg.src)

    async def _watch_coordinator(self, bus: BusSession, poll_s: float = 0.25) -> None:
        """Raise CoordinatorGone once the coordinator has been offline (its last will) or the broker
        out of reach for ``network.coordinator_grace_s`` on end."""
        grace = self.net.coordinator_grace_s
        loop = asyncio.get_running_loop()
        since: float | None = None
        while True:
            state = bus.status().get(COORDINATOR)
            gone = not bus.connected or state == Status.OFFLINE.value
            if not gone:
                since = None
            elif since is None:
                since = loop.time()
                log.warning("the %s is %s; waiting up to %gs for it", COORDINATOR if bus.connected else "broker",
                            "offline" if bus.connected else "out of reach", grace)
            elif loop.time() - since >= grace:
                what = "coordinator has been offline" if bus.connected else "broker has been out of reach"
                raise CoordinatorGone(f"{self.bus_cfg.agent_id}: the {what} for {grace:g}s "
                                      "(network.coordinator_grace_s); the run is over, exiting")
            await asyncio.sleep(poll_s)

    async def _control(self, bus: BusSession, msg: Message) -> bool:
        """A control message from the coordinator; True when it ends the run (shutdown)."""
        try:
            message = decode_control(wire_of(msg))
        except ProtocolError as err:
            bus.stats.rejected[err.reason] += 1
            return False
        if not isinstance(message, Shutdown):
            bus.stats.rejected["unknown_op"] += 1  # hello and bye go to the coordinator, not from it
            return False
        await self._send(bus, encode_control(self._bye(bus)))
        return True

    async def _send(self, bus: BusSession, wire: Wire) -> None:
        await bus.send(COORDINATOR, wire.kind, wire.tensors, round=wire.round, stage=wire.stage, meta=wire.meta)

    async def _hello(self, bus: BusSession) -> None:
        assert self.learner is not None
        await self._send(bus, encode_control(Hello(self.learner.data.num_train, self.data_s, bus.stats.reconnects)))

    async def _rejoin(self, bus: BusSession) -> None:
        """After the session reconnects (the broker or the network went away), say hello again:
        the coordinator answers with the run's current state, so a client that missed tasks
        catches up instead of training on stale weights."""
        seen = bus.stats.reconnects
        while True:
            await asyncio.sleep(0.5)
            if bus.stats.reconnects != seen and bus.connected:
                seen = bus.stats.reconnects
                log.info("reconnected to the broker; announcing myself again")
                try:
                    await self._hello(bus)
                except BusError as err:  # gone again: the next reconnection says hello
                    log.warning("could not announce myself after reconnecting: %s", err)

    @staticmethod
    def _bye(bus: BusSession) -> Bye:
        stats = bus.stats.as_dict()
        counters = {name: {k: int(v) for k, v in stats[name].items()} for name in BYE_COUNTERS}
        return Bye(counters, {name: int(stats[name]) for name in BYE_TOTALS})

    async def _serve(self, bus: BusSession, msg: Message) -> None:
        """Answer a latent request with this client's expert (once it is trained)."""
        learner = self.learner
        if learner is None or not learner.expert_ready:  # no expert (yet): say so, the requester falls back now
            await self._decline(bus, msg, "no trained expert on this client")
            return
        t0 = time.perf_counter()
        h = msg.header
        transit = h.transit_s
        h_in = torch.from_numpy(msg.tensors[LATENTS])
        if self.meter is None:
            logp = learner.expert_logprobs(h_in)
            service = time.perf_counter() - t0
        else:  # the device's modeled service time, whatever this host took (its lag is reported apart)
            due = asyncio.get_running_loop().time() + (query_deadline(h.meta) - (transit or 0.0)) * self.time_scale
            try:
                logp, modeled = await self.meter.serve(lambda: learner.expert_logprobs(h_in), deadline_at=due)
            except TooSlow as err:  # say so now: the requester falls back at once instead of at its deadline
                await self._decline(bus, msg, str(err))
                return
            service = modeled * self.time_scale
        if not bool(torch.isfinite(logp).all()):  # finite but absurd latents (e.g. 1e38) overflow the expert
            bus.stats.rejected["non_finite_answer"] += 1
            return
        answer = encode_expert_answer(logp, service, transit)
        try:
            await bus.reply(msg, answer.kind, answer.tensors, meta=answer.meta)
        except NmoeError as err:  # the requester falls back at its deadline
            log.warning("could not answer %s's latent request: %s", msg.src, err)

    @staticmethod
    async def _decline(bus: BusSession, msg: Message, reason: str) -> None:
        decline = encode_expert_decline(reason)
        try:
            await bus.reply(msg, decline.kind, decline.tensors, meta=decline.meta)
        except NmoeError as err:  # the requester falls back at its deadline instead
            log.warning("could not decline %s's latent request: %s", msg.src, err)

    async def _work(self, bus: BusSession, queue: asyncio.Queue[tuple[Message, float] | None]) -> None:
        """Run the coordinator's tasks one at a time, in arrival order."""
        assert self.learner is not None
        pool = BusPool(bus, self.net.inference_deadline_s * self.time_scale, self.time_scale, self.predictor)
        # Stage 3's one exchange of training latents (and a rejoining client's) is a bulk transfer: a
        # query may take one inference deadline per inference batch's worth of rows it carries
        prepare = BusPool(bus, self.net.inference_deadline_s * self.time_scale, self.time_scale,
                          rows_per_deadline=self.exp.eval.batch_size)
        while (item := await queue.get()) is not None:
            msg, received_at = item
            try:
                await self._one_task(bus, pool, prepare, msg, received_at)
            finally:
                self.queued.discard(str(msg.header.meta.get("task", "")))
                release_free_memory()

    def _deadline_at(self, msg: Message, op: Op, received_at: float) -> float:
        """The loop time by which this task's reply is due: the coordinator's deadline runs from its
        send, which the channel's stamps put ``t_model_arrive - t_model_send`` before our receipt."""
        return received_at + (self.net.deadline_s(op) - (msg.header.transit_s or 0.0)) * self.time_scale

    def _elapsed(self, msg: Message, received_at: float, usage: Usage | None) -> float:
        """Modeled seconds from the coordinator's send of ``msg`` to now: its transit on the channel,
        then this client's time on it, less this host's lag behind the modeled device."""
        busy = (asyncio.get_running_loop().time() - received_at) / self.time_scale
        return (msg.header.transit_s or 0.0) + max(0.0, busy - (usage.lag_s if usage is not None else 0.0))

    def _usage(self, bus: BusSession, reply_bytes: int, too_slow: bool = False) -> Usage | None:
        if self.meter is None:
            return None
        sent, received = _moved(bus.stats)
        tx, rx = sent - self._moved[0] + reply_bytes, received - self._moved[1]
        self._moved = (sent + reply_bytes, received)
        return self.meter.report(tx, rx, too_slow)

    async def _one_task(self, bus: BusSession, pool: BusPool, prepare: BusPool, msg: Message,
                        received_at: float) -> None:
        assert self.learner is not None
        try:
            task_id, task = decode_task(wire_of(msg))
        except ProtocolError as err:
            bus.stats.rejected[err.reason] += 1
            log.warning("rejected a task: %s", err)
            return
        log.info("task %s round %d", task.op.value, task.round)
        try:
            if (cached := self.answered.get(task_id)) is not None:
                # the coordinator did not get our reply (lost with a broker restart) and asked again:
                # the same answer again, not a second training run
                self.resent += 1
                await self._send(bus, cached)
                return
            if self.meter is not None:
                self.meter.begin(task.op, self._deadline_at(msg, task.op, received_at))
            reply = await execute(self.learner, task, prepare if task.op in (Op.STAGE3_PREPARE, Op.SYNC) else pool,
                                  self.meter or self.blocking)
            wire = encode_reply(reply, task_id, task.op, task.round)
            if (usage := self._usage(bus, wire_bytes(wire))) is not None:  # the reply's size is part of it
                wire = replace(wire, meta={**wire.meta, **encode_usage(usage)})
            wire = replace(wire, meta={**wire.meta, **encode_elapsed(self._elapsed(msg, received_at, usage))})
            self._remember(task_id, wire)
            await self._send(bus, wire)
        except PublishTimeout as err:  # the broker is away: the coordinator re-issues the task later
            log.warning("could not send my answer to %s (kept for when it is asked again): %s", task.op.value, err)
        except TooSlow as err:  # the device cannot make the deadline: say so now, not after it
            log.warning("%s round %d: %s", task.op.value, task.round, err)
            if task.op is Op.STAGE2_FIT:  # the FLOPs were counted by running it: undo what the device never did
                self.learner.drop_stage2()
            await self._refuse(bus, task_id, task.op, task.round, err, self._usage(bus, 0, too_slow=True))
        except (NmoeError, ValueError, RuntimeError) as err:
            # a task we cannot run (tensors that do not fit the model: torch raises ValueError or
            # RuntimeError), or a result we cannot send (e.g. training diverged to NaN): say why
            log.error("%s failed: %s", task.op.value, err)
            await self._refuse(bus, task_id, task.op, task.round, err, self._usage(bus, 0))

    def _remember(self, task_id: str, wire: Wire, keep: int = 2) -> None:
        self.answered[task_id] = wire
        while len(self.answered) > keep:
            self.answered.popitem(last=False)

    async def _refuse(self, bus: BusSession, task_id: str, op: Op, round_index: int, err: Exception,
                      usage: Usage | None = None) -> None:
        try:
            await self._send(bus, encode_reply(Refusal(str(err)), task_id, op, round_index, usage))
        except NmoeError as again:  # the broker is gone too: the coordinator records us as missing
            log.error("could not report the failure either: %s", again)
