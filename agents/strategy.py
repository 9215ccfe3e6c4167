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
from types import MappingProxyType
from typing import Any, Protocol

import torch

from nmoe.errors import NmoeError
from nmoe_models.config import ExperimentConfig
from nmoe_models.fedavg import StateDict, fedavg, select, with_prefix
from nmoe_models.fedsc import q_weights, rbar_minus, scheduled_q
from nmoe_models.learner import build_gate, build_stage1_model, stage1_shared_keys
from nmoe_models.moe import SHARED_GATE_PREFIX
from nmoe_models.privacy import epsilon
from nmoe_models.robust import coordinate_median, norm_bounded_fedavg, screen, trimmed_mean

from .messages import (
    Correlation,
    Evaluate,
    GateVariant,
    Metrics,
    Op,
    Reply,
    ReplySpec,
    Stage,
    Stage1Corr,
    Stage1Fit,
    Stage2Fit,
    Stage3Fit,
    Stage3Prepare,
    Sync,
    Task,
    Update,
    expect_like,
    reply_loss,
)
from .rounds import RoundOutcome, Step


class Fleet(Protocol):
    @property
    def clients(self) -> Sequence[int]:
        """The scenario's clients (those a common task goes to)."""
        ...

    async def run(self, step: Step) -> RoundOutcome:
        """Deliver the step's task(s), collect the replies until every target answered or the
        deadline of this kind of task passed."""
        ...


@dataclass(frozen=True)
class RoundRecord:
    stage: str
    """Display label: the stage, with the gate variant in Stage 3 (``stage3:fedgate``)."""
    round: int
    op: Op
    answered: tuple[int, ...]
    failures: Mapping[int, str]
    """An immutable copy (see RoundOutcome); a late answer is reported apart, as an event."""
    loss: float
    seconds: float
    modeled_s: float | None = None
    """The step's duration on the modeled clock (RoundOutcome.modeled_s)."""


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


@dataclass(frozen=True)
class CurvePoint:
    """One evaluation of the NMoE during Stage 3 (``eval.every_round``): after ``round`` of
    ``stage``, when the run had trained for ``modeled_s`` seconds on the modeled clock."""

    stage: str
    round: int
    modeled_s: float
    per_client: Mapping[int, Mapping[str, float]]


@dataclass
class RunSummary:
    """Per method: client -> metrics (accuracy, f1_macro, and inference figures for NMoE)."""

    methods: dict[str, dict[int, dict[str, float]]] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    rounds: list[RoundRecord] = field(default_factory=list)
    privacy: dict[str, float] = field(default_factory=dict)
    curve: list[CurvePoint] = field(default_factory=list)

    def training_modeled_s(self) -> float:
        """The modeled clock: the modeled durations of every training step so far (evaluations,
        the curve's included, are not training time; a step a fleet could not time counts 0)."""
        return sum(r.modeled_s or 0.0 for r in self.rounds if r.op is not Op.EVALUATE)


