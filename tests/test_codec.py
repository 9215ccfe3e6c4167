"""The stage protocol on the wire: every message type survives encode -> bus frame -> decode, and
malformed ones are typed, counted rejections (ProtocolError with a reason), never a KeyError."""

from __future__ import annotations

import pytest
import torch

from agents.codec import (
    Wire,
    decode_control,
    decode_reply,
    decode_task,
    encode_control,
    encode_reply,
    encode_task,
)
from agents.messages import (
    Bye,
    Correlation,
    Evaluate,
    Hello,
    Metrics,
    Op,
    Refusal,
    Shutdown,
    Stage1Corr,
    Stage1Fit,
    Stage2Fit,
    Stage3Fit,
    Stage3Prepare,
    Sync,
    Update,
)
from broker.topics import Kind, Topics
from broker.wire import Decoder, draft
from nmoe.errors import ProtocolError

W = {"layer.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "layer.n": torch.tensor(5)}


def over_the_wire(wire: Wire) -> Wire:
    """Through the real envelope encoder and decoder, as a message on the bus would go."""
    topics = Topics("codec")
    d = draft(kind=wire.kind, run="codec", src="coordinator", dst="client-0", tensors=wire.tensors,
              round=wire.round, stage=wire.stage, meta=wire.meta)
    msg = Decoder(topics).feed(topics.rx("client-0", "coordinator", wire.kind), d.head(d.digest()) + d.body)
    assert msg is not None
    return Wire(msg.kind, dict(msg.tensors), dict(msg.header.meta), msg.header.round, msg.header.stage)


def same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if hasattr(a, "__dataclass_fields__"):
        return type(a) is type(b) and all(same(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return a == b


TASKS = [
    (Sync(W, 3), Kind.MODEL),
    (Stage1Corr(2, W), Kind.MODEL),
    (Stage1Fit(1, W), Kind.MODEL),
    (Stage1Fit(4, rbar=torch.eye(3), q=0.25), Kind.CORR),
    (Stage1Fit(4, q=0.5), Kind.CTRL),  # FedSC when no Rbar could be formed yet
    (Stage2Fit(W, score_classifier=True), Kind.MODEL),
    (Stage3Prepare(), Kind.CTRL),
    (Stage3Fit(3, W, "fedavg", reset=True), Kind.MODEL),
    (Evaluate(W, top_k=2, batch_size=64), Kind.MODEL),
]


@pytest.mark.parametrize(("task", "kind"), TASKS, ids=lambda t: f"{t.op.value}-{type(t).__name__}"
                         if hasattr(t, "op") else str(t))
def test_every_task_survives_the_wire(task, kind):
    wire = encode_task(task, "task-1")
    task_id, back = decode_task(over_the_wire(wire))
    assert task_id == "task-1" and same(task, back)
    assert wire.kind is kind and wire.stage == task.op.stage.value


REPLIES = [
    Update(W, samples=96, loss=0.75),
    Correlation(torch.eye(4), samples=120),
    Metrics({"accuracy": 0.5, "latency_p95_ms": 12.25}, samples=48),
    Metrics(),
    Refusal("tensor 'x' has shape (3,), expected (2,)"),
]


@pytest.mark.parametrize("reply", REPLIES, ids=lambda r: type(r).__name__)
def test_every_reply_survives_the_wire(reply):
    task_id, back = decode_reply(over_the_wire(encode_reply(reply, "t-9", Op.STAGE1_FIT, 3)))
    assert task_id == "t-9" and same(reply, back)


@pytest.mark.parametrize("message", [
    Hello(samples=96, data_s=1.5), Shutdown(),
    Bye({"sent_bytes": {"update": 10}, "rejected": {"bad_header": 2}}, {"duplicates": 1, "reconnects": 0}),
], ids=lambda m: type(m).__name__)
def test_every_control_message_survives_the_wire(message):
    assert same(message, decode_control(over_the_wire(encode_control(message))))


@pytest.mark.parametrize(("kind", "meta", "reason"), [
    (Kind.CTRL, {}, "unknown_op"),
    (Kind.CTRL, {"op": "no-such-op", "task": "t"}, "unknown_op"),
    (Kind.CTRL, {"op": "stage3_prepare"}, "bad_task_id"),
    (Kind.MODEL, {"op": "stage3_fit", "task": "t", "variant": "fedgate"}, "bad_task"),  # no reset
    (Kind.MODEL, {"op": "stage3_fit", "task": "t", "variant": "other", "reset": True}, "bad_task"),
    (Kind.MODEL, {"op": "evaluate", "task": "t", "top_k": 0, "batch_size": 8}, "bad_task"),
    (Kind.MODEL, {"op": "evaluate", "task": "t", "top_k": True, "batch_size": 8}, "bad_task"),
    (Kind.MODEL, {"op": "stage1_fit", "task": "t", "q": "half"}, "bad_task"),
    (Kind.MODEL, {"op": "stage3_prepare", "task": "t"}, "wrong_kind"),
])
def test_malformed_tasks_are_typed_rejections(kind, meta, reason):
    with pytest.raises(ProtocolError) as err:
        decode_task(Wire(kind, {}, meta))
    assert err.value.reason == reason


@pytest.mark.parametrize(("kind", "meta", "reason"), [
    (Kind.METRICS, {"op": "update", "task": "t", "samples": 1, "loss": 0.1}, "wrong_kind"),
    (Kind.UPDATE, {"op": "update", "task": "t", "samples": -1, "loss": 0.1}, "bad_reply"),
    (Kind.UPDATE, {"op": "update", "task": "t", "samples": 1}, "bad_reply"),
    (Kind.METRICS, {"op": "metrics", "task": "t", "samples": 1, "m.acc": "high"}, "bad_reply"),
    (Kind.METRICS, {"op": "refusal", "task": "t"}, "bad_reply"),
    (Kind.METRICS, {"op": "hello", "task": "t"}, "unknown_op"),
])
def test_malformed_replies_are_typed_rejections(kind, meta, reason):
    with pytest.raises(ProtocolError) as err:
        decode_reply(Wire(kind, {}, meta))
    assert err.value.reason == reason


def test_a_bye_with_an_unknown_or_negative_counter_is_rejected():
    for meta in ({"op": "bye", "passwords": 1}, {"op": "bye", "duplicates": -1}, {"op": "bye", "rejected.x": 1.5}):
        with pytest.raises(ProtocolError):
            decode_control(Wire(Kind.METRICS, {}, meta))
