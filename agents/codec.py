"""The stage protocol on the wire: each message of ``agents.messages`` as (kind, tensors, meta) and back.

This is the only place the protocol's meta keys are spelled. Every message carries ``op`` (what
it is: a task's op, a reply's or a control message's name) and, tasks and replies, ``task`` (the
task id replies are matched by). Tasks go out as ``model`` (with weights), ``corr`` (FedSC's
Rbar_{-i}) or ``ctrl`` (no tensors); replies as ``update``, ``corr`` or ``metrics`` (numbers in
the meta, prefixed ``m.``). Decoding is strict: an unknown op, a missing or mistyped field, a kind
that does not fit the op, or a message of the wrong family for its receiver is a
:class:`ProtocolError` whose reason the receiver counts; never a KeyError.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from broker.topics import Kind
from broker.wire import MetaValue
from nmoe.errors import ProtocolError

from .messages import (
    BYE_COUNTERS,
    BYE_TOTALS,
    TASK_TYPES,
    Bye,
    Control,
    Correlation,
    Hello,
    Metrics,
    Op,
    Refusal,
    Reply,
    Shutdown,
    Task,
    Update,
    Usage,
)

COORDINATOR = "coordinator"
CHANNEL = "channel"
_CLIENT = re.compile(r"client-(\d{1,6})")

OP, TASK = "op", "task"
_METRIC = "m."
RBAR, R = "rbar", "R"
MAX_REASON = 500
# ops of the messages that are not tasks
UPDATE, CORRELATION, METRICS, REFUSAL = "update", "correlation", "metrics", "refusal"
HELLO, BYE, SHUTDOWN = "hello", "bye", "shutdown"

Arrays = dict[str, np.ndarray]
Meta = dict[str, MetaValue]


@dataclass(frozen=True)
class Wire:
    """One protocol message as the bus carries it."""

    kind: Kind
    tensors: Arrays
    meta: Meta
    round: int = -1
    stage: str = ""


def client_name(index: int) -> str:
    return f"client-{index}"


def client_index(name: str) -> int | None:
    """The index of a client agent id, or None for any other agent."""
    m = _CLIENT.fullmatch(name)
    return int(m.group(1)) if m else None


def to_numpy(tensors: Mapping[str, torch.Tensor]) -> Arrays:
    # contiguous(): channels-last convolution weights become plain row-major arrays on the wire
    return {k: v.detach().contiguous().numpy() for k, v in tensors.items()}


def to_torch(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.require(v, requirements=["C", "W"])) for k, v in arrays.items()}  # keeps 0-d


# -- tasks: generic over the task dataclasses' fields -----------------------------------------------
# A task's fields travel by their type: a state dict (``Tensors``) as its tensors, a tensor field as
# one tensor named after the field, ``round`` in the header, every other field (int, float, bool, a
# Literal of strings) in the meta under its own name. So a new task class needs no code here.
TASKS_BY_OP: dict[str, type[Task]] = {cls.op.value: cls for cls in TASK_TYPES}


_FIELDS: dict[str, list[tuple[str, Any]]] = {}  # a class's fields never change: resolve its annotations once


def _task_fields(cls: type[Task]) -> list[tuple[str, Any]]:
    fields = _FIELDS.get(cls.__qualname__)
    if fields is None:
        hints = typing.get_type_hints(cls)
        fields = _FIELDS[cls.__qualname__] = [(f.name, hints[f.name]) for f in dataclasses.fields(cls)
                                              if f.name != "round"]
    return fields


def _is_state(tp: Any) -> bool:
    return typing.get_origin(tp) in (Mapping, collections.abc.Mapping)


def _is_tensor(tp: Any) -> bool:
    return tp is torch.Tensor or (not _is_state(tp) and torch.Tensor in typing.get_args(tp))


def encode_task(task: Task, task_id: str) -> Wire:
    meta: Meta = {OP: task.op.value, TASK: task_id}
    tensors: dict[str, torch.Tensor] = {}
    for name, tp in _task_fields(type(task)):
        value = getattr(task, name)
        if _is_state(tp):
            tensors |= value
        elif _is_tensor(tp):
            if value is not None:
                tensors[name] = value
        else:
            meta[name] = value
    return Wire(task_kind(task), to_numpy(tensors), meta, task.round, task.op.stage.value)


def task_kind(task: Task) -> Kind:
    """``corr`` when the task carries a tensor of its own (FedSC's Rbar_{-i}), ``model`` when it
    carries a state dict, ``ctrl`` when it carries no tensors."""
    fields = _task_fields(type(task))
    if any(_is_tensor(tp) and getattr(task, name) is not None for name, tp in fields):
        return Kind.CORR
    if any(_is_state(tp) and getattr(task, name) for name, tp in fields):
        return Kind.MODEL
    return Kind.CTRL


def encode_reply(reply: Reply, task_id: str, op: Op, round_index: int, usage: Usage | None = None) -> Wire:
    meta: Meta = {TASK: task_id}
    if usage is not None:
        meta |= encode_usage(usage)
    tensors: Mapping[str, torch.Tensor] = {}
    match reply:
        case Update(tensors=tensors, samples=samples, loss=loss):
            meta |= {OP: UPDATE, "samples": samples, "loss": float(loss)}
            kind = Kind.UPDATE
        case Correlation(r=r, samples=samples):
            tensors, kind = {R: r}, Kind.CORR
            meta |= {OP: CORRELATION, "samples": samples}
        case Metrics(values=values, samples=samples):
            meta |= {OP: METRICS, "samples": samples, **{_METRIC + k: float(v) for k, v in values.items()}}
            kind = Kind.METRICS
        case Refusal(reason=reason):
            meta |= {OP: REFUSAL, "reason": reason[:MAX_REASON]}
            kind = Kind.METRICS
    return Wire(kind, to_numpy(tensors), meta, round_index, op.stage.value)


_USAGE = "dev."
_USAGE_FLOATS = ("flops", "compute_s", "host_s", "lag_s", "compute_j", "radio_j")
_USAGE_INTS = ("tx_bytes", "rx_bytes")


def encode_usage(usage: Usage) -> Meta:
    meta: Meta = {_USAGE + "device": usage.device, _USAGE + "too_slow": usage.too_slow}
    meta |= {_USAGE + k: float(getattr(usage, k)) for k in _USAGE_FLOATS}
    meta |= {_USAGE + k: int(getattr(usage, k)) for k in _USAGE_INTS}
    return meta


def decode_usage(meta: Mapping[str, Any]) -> Usage | None:
    """The device usage a reply carries (None when it carries none); ProtocolError when malformed."""
    if not any(k.startswith(_USAGE) for k in meta):
        return None
    f = _Fields(meta, "bad_usage")
    try:
        numbers: dict[str, Any] = {k: f.float(_USAGE + k) for k in _USAGE_FLOATS}
        numbers |= {k: f.int(_USAGE + k) for k in _USAGE_INTS}
        return Usage(f.str(_USAGE + "device"), too_slow=f.bool(_USAGE + "too_slow"), **numbers)
    except ValueError as err:
        raise f.bad(str(err)) from err


ELAPSED_S = "elapsed_s"
MAX_ELAPSED_S = 1e7
"""Bound on a reply's elapsed_s (like any number off the wire)."""


def encode_elapsed(elapsed_s: float) -> Meta:
    """What a reply says about the modeled seconds from its task's send to the reply (the task's
    transit on the channel, then the client's work with its host's lag behind its device taken
    out), for the coordinator's modeled clock."""
    return {ELAPSED_S: min(max(float(elapsed_s), 0.0), MAX_ELAPSED_S)}


def decode_elapsed(meta: Mapping[str, Any]) -> float | None:
    """The modeled seconds a reply says its task took until it was sent (None when it does not
    say); ProtocolError when malformed."""
    if ELAPSED_S not in meta:
        return None
    v = _Fields(meta, "bad_reply").float(ELAPSED_S)
    if not 0.0 <= v <= MAX_ELAPSED_S:
        raise ProtocolError("bad_reply", f"{ELAPSED_S} must be in 0..{MAX_ELAPSED_S:g}, got {v!r}")
    return v


def encode_control(message: Control) -> Wire:
    match message:
        case Hello(samples=samples, data_s=data_s, session=session):
            return Wire(Kind.CTRL, {}, {OP: HELLO, "samples": samples, "data_s": float(data_s), "session": session})
        case Bye():
            return Wire(Kind.METRICS, {}, {OP: BYE, **message.flat()})
        case Shutdown():
            return Wire(Kind.CTRL, {}, {OP: SHUTDOWN})
    raise TypeError(f"not a control message: {message!r}")


# -- decoding ----------------------------------------------------------------------------------------
class _Fields:
    """Typed reads of one message's meta; every problem is a ProtocolError(reason)."""

    def __init__(self, meta: Mapping[str, Any], reason: str) -> None:
        self.meta, self.reason = meta, reason

    def bad(self, detail: str) -> ProtocolError:
        return ProtocolError(self.reason, detail)

    def int(self, key: str, low: int = 0) -> int:
        v = self.meta.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise self.bad(f"{key} must be an integer >= {low}, got {v!r}")
        return v

    def float(self, key: str) -> float:
        v = self.meta.get(key)
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise self.bad(f"{key} must be a finite number, got {v!r}")
        return float(v)

    def bool(self, key: str) -> bool:
        v = self.meta.get(key)
        if not isinstance(v, bool):
            raise self.bad(f"{key} must be true or false, got {v!r}")
        return v

    def str(self, key: str, choices: tuple[str, ...] | None = None) -> str:
        v = self.meta.get(key)
        if not isinstance(v, str) or (choices is not None and v not in choices):
            raise self.bad(f"{key} must be {' or '.join(choices) if choices else 'a string'}, got {v!r}")
        return v


def op_of(meta: Mapping[str, Any]) -> str:
    op = meta.get(OP)
    if not isinstance(op, str):
        raise ProtocolError("unknown_op", f"no op in meta (got {op!r})")
    return op


def task_id_of(meta: Mapping[str, Any]) -> str:
    task_id = meta.get(TASK)
    if not isinstance(task_id, str) or not 0 < len(task_id) <= 64:
        raise ProtocolError("bad_task_id", f"task id must be a string of 1..64 chars, got {task_id!r}")
    return task_id


def decode_task(wire: Wire) -> tuple[str, Task]:
    """(task id, task) from a coordinator's message."""
    op = op_of(wire.meta)
    cls = TASKS_BY_OP.get(op)
    if cls is None:
        raise ProtocolError("unknown_op", f"{op[:40]!r} is not a task")
    task_id = task_id_of(wire.meta)
    f = _Fields(wire.meta, "bad_task")
    tensors = to_torch(wire.tensors)
    kwargs: dict[str, Any] = {}
    state_field = None
    for name, tp in _task_fields(cls):
        if _is_state(tp):
            state_field = name
        elif _is_tensor(tp):
            kwargs[name] = tensors.pop(name, None)
        elif tp is bool:
            kwargs[name] = f.bool(name)
        elif tp is int:
            kwargs[name] = f.int(name)
        elif tp is float:
            kwargs[name] = f.float(name)
        else:  # a Literal of strings
            kwargs[name] = f.str(name, typing.get_args(tp))
    if state_field is not None:
        kwargs[state_field] = tensors
    elif tensors:
        raise f.bad(f"{op} carries no tensors, got {sorted(tensors)[:3]}")
    try:
        task = cls(round=wire.round, **kwargs)
    except ValueError as err:  # a field out of range (the message classes validate themselves)
        raise f.bad(str(err)) from err
    if task_kind(task) is not wire.kind:
        raise ProtocolError("wrong_kind", f"{op} sent as {wire.kind.value}, expected {task_kind(task).value}")
    return task_id, task


def decode_reply(wire: Wire) -> tuple[str, Reply]:
    """(task id, reply) from a client's answer to a task."""
    op = op_of(wire.meta)
    task_id = task_id_of(wire.meta)
    f = _Fields(wire.meta, "bad_reply")
    expected = {UPDATE: Kind.UPDATE, CORRELATION: Kind.CORR, METRICS: Kind.METRICS, REFUSAL: Kind.METRICS}.get(op)
    if expected is None:
        raise ProtocolError("unknown_op", f"{op[:40]!r} is not a reply")
    if wire.kind is not expected:
        raise ProtocolError("wrong_kind", f"{op} sent as {wire.kind.value}, expected {expected.value}")
    tensors = to_torch(wire.tensors)
    if op == REFUSAL:
        return task_id, Refusal(f.str("reason")[:MAX_REASON])
    if op == UPDATE:
        return task_id, Update(tensors, f.int("samples"), f.float("loss"))
    if op == CORRELATION:
        if set(tensors) != {R}:
            raise f.bad(f"a correlation carries exactly one tensor '{R}', got {sorted(tensors)[:3]}")
        return task_id, Correlation(tensors[R], f.int("samples"))
    if tensors:
        raise f.bad("metrics carry no tensors")
    values = {k[len(_METRIC):]: f.float(k) for k in wire.meta if k.startswith(_METRIC)}
    return task_id, Metrics(values, f.int("samples"))


def decode_control(wire: Wire) -> Control:
    """A hello or bye (to the coordinator) or a shutdown (to a client)."""
    op = op_of(wire.meta)
    f = _Fields(wire.meta, "bad_control")
    if op == HELLO and wire.kind is Kind.CTRL:
        return Hello(f.int("samples"), f.float("data_s"), f.int("session"))
    if op == SHUTDOWN and wire.kind is Kind.CTRL:
        return Shutdown()
    if op == BYE and wire.kind is Kind.METRICS:
        counters: dict[str, dict[str, int]] = {}
        totals: dict[str, int] = {}
        for key in wire.meta:
            if key == OP:
                continue
            name, _, sub = key.partition(".")
            if name in BYE_COUNTERS and sub:
                counters.setdefault(name, {})[sub] = f.int(key)
            elif name in BYE_TOTALS and not sub:
                totals[name] = f.int(key)
            else:
                raise f.bad(f"unknown counter {key[:40]!r}")
        return Bye(counters, totals)
    raise ProtocolError("unknown_op", f"{op[:40]!r} as {wire.kind.value} is not a control message")


def is_control(meta: Mapping[str, Any]) -> bool:
    return meta.get(OP) in (HELLO, BYE, SHUTDOWN)


# -- expert queries (client <-> client, outside the stage protocol's task ids) ------------------------
LATENTS, LOGPROBS = "h", "logp"
SERVICE_S, REQ_TRANSIT_S, DEADLINE_S, DECLINED = "service_s", "req_transit_s", "deadline_s", "declined"


def encode_expert_query(latents: torch.Tensor, deadline_s: float | None = None) -> Wire:
    """The latents, and how long (modeled seconds from its send) the requester waits for the answer."""
    meta: Meta = {} if deadline_s is None else {DEADLINE_S: float(deadline_s)}
    return Wire(Kind.LATENT, {LATENTS: latents.contiguous().numpy()}, meta)


def query_deadline(meta: Mapping[str, Any]) -> float:
    """A query's deadline (modeled seconds after its send); inf when it names none or a bad one."""
    v = meta.get(DEADLINE_S)
    return float(v) if isinstance(v, float) and math.isfinite(v) and v > 0 else math.inf


def encode_expert_decline(reason: str) -> Wire:
    """The expert will not answer in time (its device is too slow for the query's deadline)."""
    return Wire(Kind.LOGITS, {}, {DECLINED: reason[:MAX_REASON]})


def encode_expert_answer(logprobs: torch.Tensor, service_s: float, req_transit_s: float | None) -> Wire:
    """The expert's log-probabilities, with how long it computed and (when the channel stamped the
    request) the request's modeled transit, so the requester can add up the modeled latency."""
    meta: Meta = {SERVICE_S: float(service_s)}
    if req_transit_s is not None:
        meta[REQ_TRANSIT_S] = float(req_transit_s)
    return Wire(Kind.LOGITS, {LOGPROBS: logprobs.numpy()}, meta)


@dataclass(frozen=True)
class ExpertAnswerWire:
    logprobs: np.ndarray | None
    """None when the expert declined."""
    service_s: float | None
    req_transit_s: float | None


def decode_expert_answer(tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> ExpertAnswerWire:
    if isinstance(meta.get(DECLINED), str) and not tensors:
        return ExpertAnswerWire(None, None, None)
    logp = tensors.get(LOGPROBS)
    if logp is None:
        raise ProtocolError("bad_reply", f"an expert answer carries '{LOGPROBS}'")
    svc, req = meta.get(SERVICE_S), meta.get(REQ_TRANSIT_S)
    return ExpertAnswerWire(logp, svc if isinstance(svc, float) else None, req if isinstance(req, float) else None)
