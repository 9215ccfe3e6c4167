"""The coordinator's side of the method: what each stage and round does, over any ``Fleet``.

Like Flower's Strategy, this decides what a round does and leaves the arithmetic to pure functions
(nmoe_models.fedavg, nmoe_models.fedsc) and the transport to the fleet: ``InProcessFleet`` calls
the clients directly, the networked fleet talks to client agents over MQTT. Failures are data: a
round goes on with the clients that answered (at least ``min_clients``) and records the rest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from nmoe.errors import NmoeError
from nmoe_models.config import ExperimentConfig
from nmoe_models.fedavg import StateDict, fedavg, select, with_prefix
from nmoe_models.fedsc import q_weights, rbar_minus, scheduled_q
from nmoe_models.learner import build_gate, build_stage1_model, stage1_shared_keys
from nmoe_models.moe import SHARED_GATE_PREFIX
from nmoe_models.privacy import epsilon

from .protocol import Op, Part, Reply, Task, expect_like


@dataclass(frozen=True)
class RoundOutcome:
    replies: dict[int, Reply]
    failures: dict[int, str] = field(default_factory=dict)
    """client -> why it is missing: 'late', 'missing', 'rejected: <reason>', 'offline', 'error: ...'."""


class Fleet(Protocol):
    @property
    def clients(self) -> Sequence[int]:
        """The scenario's clients (those a broadcast task goes to)."""
        ...

    async def run(self, task: Task) -> RoundOutcome:
        """Deliver ``task`` (to every client, or to those in task.personal), collect the replies
        until all answered or the deadline of this kind of task passed."""
        ...


@dataclass(frozen=True)
class RoundRecord:
    stage: str
    round: int
    op: str
    answered: tuple[int, ...]
    failures: Mapping[int, str]
    loss: float
    seconds: float


class Observer(Protocol):
    def on_stage(self, stage: str, rounds: int) -> None: ...

    def on_round(self, record: RoundRecord) -> None: ...

    def on_checkpoint(self, stage: str, round_index: int, tensors: Mapping[str, torch.Tensor],
                      meta: Mapping[str, str]) -> None: ...


class NullObserver:
    def on_stage(self, stage: str, rounds: int) -> None:
        pass

    def on_round(self, record: RoundRecord) -> None:
        pass

    def on_checkpoint(self, stage: str, round_index: int, tensors: Mapping[str, torch.Tensor],
                      meta: Mapping[str, str]) -> None:
        pass


@dataclass
class Outcome:
    """Per method: client -> metrics (accuracy, f1_macro, and inference figures for NMoE)."""

    methods: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    rounds: list[RoundRecord] = field(default_factory=list)
    privacy: dict[str, float] = field(default_factory=dict)


class RoundFailed(NmoeError):
    """Too few clients answered a round."""


