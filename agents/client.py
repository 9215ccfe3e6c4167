"""The edge client agent: one process (or task) per client, on a laptop or a Raspberry Pi.

It loads only its own partition, announces itself to the coordinator, runs the tasks the
coordinator sends (the very ``execute`` the in-process pipeline calls), and serves its expert to
other clients' ``latent`` requests at any time. Training runs in a worker thread, so the event loop
keeps answering the bus while the CPU trains.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch

from broker.topics import Kind
from broker.wire import Message, MetaValue, Schema, TensorSpec
from nmoe.errors import BusError, NmoeError, WireError
from nmoe_models.config import ExperimentConfig
from nmoe_models.learner import ClientLearner
from nmoe_models.partition import load_client_data

from .bus import BusConfig, BusSession, RequestTimeout
from .codec import (
    BYE,
    COORDINATOR,
    ERROR,
    HELLO,
    OP,
    SAMPLES,
    SHUTDOWN,
    TASK,
    client_name,
    decode_task,
    reply_kind,
    reply_meta,
    to_numpy,
)
from .config import NetworkConfig
from .protocol import ExpertAnswer, execute

log = logging.getLogger(__name__)
T = TypeVar("T")
TASK_KINDS = (Kind.MODEL, Kind.CORR, Kind.CTRL)


async def in_thread(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


class BusPool:
    """Other clients' experts, reached by ``latent`` requests over the bus with a deadline."""

    def __init__(self, bus: BusSession, deadline_s: float, time_scale: float) -> None:
        self.bus = bus
        self.deadline_s = deadline_s
        self.time_scale = time_scale

    async def query(self, expert: int, latents: torch.Tensor) -> ExpertAnswer:
        t0 = time.perf_counter()
        try:
            reply = await self.bus.request(client_name(expert), Kind.LATENT, {"h": latents.contiguous().numpy()},
                                           deadline_s=self.deadline_s)
        except (RequestTimeout, BusError, WireError):  # no answer in time, or latents we could not send
            return ExpertAnswer(None, self.deadline_s / self.time_scale)
        wall = time.perf_counter() - t0
        logp = reply.tensors.get("logp")
        if logp is None or logp.shape[0] != latents.shape[0]:
            self.bus.stats.rejected["bad_reply"] += 1
            return ExpertAnswer(None, wall / self.time_scale)
        return ExpertAnswer(torch.from_numpy(logp), modeled_latency(reply, wall, self.time_scale))

    def wire_bytes(self) -> int:
        s = self.bus.stats
        return int(s.sent_bytes[Kind.LATENT.value] + s.received_bytes[Kind.LOGITS.value])


def modeled_latency(reply: Message, wall_s: float, time_scale: float) -> float:
    """Request-to-reply time in the run's clock: modeled seconds when the channel stamped both
    directions (request transit, reported back by the server, + service + reply transit)."""
    h = reply.header
    req = h.meta.get("req_transit_s")
    svc = h.meta.get("service_s")
    if h.t_model_send is None or h.t_model_arrive is None or not isinstance(req, float):
        return wall_s
    service = float(svc) / time_scale if isinstance(svc, float) else 0.0
    return req + service + (h.t_model_arrive - h.t_model_send)