class StageStore(Protocol):
    """Somewhere a finished stage can be kept and brought back (the in-process stage cache)."""

    def restore(self, stage: Stage, strategy: Strategy) -> bool:
        """Bring ``stage``'s results back into ``strategy`` (and its clients); False when there are none."""
        ...

    def save(self, stage: Stage, strategy: Strategy, records: list[RoundRecord]) -> None: ...


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
        self.stage = Stage.JOIN
        self.summary = RunSummary()
        self._stage1_from = 0  # the first Stage 1 round to run (later when resuming)

    def sync_task(self) -> Sync | None:
        """What a client joining mid-run needs (the current feature extractor and how far to catch
        up), or None while the run is still joining."""
        if self.stage is Stage.JOIN:
            return None
        stage_no = {Stage.STAGE2: 2, Stage.STAGE3: 3, Stage.EVAL: 3, Stage.DONE: 3}.get(self.stage, 1)
        return Sync(self.global_stage1, stage_no)

    async def run(self, fleet: Fleet, store: StageStore | None = None, until: Stage = Stage.DONE) -> RunSummary:
        """Every stage (or up to and including ``until``: Stage 2 for the FedAvg baseline); Stage 1 and 2
        are brought back from ``store`` when it has them (and kept there)."""
        clock = time.perf_counter()
        if store is None or not store.restore(Stage.STAGE1, self):
            first = len(self.summary.rounds)
            await self.stage1(fleet)
            if store is not None:
                store.save(Stage.STAGE1, self, self.summary.rounds[first:])
        self.summary.stage_seconds["stage1"] = time.perf_counter() - clock
        clock = time.perf_counter()
        if store is None or not store.restore(Stage.STAGE2, self):
            first = len(self.summary.rounds)
            classifier = await self.stage2(fleet)
            if classifier:
                self.summary.methods["fedavg"] = classifier
            if store is not None:
                store.save(Stage.STAGE2, self, self.summary.rounds[first:])
        self.summary.stage_seconds["stage2"] = time.perf_counter() - clock
        if until is Stage.STAGE2:
            return self.summary
        clock = time.perf_counter()
        if self.exp.stage3.rounds > 0:  # the experts' outputs on the training latents train the gate
            await self._step(fleet, Step(ReplySpec(Metrics), Stage3Prepare()))
        self.summary.stage_seconds["stage3_prepare"] = time.perf_counter() - clock
        for variant in self.gate_variants():
            clock = time.perf_counter()
            gate = await self.stage3(fleet, variant)
            self.summary.stage_seconds[f"stage3_{variant}"] = time.perf_counter() - clock
            clock = time.perf_counter()
            name = "nmoe" if variant == self.exp.stage3.method else "nmoe_fedavg_gate"
            self.summary.methods[name] = await self.evaluate(fleet, gate)
            if name == "nmoe" and self.exp.eval.every_round:  # the final evaluation is the curve's last point
                self.summary.curve.append(CurvePoint(f"{Stage.STAGE3.value}:{variant}", self.exp.stage3.rounds - 1,
                                                     self.summary.training_modeled_s(), self.summary.methods[name]))
            self.summary.stage_seconds[f"eval_{variant}"] = time.perf_counter() - clock
        self.stage = Stage.DONE
        return self.summary

    def gate_variants(self) -> list[GateVariant]:
        variants: list[GateVariant] = [self.exp.stage3.method]
        if "fedavg_gate" in self.exp.baselines and self.exp.stage3.method != "fedavg":
            variants.append("fedavg")
        return variants

    # -- stages -------------------------------------------------------------------------------------
    async def stage1(self, fleet: Fleet) -> None:
        s1 = self.exp.stage1
        self.stage = Stage.STAGE1
        self.obs.on_stage(Stage.STAGE1.value, s1.rounds)
        limit = self.exp.partition.train_per_client + self.exp.partition.unlabeled_per_client
        fit_spec = ReplySpec(Update, expect_like(self.global_stage1), limit)
        d = self.exp.model.latent_dim
        for r in range(self._stage1_from, s1.rounds):
            step: Step
            if s1.method == "fedsc":
                corr_spec = ReplySpec(Correlation, {"R": ((d, d), torch.float32)}, limit)
                corr = await self._step(fleet, Step(corr_spec, Stage1Corr(r, self.global_stage1)))
                for i, reply in corr.replies.items():
                    assert isinstance(reply, Correlation)  # the spec's kind
                    self.corrs[i], self.samples[i] = reply.r, reply.samples
                for i in sorted({*corr.replies, *(i for i, why in corr.failures.items() if why != "never joined")}):
                    # asked for R_i: count the release even if the answer was lost or late (conservative)
                    self.releases[i] = self.releases.get(i, 0) + 1
                q = self._q(r)
                rbars = rbar_minus(self.corrs, q)
                personal: dict[int, Task] = {i: Stage1Fit(r, rbar=rbars.get(i), q=q[i]) for i in sorted(corr.replies)}
                step = Step(fit_spec, personal=personal, reference=self.global_stage1)
            else:
                step = Step(fit_spec, Stage1Fit(r, self.global_stage1), reference=self.global_stage1)
            fit = await self._step(fleet, step)
            self.global_stage1 = self._aggregate(fit.replies, self.global_stage1)
            self._checkpoint(Stage.STAGE1.value, r, self.global_stage1)
        self._account_privacy()

    def _account_privacy(self) -> None:
        if self.exp.stage1.method == "fedsc" and self.exp.privacy.enabled and self.releases:
            p = self.exp.privacy
            worst = max(self.releases.values())
            self.summary.privacy = {
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
        """Experts: every client loads the final F and trains H_i; FedCE also scores its classifier
        (a reply without valid scores is rejected like any reply that is not what was asked)."""
        self.stage = Stage.STAGE2
        self.obs.on_stage(Stage.STAGE2.value, 1)
        fedce = self.exp.stage1.method == "fedce"
        scores = {"classifier_accuracy": (0.0, 1.0), "classifier_f1_macro": (0.0, 1.0)} if fedce else {}
        spec = ReplySpec(Metrics, metrics=scores)
        out = await self._step(fleet, Step(spec, Stage2Fit(self.global_stage1, score_classifier=fedce)))
        if not fedce:
            return {}
        per_client = {}
        for i, reply in out.replies.items():
            assert isinstance(reply, Metrics)  # the spec's kind
            m = reply.values
            per_client[i] = {"accuracy": m["classifier_accuracy"], "f1_macro": m["classifier_f1_macro"]}
        return per_client

    async def stage3(self, fleet: Fleet, variant: GateVariant) -> StateDict:
        s3 = self.exp.stage3
        self.stage = Stage.STAGE3
        label = f"{Stage.STAGE3.value}:{variant}"
        self.obs.on_stage(label, s3.rounds)
        init = build_gate(self.exp, -1).state_dict()  # one common starting point for the shared part
        gate = select(init, with_prefix(SHARED_GATE_PREFIX) if variant == "fedgate" else None)
        spec = ReplySpec(Update, expect_like(gate), self.exp.partition.train_per_client)
        for r in range(s3.rounds):
            fit = await self._step(fleet, Step(spec, Stage3Fit(r, gate, variant, reset=r == 0), reference=gate), label)
            gate = self._aggregate(fit.replies, gate)
            self._checkpoint(label, r, gate)
            if self.exp.eval.every_round and variant == s3.method and r < s3.rounds - 1:
                await self._curve_point(fleet, gate, label, r)
        return gate

    async def evaluate(self, fleet: Fleet, gate: StateDict) -> dict[int, dict[str, float]]:
        self.stage = Stage.EVAL
        ev = self.exp.eval
        out = await self._step(fleet, Step(ReplySpec(Metrics), Evaluate(gate, ev.top_k, ev.batch_size)))
        return {i: dict(rep.values) for i, rep in out.replies.items() if isinstance(rep, Metrics)}

    async def _curve_point(self, fleet: Fleet, gate: StateDict, label: str, round_index: int) -> None:
        """The learning curve's point after a Stage 3 round: the final evaluation's Evaluate step on
        the round's gate, through the same fleet. It does not stop the run when too few answer (the
        curve is an observation, not part of the method); its time is not on the modeled clock."""
        ev = self.exp.eval
        step = Step(ReplySpec(Metrics), Evaluate(gate, ev.top_k, ev.batch_size, round=round_index))
        out = await self._step(fleet, step, label, required=False)
        per_client = {i: dict(rep.values) for i, rep in out.replies.items() if isinstance(rep, Metrics)}
        self.summary.curve.append(CurvePoint(label, round_index, self.summary.training_modeled_s(), per_client))

    def _checkpoint(self, stage: str, round_index: int, global_state: Mapping[str, torch.Tensor]) -> None:
        """The coordinator's state after a round: the global part being trained (``global.*``),
        the final feature extractor once Stage 1 is over (``stage1.*``), FedSC's latest R_j
        (``corr.<j>``), and per-client sample counts and DP releases in the metadata."""
        tensors = {f"global.{k}": v for k, v in global_state.items()}
        if stage != Stage.STAGE1.value:
            tensors |= {f"stage1.{k}": v for k, v in self.global_stage1.items()}
        tensors |= {f"corr.{j}": r for j, r in sorted(self.corrs.items())}
        meta = {"stage": stage, "round": str(round_index), "samples": json.dumps(self.samples, sort_keys=True),
                "releases": json.dumps(self.releases, sort_keys=True),
                "rounds": json.dumps(records_to_data(self.summary.rounds))}
        self.obs.on_checkpoint(stage, round_index, tensors, meta)

    def resume(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> str:
        """Continue from a checkpoint of this run (``_checkpoint``'s tensors and metadata). From a
        Stage 1 checkpoint the run goes on at the next Stage 1 round; from a later one (F is final)
        it goes on at Stage 2, since the clients' experts and gates went down with them. Returns
        where it goes on, in words. The caller makes sure the checkpoint is this scenario's."""
        def prefixed(prefix: str) -> StateDict:
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        stage, done = meta["stage"], int(meta["round"])
        self.samples = {int(i): int(n) for i, n in json.loads(meta["samples"]).items()}
        self.releases = {int(i): int(n) for i, n in json.loads(meta["releases"]).items()}
        self.corrs = {int(j): t for j, t in prefixed("corr.").items()}
        records = records_from_data(json.loads(meta["rounds"]))
        if stage == Stage.STAGE1.value:
            self.global_stage1 = prefixed("global.")
            self._stage1_from = done + 1
            self.summary.rounds = records
            if self._stage1_from < self.exp.stage1.rounds:
                return f"Stage 1 round {self._stage1_from}"
        else:
            self.global_stage1 = prefixed("stage1.")
            self._stage1_from = self.exp.stage1.rounds
            self.summary.rounds = [r for r in records if r.stage == Stage.STAGE1.value]
        return "Stage 2"

    async def _step(self, fleet: Fleet, step: Step, label: str | None = None, required: bool = True) -> RoundOutcome:
        """Run one step, record it (``label``: the stage, by default the op's), fail below min_clients
        (unless not ``required``)."""
        stage = label or step.op.stage.value
        clock = time.perf_counter()
        out = self._screen(step, await fleet.run(step))
        losses = [loss for reply in out.replies.values() if (loss := reply_loss(reply)) is not None]
        record = RoundRecord(stage, step.round, step.op, tuple(out.replies), out.failures,
                             sum(losses) / len(losses) if losses else float("nan"), time.perf_counter() - clock,
                             out.modeled_s)
        self.summary.rounds.append(record)
        self.obs.on_round(record)
        if required and len(out.replies) < self.min_clients:
            missing = ", ".join(f"client-{i} ({why})" for i, why in out.failures.items()) or "none"
            raise RoundFailed(
                f"{stage} round {step.round} ({step.op.value}): only {len(out.replies)} client(s) answered, "
                f"min_clients is {self.min_clients}; failures: {missing}"
            )
        return out


    def _screen(self, step: Step, out: RoundOutcome) -> RoundOutcome:
        """Updates far outside the round's distribution become 'rejected: outlier ...' failures."""
        agg = self.exp.aggregation
        if step.reference is None:
            return out
        updates = {i: r.tensors for i, r in out.replies.items() if isinstance(r, Update)}
        bad = screen(updates, step.reference, agg.outlier_factor, agg.reject_reversed)
        if not bad:
            return out
        return RoundOutcome({i: r for i, r in out.replies.items() if i not in bad},
                            {**out.failures, **{i: f"rejected: {why}" for i, why in bad.items()}}, out.modeled_s)

    def _aggregate(self, replies: Mapping[int, Reply], reference: StateDict) -> StateDict:
        """The round's new global state, by the scenario's aggregation method."""
        agg = self.exp.aggregation
        if agg.method == "fedavg":
            return aggregate(replies)
        order = sorted(replies)
        updates = [r for i in order if isinstance(r := replies[i], Update)]
        states, weights = [u.tensors for u in updates], [u.samples for u in updates]
        if agg.method == "norm_bounded":
            return norm_bounded_fedavg(states, weights, reference, agg.clip_factor)
        if agg.method == "median":
            return coordinate_median(states)
        return trimmed_mean(states, agg.trim)


def records_to_data(records: Sequence[RoundRecord]) -> list[dict[str, object]]:
    """Round records as plain data (checkpoints and the stage cache keep them)."""
    return [{"stage": r.stage, "round": r.round, "op": r.op.value, "answered": list(r.answered),
             "failures": {str(i): why for i, why in r.failures.items()}, "loss": r.loss, "seconds": r.seconds,
             "modeled_s": r.modeled_s}
            for r in records]


def records_from_data(rows: Sequence[Mapping[str, Any]]) -> list[RoundRecord]:
    return [RoundRecord(str(r["stage"]), int(r["round"]), Op(r["op"]), tuple(int(i) for i in r["answered"]),
                        MappingProxyType({int(i): str(why) for i, why in r["failures"].items()}),
                        float(r["loss"]), float(r["seconds"]),
                        None if r.get("modeled_s") is None else float(r["modeled_s"]))
            for r in rows]


def aggregate(replies: Mapping[int, Reply]) -> StateDict:
    """FedAvg of the updates, weighted by sample counts, in client-id order."""
    order = sorted(replies)
    updates = [replies[i] for i in order]
    if not all(isinstance(u, Update) for u in updates):
        raise TypeError("aggregate takes updates only")
    return fedavg([u.tensors for u in updates if isinstance(u, Update)],
                  [u.samples for u in updates if isinstance(u, Update)])
