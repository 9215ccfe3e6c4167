"""The stage protocol between the coordinator and the clients, independent of transport.

A ``Task`` is what the coordinator asks of the clients in one step of one round; a ``Reply`` is
what a client answers. ``execute`` is the client side: it runs a task on a ``ClientLearner``. The
in-process pipeline calls it directly; a networked client agent calls it when a task arrives on
the bus. Experts of other clients are reached through an ``ExpertPool``: direct calls in
process, routed ``latent`` requests over MQTT in a networked run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from nmoe_models.learner import ClientLearner
from nmoe_models.metrics import score
from nmoe_models.routing import assemble, missing_rows, plan

T = TypeVar("T")
Meta = Mapping[str, Any]
Tensors = Mapping[str, torch.Tensor]


class Op(str, Enum):
    SYNC = "sync"  # load the current global feature extractor (a client joining late or again)
    STAGE1_CORR = "stage1_corr"  # FedSC: load the global model, answer R_i
    STAGE1_FIT = "stage1_fit"  # local Stage 1 training from the global model (FedCE) or with Rbar_{-i} (FedSC)
    STAGE2_FIT = "stage2_fit"  # load the final F, score the FedCE classifier, train the expert
    STAGE3_PREPARE = "stage3_prepare"  # ask every expert for its outputs on the local training latents
    STAGE3_FIT = "stage3_fit"  # load the global gate part, train the gate locally
    EVALUATE = "evaluate"  # load the final gate part, serverless top-k inference on the test set


@dataclass(frozen=True)
class Part:
    """What one client receives: tensors plus small scalar settings."""

    tensors: Tensors = field(default_factory=dict)
    meta: Meta = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    op: Op
    round: int = -1
    common: Part = field(default_factory=Part)
    """Sent to every client (one broadcast)."""
    personal: Mapping[int, Part] = field(default_factory=dict)
    """Client-specific parts (e.g. FedSC's Rbar_{-i}); when set, each client gets a unicast."""
    expect: Mapping[str, tuple[tuple[int, ...], torch.dtype]] = field(default_factory=dict)
    """Tensors every reply must carry: name -> (shape, dtype); a reply that does not is rejected."""
    sample_limit: int = 0
    """Largest FedAvg weight (sample count) a reply may claim; 0 for tasks that do not weigh."""

    def part_for(self, client: int) -> Part:
        own = self.personal.get(client)
        if own is None:
            return self.common
        return Part({**self.common.tensors, **own.tensors}, {**self.common.meta, **own.meta})


@dataclass(frozen=True)
class Reply:
    client: int
    tensors: Tensors = field(default_factory=dict)
    samples: int = 0
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ExpertAnswer:
    logprobs: torch.Tensor | None
    """(B, C) log-probabilities, or None when the expert did not answer in time."""
    latency_s: float = 0.0
    """Request-to-reply time (modeled seconds when a channel is emulated)."""


class ExpertPool(Protocol):
    async def query(self, expert: int, latents: torch.Tensor) -> ExpertAnswer: ...

    def wire_bytes(self) -> int:
        """Bytes this client has put on and taken off the wire as a requester, so far."""
        ...


Blocking = Callable[[Callable[[], T]], Awaitable[T]]


async def run_inline(fn: Callable[[], T]) -> T:
    return fn()


async def execute(learner: ClientLearner, task: Task, pool: ExpertPool, blocking: Blocking[Any] = run_inline) -> Reply:
    """Run one task on client ``learner``; heavy work goes through ``blocking`` (e.g. to a thread)."""
    part = task.part_for(learner.id)
    meta, tensors = part.meta, part.tensors
    me = learner.id
    if task.op is Op.SYNC:  # catch up with a run in progress: F, then the expert, then the experts' outputs
        learner.load_stage1(tensors)
        stage = int(meta.get("stage", 1))
        if stage >= 2 and learner.train_latents is None:
            await blocking(learner.stage2_fit)
        if stage >= 3 and learner.expert_outputs is None:
            await gather_expert_outputs(learner, pool)
        return Reply(me)
    if task.op is Op.STAGE1_CORR:
        learner.load_stage1(tensors)
        r = await blocking(lambda: learner.stage1_corr(task.round))
        return Reply(me, {"R": r}, samples=len(learner.ssl_images))
    if task.op is Op.STAGE1_FIT:
        rbar = tensors.get("rbar")  # FedSC: the global model came with this round's corr task
        if rbar is None:
            learner.load_stage1(tensors)
        q = float(meta.get("q", 1.0))
        fit = await blocking(lambda: learner.stage1_fit(task.round, q, rbar))
        return Reply(me, fit.state, fit.samples, {"loss": fit.loss})
    if task.op is Op.STAGE2_FIT:
        learner.load_stage1(tensors)
        metrics: dict[str, float] = {}
        if meta.get("score_classifier"):
            s = await blocking(learner.classifier_scores)
            metrics |= {"classifier_accuracy": s.accuracy, "classifier_f1_macro": s.f1_macro}
        metrics["loss"] = await blocking(learner.stage2_fit)
        return Reply(me, samples=len(learner.data.train_x), metrics=metrics)
    if task.op is Op.STAGE3_PREPARE:
        answered = await gather_expert_outputs(learner, pool)
        return Reply(me, metrics={"experts_answered": float(answered)})
    if task.op is Op.STAGE3_FIT:
        variant = str(meta["variant"])
        if meta.get("reset"):
            learner.reset_gate()
        fit = await blocking(lambda: learner.stage3_fit(task.round, tensors, variant))
        return Reply(me, fit.state, fit.samples, {"loss": fit.loss})
    if task.op is Op.EVALUATE:
        learner.load_gate(tensors)
        return Reply(me, metrics=await serverless_eval(learner, pool, int(meta["top_k"]), int(meta["batch_size"])))
    raise ValueError(f"unknown task op {task.op!r}")


async def gather_expert_outputs(learner: ClientLearner, pool: ExpertPool) -> int:
    """Stage 3: send the training latents to every expert once and cache the answers."""
    h = learner.train_latents
    assert h is not None, "Stage 2 must run before Stage 3"
    others = [j for j in range(learner.exp.clients) if j != learner.id]
    answers = await asyncio.gather(*(pool.query(j, h) for j in others))
    outputs = {learner.id: learner.expert_logprobs(h)}
    outputs |= {j: a.logprobs for j, a in zip(others, answers, strict=True) if a.logprobs is not None}
    learner.set_expert_outputs(outputs)
    return len(outputs)


async def serverless_eval(learner: ClientLearner, pool: ExpertPool, k: int, batch_size: int) -> dict[str, float]:
    """Top-k inference over the local test set, routing latents to the chosen experts."""
    h_all = learner.test_latents
    assert h_all is not None, "Stage 2 must run before evaluation"
    # route only to experts that answered in Stage 3 (a client gone since then is not chosen at all)
    available = learner.available
    if available is None:
        available = torch.ones(learner.exp.clients, dtype=torch.bool)
    alive = torch.where(available, 0.0, float("-inf"))
    k = min(k, int(available.sum()))
    preds, latencies = [], []
    fallback = local_only = routed = served_locally = 0
    wire = pool.wire_bytes()
    t0 = time.perf_counter()
    for start in range(0, len(h_all), batch_size):
        h = h_all[start : start + batch_size]
        route = plan(learner.gate_logits(h) + alive, k)
        replies: dict[int, torch.Tensor] = {}
        if learner.id in route.rows:
            replies[learner.id] = learner.expert_logprobs(h[route.rows[learner.id]])
        remote = [j for j in route.rows if j != learner.id]
        answers = await asyncio.gather(*(pool.query(j, h[route.rows[j]]) for j in remote))
        for j, a in zip(remote, answers, strict=True):
            if a.logprobs is not None:
                replies[j] = a.logprobs
        latencies.append(max((a.latency_s for a in answers), default=0.0))
        miss = missing_rows(route, replies)
        local = learner.expert_logprobs(h) if bool(miss.any()) else None
        out = assemble(route, replies, local, learner.exp.eval.combine)
        preds.append(out.probs.argmax(1))
        fallback += out.fallback_rows
        local_only += out.local_only_rows
        routed += sum(len(r) for r in route.rows.values())
        served_locally += len(route.rows.get(learner.id, ()))
    s = score(torch.cat(preds), learner.data.test_y, learner.classes)
    n = max(len(h_all), 1)
    wire = pool.wire_bytes() - wire
    lat = np.asarray(latencies) * 1000.0
    return {
        "accuracy": s.accuracy,
        "f1_macro": s.f1_macro,
        "test_samples": float(s.samples),
        "fallback_rate": fallback / n,
        "local_fallback_rate": local_only / n,
        "local_share": served_locally / max(routed, 1),
        "bytes_per_sample": wire / n,
        "latency_p50_ms": float(np.percentile(lat, 50)),
        "latency_p95_ms": float(np.percentile(lat, 95)),
        "latency_p99_ms": float(np.percentile(lat, 99)),
        "eval_wall_s": time.perf_counter() - t0,
    }


def expect_like(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """What a reply updating ``state`` must carry: the same names, shapes and dtypes."""
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def check_reply(task: Task, reply: Reply) -> None:
    """Refuse a reply that does not carry what the task asked for (raises ValueError naming it)."""
    for name, (shape, dtype) in task.expect.items():
        t = reply.tensors.get(name)
        if t is None:
            raise ValueError(f"missing tensor '{name}'")
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"tensor '{name}' has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if t.dtype != dtype:
            raise ValueError(f"tensor '{name}' is {t.dtype}, expected {dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"tensor '{name}' is not finite")
    extra = set(reply.tensors) - set(task.expect)
    if extra:
        raise ValueError(f"unexpected tensors {sorted(extra)[:3]}")
    if task.sample_limit and not 1 <= reply.samples <= task.sample_limit:
        raise ValueError(f"claims {reply.samples} samples, allowed 1..{task.sample_limit}")