class ClientAgent:
    def __init__(self, exp: ExperimentConfig, net: NetworkConfig, index: int, bus_cfg: BusConfig,
                 time_scale: float = 1.0) -> None:
        self.exp = exp
        self.net = net
        self.index = index
        self.bus_cfg = bus_cfg
        self.time_scale = time_scale
        self.learner: ClientLearner | None = None
        self.tasks_done = 0
        self.data_s = 0.0  # loading the partition and building the models

    def schemas(self) -> Mapping[Kind | str, Schema]:
        d, c = self.exp.model.latent_dim, self.learner.classes if self.learner else 10
        return {
            Kind.LATENT: Schema({"h": TensorSpec("float32", (None, d))}),
            Kind.LOGITS: Schema({"logp": TensorSpec("float32", (None, c))}),
        }

    async def run(self) -> None:
        """Load the partition, join, serve until the coordinator says shutdown."""
        clock = time.perf_counter()
        data = await asyncio.to_thread(load_client_data, self.exp, self.index)
        self.learner = await asyncio.to_thread(ClientLearner, self.exp, data)
        self.data_s = time.perf_counter() - clock
        queue: asyncio.Queue[Message | None] = asyncio.Queue()
        async with BusSession(self.bus_cfg, self.schemas()) as bus:
            worker = asyncio.create_task(self._work(bus, queue), name=f"{self.bus_cfg.agent_id}-worker")
            rejoin = asyncio.create_task(self._rejoin(bus), name=f"{self.bus_cfg.agent_id}-rejoin")
            try:
                await self._hello(bus)
                async for msg in bus.messages():
                    if worker.done():  # the worker must never end before shutdown: surface why it did
                        worker.result()
                        raise BusError("the task worker stopped")
                    if msg.kind is Kind.LATENT:
                        await self._serve(bus, msg)
                    elif msg.src == COORDINATOR and msg.kind in TASK_KINDS:
                        if msg.header.meta.get(OP) == SHUTDOWN:
                            await self._bye(bus, msg)
                            break
                        if msg.header.meta.get(OP) == HELLO:  # the coordinator asks us to announce again
                            await self._hello(bus)
                            continue
                        queue.put_nowait(msg)
                    else:
                        log.debug("ignoring %s from %s", msg.kind.value, msg.src)
            finally:
                queue.put_nowait(None)
                for task in (worker, rejoin):
                    task.cancel()
                await asyncio.gather(worker, rejoin, return_exceptions=True)

    async def _hello(self, bus: BusSession) -> None:
        assert self.learner is not None
        await bus.send(COORDINATOR, Kind.CTRL,
                       meta={OP: HELLO, SAMPLES: self.learner.data.num_train, "data_s": self.data_s})

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

    async def _bye(self, bus: BusSession, msg: Message) -> None:
        stats = bus.stats.as_dict()
        meta: dict[str, MetaValue] = {OP: BYE, TASK: str(msg.header.meta.get(TASK, ""))}
        for key in ("sent_bytes", "received_bytes", "sent_messages", "received_messages", "rejected"):
            for kind, value in stats[key].items():
                meta[f"{key}.{kind}"] = int(value)
        for key in ("duplicates", "late_replies", "reconnects", "compression_saved_bytes"):
            meta[key] = int(stats[key])
        await bus.send(COORDINATOR, Kind.METRICS, meta=meta)

    async def _serve(self, bus: BusSession, msg: Message) -> None:
        """Answer a latent request with this client's expert (once it is trained)."""
        learner = self.learner
        if learner is None or not learner.expert_ready:
            return  # no expert yet: the requester's deadline passes and it falls back
        t0 = time.perf_counter()
        logp = learner.expert_logprobs(torch.from_numpy(msg.tensors["h"]))
        if not bool(torch.isfinite(logp).all()):  # finite but absurd latents (e.g. 1e38) overflow the expert
            bus.stats.rejected["non_finite_answer"] += 1
            return
        meta: dict[str, float] = {"service_s": time.perf_counter() - t0}
        h = msg.header
        if h.t_model_send is not None and h.t_model_arrive is not None:
            meta["req_transit_s"] = h.t_model_arrive - h.t_model_send
        try:
            await bus.reply(msg, Kind.LOGITS, {"logp": logp.numpy()}, meta=meta)
        except NmoeError as err:  # the requester falls back at its deadline
            log.warning("could not answer %s's latent request: %s", msg.src, err)

    async def _work(self, bus: BusSession, queue: asyncio.Queue[Message | None]) -> None:
        """Run the coordinator's tasks one at a time, in arrival order."""
        assert self.learner is not None
        pool = BusPool(bus, self.net.inference_deadline_s * self.time_scale, self.time_scale)
        while (msg := await queue.get()) is not None:
            try:
                task_id, task = decode_task(msg)
            except WireError as err:
                bus.stats.rejected[err.reason] += 1
                continue
            log.info("task %s round %d", task.op.value, task.round)
            try:
                reply = await execute(self.learner, task, pool, in_thread)
                await bus.send(COORDINATOR, reply_kind(task.op), to_numpy(reply.tensors), round=task.round,
                               stage=task.op.value.split("_")[0], meta=reply_meta(task_id, reply))
                self.tasks_done += 1
            except (NmoeError, ValueError, KeyError, TypeError, AssertionError, RuntimeError) as err:
                # a task we cannot run, or a result we cannot send (e.g. training diverged to NaN): say why
                log.error("%s failed: %s", task.op.value, err)
                await self._report(bus, task.round, task_id, err)

    async def _report(self, bus: BusSession, round_index: int, task_id: str, err: Exception) -> None:
        try:
            await bus.send(COORDINATOR, Kind.METRICS, round=round_index, meta={TASK: task_id, ERROR: str(err)[:500]})
        except NmoeError as again:  # the broker is gone too: the coordinator records us as missing
            log.error("could not report the failure either: %s", again)
