"""The coordinator's round logic without a broker: ``Strategy`` driven by a scripted fleet that
returns chosen outcomes, and the reply collection every fleet shares (agents.rounds)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import toy_scenario

from agents.messages import (
    Correlation,
    Metrics,
    Op,
    Refusal,
    Reply,
    ReplySpec,
    Stage1Fit,
    Stage2Fit,
    Update,
)
from agents.rounds import Collector, RoundOutcome, Step, TaskBook
from agents.strategy import RoundFailed, Strategy

# what a scripted client does with a step: answer (one reply, or several offered in turn), or stay silent
Answer = Reply | list[Reply] | None
Script = Callable[[Step, int], Answer]


def valid(step: Step, client: int) -> Reply:
    """A reply that is exactly what the step asks for, with a recognizable value."""
    spec = step.spec
    if spec.kind is Update:
        tensors = {k: torch.full(shape, float(client), dtype=dtype) for k, (shape, dtype) in spec.tensors.items()}
        return Update(tensors, samples=10 * (client + 1), loss=float(client))
    if spec.kind is Correlation:
        (shape, dtype), = spec.tensors.values()
        return Correlation(torch.eye(shape[0], dtype=dtype) * (client + 1), samples=96)
    return Metrics({k: 0.5 for k in spec.metrics} | {"loss": 1.0}, samples=96)


class ScriptedFleet:
    """A fleet whose clients answer as ``script`` says; silent ones are 'missing' (or 'offline')."""

    def __init__(self, clients: int, script: Script, offline: frozenset[int] = frozenset()) -> None:
        self.clients = list(range(clients))
        self.script = script
        self.offline = offline
        self.steps: list[Step] = []

    async def run(self, step: Step) -> RoundOutcome:
        self.steps.append(step)
        targets = sorted(step.personal) if step.personal else self.clients
        collector = Collector(step, targets)
        for i in targets:
            answer = self.script(step, i)
            for reply in answer if isinstance(answer, list) else [answer] if answer is not None else []:
                collector.offer(i, reply)
        return collector.close(offline=lambda i: i in self.offline)


def fedce(tmp_path, *extra: str):
    return toy_scenario(tmp_path, ["stage1.method=fedce", "stage1.rounds=2", *extra])


async def test_a_round_with_fewer_answers_than_min_clients_fails_naming_who_is_missing(tmp_path):
    fleet = ScriptedFleet(3, lambda step, i: valid(step, i) if i == 0 else None, offline=frozenset({2}))
    strategy = Strategy(fedce(tmp_path), min_clients=2)
    with pytest.raises(RoundFailed, match=r"only 1 client\(s\) answered, min_clients is 2; failures: "
                                          r"client-1 \(missing\), client-2 \(offline\)"):
        await strategy.stage1(fleet)
    (record,) = strategy.summary.rounds
    assert record.answered == (0,) and dict(record.failures) == {1: "missing", 2: "offline"}


async def test_a_client_missing_one_round_counts_again_when_it_is_back(tmp_path):
    fleet = ScriptedFleet(3, lambda step, i: None if (i, step.round) == (2, 0) else valid(step, i))
    strategy = Strategy(fedce(tmp_path))
    await strategy.stage1(fleet)
    first, second = strategy.summary.rounds
    assert first.answered == (0, 1) and dict(first.failures) == {2: "missing"}
    assert second.answered == (0, 1, 2) and dict(second.failures) == {}
    # FedAvg over clients 0..2 holding 0, 1, 2 with weights 10, 20, 30: (0 + 20 + 60) / 60
    some = next(iter(strategy.global_stage1.values()))
    assert torch.allclose(some, torch.full_like(some, 80 / 60))
    assert second.loss == pytest.approx(1.0)  # mean of the clients' losses 0, 1, 2


async def test_a_rejected_reply_is_recorded_with_its_reason_and_a_valid_one_after_it_counts(tmp_path):
    def script(step: Step, i: int) -> Answer:
        good = valid(step, i)
        assert isinstance(good, Update)
        name, tensor = next(iter(good.tensors.items()))
        bad = Update({**good.tensors, name: tensor.flatten()}, good.samples, good.loss)
        return {0: good, 1: bad, 2: [bad, good]}[i]

    strategy = Strategy(fedce(tmp_path, "stage1.rounds=1"))
    await strategy.stage1(ScriptedFleet(3, script))
    (record,) = strategy.summary.rounds
    assert record.answered == (0, 2)
    assert record.failures[1].startswith("rejected: tensor ") and "has shape" in record.failures[1]


async def test_a_refusal_is_the_clients_final_word(tmp_path):
    strategy = Strategy(fedce(tmp_path, "stage1.rounds=1"))
    fleet = ScriptedFleet(2, lambda step, i: valid(step, i) if i == 0 else [Refusal("out of memory"), valid(step, i)])
    await strategy.stage1(fleet)
    (record,) = strategy.summary.rounds
    assert record.answered == (0,) and dict(record.failures) == {1: "error: out of memory"}


async def test_records_are_immutable_copies(tmp_path):
    strategy = Strategy(fedce(tmp_path, "stage1.rounds=1"))
    await strategy.stage1(ScriptedFleet(2, lambda step, i: valid(step, i) if i == 0 else None))
    (record,) = strategy.summary.rounds
    with pytest.raises(TypeError):
        record.failures[1] = "late"  # type: ignore[index]


async def test_fedsc_counts_a_release_for_every_client_asked_even_when_its_answer_is_lost(tmp_path):
    scn = toy_scenario(tmp_path, ["stage1.method=fedsc", "stage1.rounds=2", "privacy.enabled=true"])

    def script(step: Step, i: int) -> Answer:
        if step.op is Op.STAGE1_CORR and (i, step.round) == (2, 1):
            return None  # its R_2 of round 1 is lost: released (noise added) all the same
        return valid(step, i)

    fleet = ScriptedFleet(3, script)
    strategy = Strategy(scn)
    await strategy.stage1(fleet)
    assert strategy.releases == {0: 2, 1: 2, 2: 2}
    assert strategy.summary.privacy["releases"] == 2.0 and strategy.summary.privacy["epsilon"] > 0
    fits = [s for s in fleet.steps if s.op is Op.STAGE1_FIT]
    assert sorted(fits[1].personal) == [0, 1]  # only who answered round 1's corr step is asked to fit
    task = fits[1].personal[0]
    assert isinstance(task, Stage1Fit) and task.rbar is not None and task.state == {}


async def test_stage2_rejects_a_fedce_reply_without_valid_classifier_scores(tmp_path):
    def script(step: Step, i: int) -> Answer:
        if i == 1:
            return Metrics({"loss": 1.0, "classifier_accuracy": 1.5, "classifier_f1_macro": 0.5})
        return valid(step, i)

    strategy = Strategy(fedce(tmp_path))
    fleet = ScriptedFleet(3, script)
    scores = await strategy.stage2(fleet)
    (record,) = strategy.summary.rounds
    assert set(scores) == {0, 2} and scores[0] == {"accuracy": 0.5, "f1_macro": 0.5}
    assert record.failures[1] == "rejected: no valid classifier_accuracy (got 1.5, allowed 0..1)"
    task = fleet.steps[0].common
    assert isinstance(task, Stage2Fit) and task.score_classifier


async def test_sync_task_follows_the_run(tmp_path):
    strategy = Strategy(fedce(tmp_path, "stage1.rounds=1"))
    assert strategy.sync_task() is None  # still joining
    await strategy.stage1(ScriptedFleet(2, valid))
    sync = strategy.sync_task()
    assert sync is not None and sync.stage == 1 and sync.state.keys() == strategy.global_stage1.keys()
    await strategy.stage2(ScriptedFleet(2, valid))
    sync = strategy.sync_task()
    assert sync is not None and sync.stage == 2


# -- reply collection ----------------------------------------------------------------------------------
def _step() -> Step:
    return Step(ReplySpec(Metrics), Stage2Fit({}, False))


def test_collector_keeps_the_first_valid_reply_and_drops_duplicates_and_strangers():
    c = Collector(_step(), [0, 1])
    assert c.offer(0, Metrics({"loss": 1.0})) == "accepted"
    assert c.offer(0, Metrics({"loss": 2.0})) == "duplicate"
    assert c.offer(7, Metrics({"loss": 2.0})) == "not_asked"
    assert not c.done.is_set()
    assert c.offer(1, Update({}, 1, 0.0)) == "rejected"  # not the kind of reply the step asked for
    assert not c.done.is_set() and c.settled(grace_s=0)  # settled once a genuine reply had its chance
    out = c.close()
    assert out.replies[0] == Metrics({"loss": 1.0})
    assert out.failures == {1: "rejected: a update reply, expected metrics"}


def test_a_closed_step_turns_answers_into_late_events_and_unknown_ids_are_told_apart():
    book = TaskBook(remember=2)
    collector = Collector(_step(), [0])
    book.opened("t1", collector)
    assert book.route("t1") == "open"
    book.closed("t1")
    outcome = collector.close()
    assert book.route("t1") == "late" and book.route("nope") == "unknown"
    late = book.late("t1", 0)
    assert (late.op, late.round, late.client) == (Op.STAGE2_FIT, 0, 0) and late.after_s >= 0
    assert outcome.failures == {0: "missing"}  # the event does not change the closed step's record
    for t in ("t2", "t3"):  # only the latest `remember` closed ids are kept
        book.opened(t, Collector(_step(), [0]))
        book.closed(t)
    assert book.route("t1") == "unknown"
    book.sync_sent("s1")
    assert book.route("s1") == "sync"


def test_a_rejected_reply_waits_its_grace_for_a_genuine_one_before_the_step_settles():
    step = Step(ReplySpec(Metrics, metrics={"loss": (0.0, 10.0)}), Stage2Fit({}, False))
    c = Collector(step, [0, 1])
    c.offer(0, Metrics({"loss": 1.0}))
    assert c.offer(1, Metrics({"loss": 99.0})) == "rejected"  # malformed, sent just before the genuine one
    assert not c.settled(grace_s=60) and c.settled(grace_s=0)  # it waits (up to the grace) ...
    assert c.offer(1, Metrics({"loss": 2.0})) == "accepted"  # ... and the genuine reply counts
    assert c.done.is_set() and c.close().failures == {}


def test_a_refusal_after_a_rejected_reply_settles_the_client_at_once():
    c = Collector(Step(ReplySpec(Metrics, metrics={"loss": (0.0, 10.0)}), Stage2Fit({}, False)), [0])
    assert c.offer(0, Metrics({"loss": 99.0})) == "rejected"
    assert c.offer(0, Refusal("out of memory")) == "refused"
    assert c.done.is_set() and c.close().failures == {0: "error: out of memory"}
