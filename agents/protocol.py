"""The client side of the stage protocol, independent of transport.

``execute`` runs one task (``agents.messages``) on a ``ClientLearner`` and returns the reply. The
in-process fleet calls it directly; a networked client agent calls it when a task arrives on the
bus. Experts of other clients are reached through an ``ExpertPool``: direct calls in process,
routed ``latent`` requests over MQTT in a networked run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from nmoe.errors import TaskError
from nmoe_models.learner import ClientLearner
from nmoe_models.metrics import score
from nmoe_models.routing import RoutePlan, assemble, missing_rows, plan

from .compute import ComputeMeter
from .messages import (
    Correlation,
    Evaluate,
    Metrics,
    Reply,
    Stage1Corr,
    Stage1Fit,
    Stage2Fit,
    Stage3Fit,
    Stage3Prepare,
    Sync,
    Task,
    Update,
)

T = TypeVar("T")


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

    def would_miss(self, expert: int, rows: int) -> bool:
        """Whether a request of ``rows`` latents to ``expert`` is predicted to miss the inference
        deadline (deadline-aware routing); a pool that cannot tell says False."""
        ...


Blocking = Callable[[Callable[[], T]], Awaitable[T]]


async def run_inline(fn: Callable[[], T]) -> T:
    return fn()


async def execute(learner: ClientLearner, task: Task, pool: ExpertPool, blocking: Blocking[Any] = run_inline) -> Reply:
    """Run one task on client ``learner``; heavy work goes through ``blocking`` (e.g. to a thread).
    Raises TaskError (or the ValueError/RuntimeError of tensors that do not fit the model) when the
    task cannot run; the caller answers with a Refusal."""
    match task:
        case Sync(state=state, stage=stage):  # catch up: F, then the expert, then the experts' outputs
            learner.load_stage1(state)
            if stage >= 2 and not learner.stage2_done:
                await blocking(learner.stage2_fit)
            if stage >= 3 and learner.exp.stage3.rounds > 0 and learner.expert_outputs is None:
                await gather_expert_outputs(learner, pool)
            return Metrics()
        case Stage1Corr(round=r, state=state):
            learner.load_stage1(state)
            corr = await blocking(lambda: learner.stage1_corr(r))
            return Correlation(corr, samples=len(learner.ssl_images))
        case Stage1Fit(round=r, state=state, rbar=rbar, q=q):
            if rbar is None:  # FedSC's fit comes with Rbar: its global model came with this round's corr task
                learner.load_stage1(state)
            fit = await blocking(lambda: learner.stage1_fit(r, q, rbar))
            return Update(fit.state, fit.samples, fit.loss)
        case Stage2Fit(state=state, score_classifier=score_classifier):
            learner.load_stage1(state)
            metrics: dict[str, float] = {"loss": await blocking(learner.stage2_fit)}
            if score_classifier:  # after the fit, so the head runs on the latents Stage 2 computed
                s = await blocking(learner.classifier_scores)
                metrics |= {"classifier_accuracy": s.accuracy, "classifier_f1_macro": s.f1_macro}
            return Metrics(metrics, samples=len(learner.data.train_x))
        case Stage3Prepare():
            answered = await gather_expert_outputs(learner, pool)
            return Metrics({"experts_answered": float(answered)})
        case Stage3Fit(round=r, gate=gate, variant=variant, reset=reset):
            if learner.expert_outputs is None:
                raise TaskError("Stage 3 fit before Stage 3 preparation")
            if reset:
                learner.reset_gate()
            fit = await blocking(lambda: learner.stage3_fit(r, gate, variant))
            return Update(fit.state, fit.samples, fit.loss)
        case Evaluate(gate=gate, top_k=k, batch_size=batch_size):
            learner.load_gate(gate)
            return Metrics(await serverless_eval(learner, pool, k, batch_size, blocking))


async def gather_expert_outputs(learner: ClientLearner, pool: ExpertPool) -> int:
    """Stage 3: send the training latents to every expert once and cache the answers."""
    h = learner.train_latents
    if h is None:
        raise TaskError("Stage 3 before Stage 2 (no training latents on this client)")
    others = [j for j in range(learner.exp.clients) if j != learner.id]
    answers = await asyncio.gather(*(pool.query(j, h) for j in others))
    outputs = {learner.id: learner.expert_logprobs(h)}
    outputs |= {j: a.logprobs for j, a in zip(others, answers, strict=True) if a.logprobs is not None}
    learner.set_expert_outputs(outputs)
    return len(outputs)


def deadline_plan(logits: torch.Tensor, k: int, me: int, pool: ExpertPool) -> tuple[RoutePlan, int]:
    """Top-k routing where an expert predicted to miss the deadline is swapped for the next-best one
    by gate score (its own expert never misses: a row may end up served locally). Returns the plan
    and how many experts were swapped out. Repeats until no chosen expert is predicted to miss
    (a swap moves rows, and so changes the other requests' sizes)."""
    masked = logits.clone()
    route = plan(masked, k)
    dropped = 0
    while late := [j for j, rows in route.rows.items() if j != me and pool.would_miss(j, len(rows))]:
        masked[:, late] = float("-inf")
        dropped += len(late)
        route = plan(masked, min(k, int(torch.isfinite(masked[0]).sum())))
    return route, dropped


def local_compute_s(blocking: Blocking[Any]) -> float:
    """Modeled seconds of the current task's own compute so far (0 when no device is modeled)."""
    return blocking.task_compute_s if isinstance(blocking, ComputeMeter) else 0.0


async def serverless_eval(learner: ClientLearner, pool: ExpertPool, k: int, batch_size: int,
                          blocking: Blocking[Any] = run_inline) -> dict[str, float]:
    """Top-k (or deadline-aware) inference over the local test set, routing latents to the chosen
    experts. Heavy work goes through ``blocking`` (with a modeled device, it lasts as long as the
    device would take, and its modeled time joins each batch's latency)."""
    h_all = learner.test_latents
    if h_all is None:
        raise TaskError("evaluation before Stage 2 (no test latents on this client)")
    # route only to experts that answered in Stage 3 (a client gone since then is not chosen at all)
    available = learner.available
    if available is None:
        available = torch.ones(learner.exp.clients, dtype=torch.bool)
    alive = torch.where(available, 0.0, float("-inf"))
    k = min(k, int(available.sum()))
    preds, latencies = [], []
    fallback = local_only = swapped = 0
    per_expert = [0] * learner.exp.clients  # rows routed to each expert (the dashboard's routing matrix)
    deadline = learner.exp.eval.routing == "deadline"
    wire = pool.wire_bytes()
    t0 = time.perf_counter()
    for start in range(0, len(h_all), batch_size):
        h = h_all[start : start + batch_size]
        local_s = local_compute_s(blocking)
        logits = await blocking(partial(learner.gate_logits, h)) + alive
        if deadline:
            route, dropped = deadline_plan(logits, k, learner.id, pool)
            swapped += dropped
        else:
            route = plan(logits, k)
        replies: dict[int, torch.Tensor] = {}
        if learner.id in route.rows:
            replies[learner.id] = await blocking(partial(learner.expert_logprobs, h[route.rows[learner.id]]))
        remote = [j for j in route.rows if j != learner.id]
        answers = await asyncio.gather(*(pool.query(j, h[route.rows[j]]) for j in remote))
        for j, a in zip(remote, answers, strict=True):
            if a.logprobs is not None:
                replies[j] = a.logprobs
        miss = missing_rows(route, replies)
        local = await blocking(partial(learner.expert_logprobs, h)) if bool(miss.any()) else None
        latencies.append(local_compute_s(blocking) - local_s + max((a.latency_s for a in answers), default=0.0))
        out = assemble(route, replies, local, learner.exp.eval.combine)
        preds.append(out.probs.argmax(1))
        fallback += out.fallback_rows
        local_only += out.local_only_rows
        for j, rows in route.rows.items():
            per_expert[j] += len(rows)
    s = score(torch.cat(preds), learner.data.test_y, learner.classes)
    n = max(len(h_all), 1)
    wire = pool.wire_bytes() - wire
    routed = sum(per_expert)
    remote_rows = routed - per_expert[learner.id]
    lat = np.asarray(latencies) * 1000.0
    return {
        "accuracy": s.accuracy,
        "f1_macro": s.f1_macro,
        "test_samples": float(s.samples),
        "fallback_rate": fallback / n,
        "local_fallback_rate": local_only / n,
        "local_share": per_expert[learner.id] / max(routed, 1),
        "swapped_experts": float(swapped),
        "bytes_per_sample": wire / n,
        # what top-k costs on the air in any fleet (in process too, where nothing crosses a wire): each
        # row sent to another client's expert carries its latent (d floats) and comes back as C log-probs
        "remote_rows_per_sample": remote_rows / n,
        "payload_bytes_per_sample": remote_rows * (h_all.shape[1] + learner.classes) * 4 / n,
        "latency_p50_ms": float(np.percentile(lat, 50)),
        "latency_p95_ms": float(np.percentile(lat, 95)),
        "latency_p99_ms": float(np.percentile(lat, 99)),
        "eval_wall_s": time.perf_counter() - t0,
        **routing_shares(per_expert, routed),
    }


ROUTED_KEEP = 64  # experts reported per client: a metrics message's meta is bounded (8 KiB)


def routing_shares(per_expert: list[int], routed: int) -> dict[str, float]:
    """``routed.<j>``: the share of this client's routed rows that went to expert j (a row of the
    routing matrix), for the ``ROUTED_KEEP`` experts that got the most; experts with none are left out."""
    top = sorted((j for j, n in enumerate(per_expert) if n), key=lambda j: -per_expert[j])[:ROUTED_KEEP]
    return {f"routed.{j}": round(per_expert[j] / max(routed, 1), 4) for j in sorted(top)}
