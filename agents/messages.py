"""The stage protocol's messages: a closed set of frozen, typed dataclasses, one per thing that
crosses the bus between the coordinator and the clients.

Transport-free (tensors are torch tensors); ``agents.codec`` maps each one to a bus message and
back and is the only place their fields are spelled as meta keys. Three families:

- tasks, coordinator -> client: :class:`Sync`, :class:`Stage1Corr`, :class:`Stage1Fit`,
  :class:`Stage2Fit`, :class:`Stage3Prepare`, :class:`Stage3Fit`, :class:`Evaluate`;
- replies, client -> coordinator: :class:`Update`, :class:`Correlation`, :class:`Metrics`,
  :class:`Refusal` (the client could not run the task, and says why);
- control: :class:`Hello` (client), :class:`Bye` (client, its bus counters), :class:`Shutdown`.

Adding a stage: a task class here (with its ``op``), its fields in ``codec``, its ``case`` in
``protocol.execute``, and the strategy step that sends it (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar, Literal

import torch

from nmoe.errors import RejectedReply

Tensors = Mapping[str, torch.Tensor]
GateVariant = Literal["fedgate", "fedavg"]


class Stage(str, Enum):
    """Where a run is; also the ``stage`` field of bus headers."""

    JOIN = "join"
    STAGE1 = "stage1"
    STAGE2 = "stage2"
    STAGE3 = "stage3"
    EVAL = "eval"
    DONE = "done"


class Op(str, Enum):
    """What a task asks for; its value is the text of fault configs, metrics.csv and results.json."""

    SYNC = "sync"  # load the current global feature extractor (a client joining late or again)
    STAGE1_CORR = "stage1_corr"  # FedSC: load the global model, answer R_i
    STAGE1_FIT = "stage1_fit"  # local Stage 1 training from the global model (FedCE) or with Rbar_{-i} (FedSC)
    STAGE2_FIT = "stage2_fit"  # load the final F, score the FedCE classifier, train the expert
    STAGE3_PREPARE = "stage3_prepare"  # ask every expert for its outputs on the local training latents
    STAGE3_FIT = "stage3_fit"  # load the global gate part, train the gate locally
    EVALUATE = "evaluate"  # load the final gate part, serverless top-k inference on the test set

    @property
    def stage(self) -> Stage:
        return _OP_STAGE[self]


_OP_STAGE = {Op.SYNC: Stage.JOIN, Op.STAGE1_CORR: Stage.STAGE1, Op.STAGE1_FIT: Stage.STAGE1,
             Op.STAGE2_FIT: Stage.STAGE2, Op.STAGE3_PREPARE: Stage.STAGE3, Op.STAGE3_FIT: Stage.STAGE3,
             Op.EVALUATE: Stage.EVAL}


# -- tasks -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sync:
    """Catch up with a run in progress: the current F, then (from Stage 2 on) the expert, then
    (from Stage 3 on) the other experts' outputs."""

    op: ClassVar[Op] = Op.SYNC
    state: Tensors
    stage: int  # 1, 2 or 3: how far the client must catch up
    round: int = -1

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise ValueError(f"sync stage must be 1, 2 or 3, got {self.stage}")


@dataclass(frozen=True)
class Stage1Corr:
    """FedSC, step (a) of a round: load the global model, answer R_i of it."""

    op: ClassVar[Op] = Op.STAGE1_CORR
    round: int
    state: Tensors


@dataclass(frozen=True)
class Stage1Fit:
    """Local Stage 1 training: from ``state`` (FedCE), or (FedSC) from the model of this round's
    corr task with Rbar_{-i} and its weight q."""

    op: ClassVar[Op] = Op.STAGE1_FIT
    round: int
    state: Tensors = field(default_factory=dict)
    rbar: torch.Tensor | None = None
    q: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.q) or self.q < 0:
            raise ValueError(f"q must be a finite number >= 0, got {self.q}")


@dataclass(frozen=True)
class Stage2Fit:
    """Load the final F, train the expert; with ``score_classifier`` also score the FedCE classifier."""

    op: ClassVar[Op] = Op.STAGE2_FIT
    state: Tensors
    score_classifier: bool = False
    round: int = 0


@dataclass(frozen=True)
class Stage3Prepare:
    """Send the training latents to every other expert once and cache the answers."""

    op: ClassVar[Op] = Op.STAGE3_PREPARE
    round: int = 0


@dataclass(frozen=True)
class Stage3Fit:
    """Load the global gate part, train the gate locally (``reset``: from its fresh start)."""

    op: ClassVar[Op] = Op.STAGE3_FIT
    round: int
    gate: Tensors
    variant: GateVariant
    reset: bool = False


@dataclass(frozen=True)
class Evaluate:
    """Load the final gate part, run serverless top-k inference over the test set."""

    op: ClassVar[Op] = Op.EVALUATE
    gate: Tensors
    top_k: int
    batch_size: int
    round: int = 0

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.batch_size < 1:
            raise ValueError(f"top_k and batch_size must be >= 1, got {self.top_k}, {self.batch_size}")


Task = Sync | Stage1Corr | Stage1Fit | Stage2Fit | Stage3Prepare | Stage3Fit | Evaluate
TASK_TYPES: tuple[type[Task], ...] = (Sync, Stage1Corr, Stage1Fit, Stage2Fit, Stage3Prepare, Stage3Fit, Evaluate)


# -- replies -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Update:
    """Weights after local training (Stage 1 fit, Stage 3 fit), weighed by ``samples`` in FedAvg."""

    tensors: Tensors
    samples: int
    loss: float


@dataclass(frozen=True)
class Correlation:
    """FedSC's R_i (DP-protected) and the number of samples it was computed over."""

    r: torch.Tensor
    samples: int


