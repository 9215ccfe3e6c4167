"""Robust aggregation: the pure functions, and a malicious client (x1000, sign flip) that cannot drag
the honest clients' accuracy down while an honest run's numbers stay exactly FedAvg's."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from conftest import toy_scenario

from agents.inprocess import InProcessFleet
from agents.messages import Update
from agents.protocol import execute
from agents.rounds import Collector, RoundOutcome, Step
from agents.strategy import Strategy
from nmoe_models.fedavg import fedavg
from nmoe_models.learner import ClientLearner
from nmoe_models.partition import load_client_data
from nmoe_models.robust import (
    clipped,
    coordinate_median,
    norm_bounded_fedavg,
    outliers,
    screen,
    trimmed_mean,
    update_norm,
)

REF = {"w": torch.zeros(4), "n": torch.tensor(3)}


def state(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float32), "n": torch.tensor(3)}


def test_update_norm_and_outliers():
    assert update_norm(state(3, 4, 0, 0), REF) == 5.0
    assert outliers([1.0, 1.2, 0.9, 10.0], factor=3) == [3]
    assert outliers([1.0, 10.0], factor=3) == []  # two updates: the median cannot tell which is bad
    assert outliers([1.0, 1.2, 0.9, 10.0], factor=0) == []


def test_clipping_and_the_coordinate_wise_aggregators():
    assert torch.allclose(clipped(state(30, 40, 0, 0), REF, 5.0)["w"], torch.tensor([3.0, 4.0, 0, 0]))
    assert clipped(state(1, 0, 0, 0), REF, 5.0)["w"].tolist() == [1, 0, 0, 0]
    states = [state(1, 1, 1, 1), state(2, 2, 2, 2), state(1000, -1000, 3, 3)]
    assert coordinate_median(states)["w"].tolist() == [2, 1, 2, 2]
    assert trimmed_mean(states, 0.34)["w"].tolist() == [2, 1, 2, 2]  # one cut at each end of three
    bounded = norm_bounded_fedavg(states, [1, 1, 1], REF, clip_factor=1.0)["w"]
    assert float(bounded.abs().max()) < 5  # the x1000 update is clipped to the median norm


def test_screen_names_sign_flips_and_giant_updates():
    ref = state(1, 1, 1, 1)
    honest = {0: state(1.1, 0.9, 1, 1), 1: state(0.9, 1.1, 1, 1), 2: state(1, 1, 1.1, 0.9)}
    assert screen(honest, ref, 3.0, True) == {}
    why = screen({**honest, 3: state(-1, -1, -1, -1)}, ref, 3.0, True)
    assert list(why) == [3] and why[3].startswith("outlier: parameters reversed (cosine -1.00")
    why = screen({**honest, 3: state(1000, 1000, 1000, 1000)}, ref, 3.0, True)
    assert list(why) == [3] and "x the round's median (limit 3x)" in why[3]


class Malicious(InProcessFleet):
    """Client ``bad`` answers every federated fit with a well-formed, poisoned update."""

    def __init__(self, learners, bad: int, attack) -> None:
        super().__init__(learners)
        self.bad, self.attack = bad, attack

    async def run(self, step: Step) -> RoundOutcome:
        targets = sorted(step.personal) if step.personal else self.clients
        collector = Collector(step, targets)
        for i in targets:
            reply = await execute(self.learners[i], step.task_for(i), self.pool)
            if i == self.bad and isinstance(reply, Update):
                reply = Update({k: self.attack(v) for k, v in reply.tensors.items()}, reply.samples, reply.loss)
            collector.offer(i, reply)
        return collector.close()


def run(scn, fleet_of) -> tuple[dict[int, float], Strategy]:
    torch.set_num_threads(1)
    learners = {i: ClientLearner(scn, load_client_data(scn, i)) for i in range(scn.clients)}
    strategy = Strategy(scn)
    summary = asyncio.run(strategy.run(fleet_of(learners)))
    return {i: m["accuracy"] for i, m in summary.methods["nmoe"].items()}, strategy


def _scale(t: torch.Tensor) -> torch.Tensor:
    return t * 1000 if t.is_floating_point() else t


def _flip(t: torch.Tensor) -> torch.Tensor:
    return -t if t.is_floating_point() else t


@pytest.mark.parametrize("attack", [_scale, _flip], ids=["x1000", "sign-flip"])
def test_one_malicious_client_cannot_sink_the_honest_ones(tmp_path, attack):
    scn = toy_scenario(tmp_path, ["clients=4", "stage1.method=fedce", "stage1.rounds=3", "eval.top_k=2"])
    honest, _ = run(scn, InProcessFleet)
    attacked, strategy = run(scn, lambda learners: Malicious(learners, 3, attack))
    honest_mean = sum(honest[i] for i in range(3)) / 3
    attacked_mean = sum(attacked[i] for i in range(3)) / 3
    assert abs(attacked_mean - honest_mean) <= 0.05, (honest, attacked)
    fits = [r for r in strategy.summary.rounds if r.op.value in ("stage1_fit", "stage3_fit")]
    assert all(r.failures.get(3, "").startswith("rejected: outlier: ") for r in fits)


def test_screening_leaves_an_honest_run_exactly_fedavg(tmp_path):
    scn = toy_scenario(tmp_path, ["stage1.method=fedce", "stage1.rounds=2"])
    screened, a = run(scn, InProcessFleet)
    off = dataclasses.replace(scn, aggregation=dataclasses.replace(scn.aggregation, outlier_factor=0.0,
                                                                   reject_reversed=False))
    plain, b = run(off, InProcessFleet)
    assert screened == plain
    assert all(torch.equal(a.global_stage1[k], b.global_stage1[k]) for k in a.global_stage1)
    assert not any(r.failures for r in a.summary.rounds)


def test_fedavg_is_what_the_default_method_computes():
    states = [state(1, 2, 3, 4), state(3, 2, 1, 0)]
    assert fedavg(states, [1, 3])["w"].tolist() == [2.5, 2.0, 1.5, 1.0]