class Strategy:
    """Runs Stage 1 (FedCE or FedSC), Stage 2, Stage 3 (one or more gate variants) and evaluation."""

    def __init__(self, exp: ExperimentConfig, observer: Observer | None = None, min_clients: int = 1) -> None:
        self.exp = exp
        self.obs = observer or NullObserver()
        self.min_clients = min_clients
        model = build_stage1_model(exp)
        keys = set(stage1_shared_keys(exp, model))
        self.global_stage1: StateDict = select(model.state_dict(), lambda k: k in keys)
        self.corrs: dict[int, torch.Tensor] = {}
        self.samples: dict[int, int] = {}
        self.releases: dict[int, int] = {}
        self.stage = "join"
        self.outcome = Outcome()

    def sync_task(self) -> Task:
        """What a client joining mid-run needs: the current feature extractor and stage."""
        stage_no = {"stage2": 2, "stage3": 3, "eval": 3}.get(self.stage, 1)
        return Task(Op.SYNC, common=Part(self.global_stage1, {"stage": stage_no}))

    async def run(self, fleet: Fleet) -> Outcome:
        clock = time.perf_counter()
        await self.stage1(fleet)
        self.outcome.stage_seconds["stage1"] = time.perf_counter() - clock
        clock = time.perf_counter()
        classifier = await self.stage2(fleet)
        if classifier:
            self.outcome.methods["fedavg"] = classifier
        self.outcome.stage_seconds["stage2"] = time.perf_counter() - clock
        clock = time.perf_counter()
        await self._step(fleet, Task(Op.STAGE3_PREPARE), "stage3")
        self.outcome.stage_seconds["stage3_prepare"] = time.perf_counter() - clock
        for variant in self.gate_variants():
            clock = time.perf_counter()
            gate = await self.stage3(fleet, variant)
            self.outcome.stage_seconds[f"stage3_{variant}"] = time.perf_counter() - clock
            clock = time.perf_counter()
            name = "nmoe" if variant == self.exp.stage3.method else "nmoe_fedavg_gate"
            self.outcome.methods[name] = await self.evaluate(fleet, gate)
            self.outcome.stage_seconds[f"eval_{variant}"] = time.perf_counter() - clock
        self.stage = "done"
        return self.outcome

    def gate_variants(self) -> list[str]:
        variants: list[str] = [self.exp.stage3.method]
        if "fedavg_gate" in self.exp.baselines and self.exp.stage3.method != "fedavg":
            variants.append("fedavg")
        return variants

    # -- stages -------------------------------------------------------------------------------------
    async def stage1(self, fleet: Fleet) -> None:
        s1 = self.exp.stage1
        self.stage = "stage1"
        self.obs.on_stage("stage1", s1.rounds)
        limit = self.exp.partition.train_per_client + self.exp.partition.unlabeled_per_client
        fit_expect = expect_like(self.global_stage1)
        d = self.exp.model.latent_dim
        for r in range(s1.rounds):
            if s1.method == "fedsc":
                corr_task = Task(Op.STAGE1_CORR, r, Part(self.global_stage1), expect={"R": ((d, d), torch.float32)},
                                 sample_limit=limit)
                corr = await self._step(fleet, corr_task, "stage1")
                for i in sorted(corr.replies):
                    self.corrs[i], self.samples[i] = corr.replies[i].tensors["R"], corr.replies[i].samples
                for i in sorted({*corr.replies, *corr.failures} - {i for i, why in corr.failures.items()
                                                                   if why == "never joined"}):
                    # asked for R_i: count the release even if the answer was lost or late (conservative)
                    self.releases[i] = self.releases.get(i, 0) + 1
                q = self._q(r)
                rbars = rbar_minus(self.corrs, q)
                personal = {
                    i: Part({"rbar": rbars[i]} if i in rbars else {}, {"q": q[i]}) for i in sorted(corr.replies)
                }
                task = Task(Op.STAGE1_FIT, r, personal=personal, expect=fit_expect, sample_limit=limit)
            else:
                task = Task(Op.STAGE1_FIT, r, Part(self.global_stage1), expect=fit_expect, sample_limit=limit)
            fit = await self._step(fleet, task, "stage1")
            self.global_stage1 = aggregate(fit.replies)
            self._checkpoint("stage1", r, self.global_stage1)
        if s1.method == "fedsc" and self.exp.privacy.enabled and self.releases:
            p = self.exp.privacy
            worst = max(self.releases.values())
            self.outcome.privacy = {
                "epsilon": epsilon(p.noise_multiplier, worst, p.delta),
                "delta": p.delta,
                "noise_multiplier": p.noise_multiplier,
                "releases": float(worst),
            }

    def _q(self, round_index: int) -> dict[int, float]:
        fedsc = self.exp.stage1.fedsc
        if fedsc.q == "schedule":
            value = scheduled_q(round_index, self.exp.stage1.rounds, fedsc.q_final)
            return {i: value for i in self.samples}
        return q_weights(self.samples)

    async def stage2(self, fleet: Fleet) -> dict[int, dict[str, float]]:
        """Experts: every client loads the final F and trains H_i; FedCE also scores its classifier."""
        self.stage = "stage2"
        self.obs.on_stage("stage2", 1)
        fedce = self.exp.stage1.method == "fedce"
        out = await self._step(fleet, Task(Op.STAGE2_FIT, 0, Part(self.global_stage1, {"score_classifier": fedce})),
                               "stage2")
        if not fedce:
            return {}
        scores = {}
        for i in sorted(out.replies):
            m = out.replies[i].metrics
            acc, f1 = m.get("classifier_accuracy"), m.get("classifier_f1_macro")
            if acc is None or f1 is None or not (0 <= acc <= 1 and 0 <= f1 <= 1):
                out.failures[i] = "rejected: no valid classifier scores"
                continue
            scores[i] = {"accuracy": acc, "f1_macro": f1}
        return scores

    async def stage3(self, fleet: Fleet, variant: str) -> StateDict:
        s3 = self.exp.stage3
        self.stage = "stage3"
        self.obs.on_stage(f"stage3:{variant}", s3.rounds)
        init = build_gate(self.exp, -1).state_dict()  # one common starting point for the shared part
        gate = select(init, with_prefix(SHARED_GATE_PREFIX) if variant == "fedgate" else None)
        expect = expect_like(gate)
        for r in range(s3.rounds):
            task = Task(Op.STAGE3_FIT, r, Part(gate, {"variant": variant, "reset": r == 0}), expect=expect,
                        sample_limit=self.exp.partition.train_per_client)
            fit = await self._step(fleet, task, f"stage3:{variant}")
            gate = aggregate(fit.replies)
            self._checkpoint(f"stage3:{variant}", r, gate)
        return gate

    async def evaluate(self, fleet: Fleet, gate: StateDict) -> dict[int, dict[str, float]]:
        self.stage = "eval"
        ev = self.exp.eval
        task = Task(Op.EVALUATE, 0, Part(gate, {"top_k": ev.top_k, "batch_size": ev.batch_size}))
        out = await self._step(fleet, task, "eval")
        return {i: dict(rep.metrics) for i, rep in sorted(out.replies.items())}

    def _checkpoint(self, stage: str, round_index: int, global_state: Mapping[str, torch.Tensor]) -> None:
        """The coordinator's state after a round: the global part being trained (``global.*``),
        the final feature extractor once Stage 1 is over (``stage1.*``), FedSC's latest R_j
        (``corr.<j>``), and per-client sample counts and DP releases in the metadata."""
        tensors = {f"global.{k}": v for k, v in global_state.items()}
        if stage != "stage1":
            tensors |= {f"stage1.{k}": v for k, v in self.global_stage1.items()}
        tensors |= {f"corr.{j}": r for j, r in sorted(self.corrs.items())}
        meta = {"stage": stage, "round": str(round_index), "samples": json.dumps(self.samples, sort_keys=True),
                "releases": json.dumps(self.releases, sort_keys=True)}
        self.obs.on_checkpoint(stage, round_index, tensors, meta)

    async def _step(self, fleet: Fleet, task: Task, stage: str) -> RoundOutcome:
        clock = time.perf_counter()
        out = await fleet.run(task)
        losses = [out.replies[i].metrics["loss"] for i in sorted(out.replies) if "loss" in out.replies[i].metrics]
        # the failures dict is the fleet's own: a straggler answering later turns 'missing' into 'late'
        record = RoundRecord(stage, task.round, task.op.value, tuple(sorted(out.replies)), out.failures,
                             sum(losses) / len(losses) if losses else float("nan"), time.perf_counter() - clock)
        self.outcome.rounds.append(record)
        self.obs.on_round(record)
        if len(out.replies) < self.min_clients:
            missing = ", ".join(f"client-{i} ({why})" for i, why in sorted(out.failures.items())) or "none"
            raise RoundFailed(
                f"{stage} round {task.round} ({task.op.value}): only {len(out.replies)} client(s) answered, "
                f"min_clients is {self.min_clients}; failures: {missing}"
            )
        return out


def aggregate(replies: Mapping[int, Reply]) -> StateDict:
    """FedAvg of the replies' tensors, weighted by sample counts, in client-id order."""
    order = sorted(replies)
    return fedavg([replies[i].tensors for i in order], [replies[i].samples for i in order])