@dataclass(frozen=True)
class Metrics:
    """Numbers only (Stage 2, Stage 3 preparation, evaluation, sync)."""

    values: Mapping[str, float] = field(default_factory=dict)
    samples: int = 0

    @property
    def loss(self) -> float | None:
        return self.values.get("loss")


@dataclass(frozen=True)
class Refusal:
    """The client could not run the task (bad tensors, a result that is not finite, ...)."""

    reason: str


Reply = Update | Correlation | Metrics | Refusal


@dataclass(frozen=True)
class Usage:
    """What a task cost the client's modeled device, sent along with its reply when the scenario
    models devices (``devices:``): FLOPs it counted, the modeled compute time they take on its
    device, this host's seconds for them, how far the host lagged behind the modeled clock, and
    the energy (compute, radio) with the bytes the radio energy is for."""

    device: str
    flops: float
    compute_s: float
    host_s: float
    lag_s: float
    compute_j: float
    radio_j: float
    tx_bytes: int
    rx_bytes: int
    too_slow: bool = False

    def __post_init__(self) -> None:
        for name in ("flops", "compute_s", "host_s", "lag_s", "compute_j", "radio_j", "tx_bytes", "rx_bytes"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not 0 < len(self.device) <= 64:
            raise ValueError("device must be a name of 1..64 characters")
REPLY_TYPES: tuple[type[Reply], ...] = (Update, Correlation, Metrics, Refusal)


def reply_loss(reply: Reply) -> float | None:
    if isinstance(reply, Update):
        return reply.loss
    if isinstance(reply, Metrics):
        return reply.loss
    return None


# -- control -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hello:
    """A client announcing itself (at start, and again after its session reconnected)."""

    samples: int
    data_s: float = 0.0  # seconds it took to load its partition and build its models
    session: int = 0  # its bus connections so far, minus one: a new value means it may have missed tasks


BYE_COUNTERS = ("sent_bytes", "received_bytes", "sent_messages", "received_messages", "rejected")
BYE_TOTALS = ("duplicates", "late_replies", "reconnects", "compression_saved_bytes")


@dataclass(frozen=True)
class Bye:
    """A client's last word: its bus counters. ``counters`` maps a counter of ``BYE_COUNTERS`` to
    {message kind or rejection reason: count}; ``totals`` maps each of ``BYE_TOTALS`` to a count."""

    counters: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    totals: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.counters) - set(BYE_COUNTERS) or set(self.totals) - set(BYE_TOTALS):
            raise ValueError("unknown bye counters")
        for values in (*self.counters.values(), self.totals):
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values.values()):
                raise ValueError("bye counters must be integers >= 0")

    def flat(self) -> dict[str, int]:
        """``{"sent_bytes.model": n, ..., "duplicates": n}``, as results.json reports them."""
        out = {f"{name}.{key}": v for name, values in self.counters.items() for key, v in values.items()}
        return out | dict(self.totals)


@dataclass(frozen=True)
class Shutdown:
    """The run is over: clients send their Bye and stop."""


Control = Hello | Bye | Shutdown
Message = Task | Reply | Control


# -- what a reply must carry -------------------------------------------------------------------------
TensorSpec = tuple[tuple[int, ...], torch.dtype]


@dataclass(frozen=True)
class ReplySpec:
    """What every reply to one task must be: its type, its tensors (name -> (shape, dtype)), the
    largest sample count it may claim (0: not checked), and metrics it must carry within bounds."""

    kind: type[Update] | type[Correlation] | type[Metrics] = Metrics
    tensors: Mapping[str, TensorSpec] = field(default_factory=dict)
    sample_limit: int = 0
    metrics: Mapping[str, tuple[float, float]] = field(default_factory=dict)


def expect_like(state: Tensors) -> dict[str, TensorSpec]:
    """What a reply updating ``state`` must carry: the same names, shapes and dtypes."""
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def check_reply(spec: ReplySpec, reply: Reply) -> None:
    """Refuse a reply that is not what the task asked for (raises RejectedReply naming why).
    A :class:`Refusal` is not checked here: it is the client's own failure report."""
    if not isinstance(reply, spec.kind):
        raise RejectedReply(f"a {type(reply).__name__.lower()} reply, expected {spec.kind.__name__.lower()}")
    tensors: Tensors = {}
    if isinstance(reply, Update):
        tensors = reply.tensors
    elif isinstance(reply, Correlation):
        tensors = {"R": reply.r}
    for name, (shape, dtype) in spec.tensors.items():
        t = tensors.get(name)
        if t is None:
            raise RejectedReply(f"missing tensor '{name}'")
        if tuple(t.shape) != tuple(shape):
            raise RejectedReply(f"tensor '{name}' has shape {tuple(t.shape)}, expected {tuple(shape)}")
        if t.dtype != dtype:
            raise RejectedReply(f"tensor '{name}' is {t.dtype}, expected {dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise RejectedReply(f"tensor '{name}' is not finite")
    extra = set(tensors) - set(spec.tensors)
    if extra:
        raise RejectedReply(f"unexpected tensors {sorted(extra)[:3]}")
    samples = getattr(reply, "samples", 0)
    if spec.sample_limit and not 1 <= samples <= spec.sample_limit:
        raise RejectedReply(f"claims {samples} samples, allowed 1..{spec.sample_limit}")
    if isinstance(reply, Metrics):
        for name, (low, high) in spec.metrics.items():
            value = reply.values.get(name)
            if value is None or not low <= value <= high:
                raise RejectedReply(f"no valid {name} (got {value}, allowed {low:g}..{high:g})")
