"""Tasks and replies on the wire: which message kind carries them, and their meta fields.

The stage protocol (protocol.py) is transport-free; this module is the one place that maps it onto
bus messages. A task is one broadcast (``model`` with weights, ``ctrl`` without) or, when it has
client-specific parts, one unicast per client (``corr`` for FedSC's Rbar_{-i}). A reply is
``update`` (weights), ``corr`` (R_i) or ``metrics`` (numbers only, in the header's meta).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from broker.topics import Kind
from broker.wire import Message
from nmoe.errors import WireError

from .protocol import Op, Part, Reply, Task

COORDINATOR = "coordinator"
CHANNEL = "channel"
CLIENT_PREFIX = "client-"
_CLIENT = re.compile(r"client-(\d{1,6})")

# meta keys the codec owns; everything else in a task's meta is the task's own settings
OP, TASK, ROUND, SAMPLES, ERROR = "op", "task", "round", "samples", "error"
HELLO, SHUTDOWN, BYE = "hello", "shutdown", "bye"

REPLY_KIND = {
    Op.STAGE1_CORR: Kind.CORR,
    Op.STAGE1_FIT: Kind.UPDATE,
    Op.STAGE3_FIT: Kind.UPDATE,
}


def client_name(index: int) -> str:
    return f"{CLIENT_PREFIX}{index}"


def client_index(name: str) -> int | None:
    """The index of a client agent id, or None for any other agent."""
    m = _CLIENT.fullmatch(name)
    return int(m.group(1)) if m else None


def to_numpy(tensors: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    # contiguous(): channels-last convolution weights become plain row-major arrays on the wire
    return {k: v.detach().contiguous().numpy() for k, v in tensors.items()}


def to_torch(arrays: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.require(v, requirements=["C", "W"])) for k, v in arrays.items()}  # keeps 0-d shapes


def task_kind(part: Part) -> Kind:
    return Kind.MODEL if part.tensors else Kind.CTRL


def task_meta(task: Task, task_id: str, part: Part) -> dict[str, Any]:
    return {**part.meta, OP: task.op.value, TASK: task_id}


def decode_task(msg: Message) -> tuple[str, Task]:
    """(task id, Task) from a coordinator message; raises WireError('bad_task') when malformed."""
    meta = dict(msg.header.meta)
    try:
        op = Op(meta.pop(OP))
        task_id = str(meta.pop(TASK))
    except (KeyError, ValueError) as err:
        raise WireError("bad_task", f"no valid op/task in meta ({err})") from err
    return task_id, Task(op, msg.header.round, Part(to_torch(msg.tensors), meta))


def reply_kind(op: Op) -> Kind:
    return REPLY_KIND.get(op, Kind.METRICS)


def reply_meta(task_id: str, reply: Reply) -> dict[str, Any]:
    return {**{k: float(v) for k, v in reply.metrics.items()}, TASK: task_id, SAMPLES: reply.samples}


def decode_reply(client: int, msg: Message) -> Reply:
    """A Reply from a client's message (the caller checks it against the task's expectations)."""
    meta = msg.header.meta
    samples = meta.get(SAMPLES, 0)
    if isinstance(samples, bool) or not isinstance(samples, int):
        raise WireError("bad_reply", f"samples must be an integer, got {samples!r}")
    metrics = {k: float(v) for k, v in meta.items()
               if k not in (TASK, SAMPLES, ERROR) and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return Reply(client, to_torch(msg.tensors), samples, metrics)
