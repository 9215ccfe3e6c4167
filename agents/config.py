"""Settings of the networked run: deadlines, participation, message encoding.

Deadlines are in seconds of the run's clock: wall-clock seconds on a direct channel, modeled
seconds when a wireless channel is emulated (the emulator scales them by its time_scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from nmoe.errors import check

from .messages import Op

MAX_CHUNK = 2 * 1024 * 1024  # well under mosquitto.conf's max_packet_size (4 MiB) with headers
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a week: longer is a typo, and would wait forever for a lost client
MAX_FAULTS = 1_000

@dataclass(frozen=True)
class FaultConfig:
    """A fault to inject into a networked run (stress tests): kill one client agent mid-task."""

    client: str
    """The agent to kill, e.g. client-2."""
    op: Op = Op.STAGE1_FIT
    """The task during which it dies (any op but sync: stage1_corr, stage1_fit, ...)."""
    round: int = 0
    """The task's round (Stage 2, Stage 3 preparation and evaluation have round 0)."""
    after_s: float = 0.5
    """Seconds after the task was sent (the agent is busy with it by then), at most a week."""
    action: Literal["kill"] = "kill"
    """kill: SIGKILL the agent's process (no goodbye: its last will marks it offline)."""

    def __post_init__(self) -> None:
        check(self.op is not Op.SYNC, "op", "a fault fires during a stage's task, not a sync")
        check(self.round >= 0, "round", "must be >= 0")
        check(0 <= self.after_s <= MAX_TIMEOUT_S, "after_s", f"must be in 0..{MAX_TIMEOUT_S:.0f} (got {self.after_s})")


@dataclass(frozen=True)
class NetworkConfig:
    """Every deadline is a finite number of seconds > 0 and at most a week (604800)."""

    join_timeout_s: float = 120.0
    """How long the coordinator waits for every client to come online (wall-clock seconds, not
    scaled by the channel's time_scale: it is about processes starting, not radio)."""
    round_timeout_s: float = 600.0
    """Deadline of one federated round (from the task's send to the last accepted reply)."""
    stage2_timeout_s: float = 600.0
    """Deadline of Stage 2 (every client trains its expert)."""
    eval_timeout_s: float = 600.0
    """Deadline of Stage 3's expert queries and of the evaluation."""
    inference_deadline_s: float = 5.0
    """Deadline of one routed latent request; a late or lost reply falls back."""
    rejected_grace_s: float = 2.0
    """How long a round still waits for a client whose reply was rejected (a genuine reply may be
    right behind a malformed one: the first valid reply counts)."""
    min_clients: int = 1
    """Fewest answers a round may close with; fewer fails the run with the list of who is missing."""
    chunk_size: int = 256 * 1024
    """Messages larger than this are split into chunks (bytes)."""
    compression: Literal["none", "fp16", "int8"] = "none"
    """Compression of float tensors on the wire (none keeps runs bit-identical to in-process)."""
    agent_threads: int = 1
    """torch threads per client agent process (several agents share the machine's cores), 1..1024."""
    coordinator_grace_s: float = 60.0
    """How long a client agent waits, once the coordinator went offline (its last will) or the
    broker cannot be reached, before it exits with an error instead of waiting forever
    (wall-clock seconds; a broker restart or a coordinator reconnecting takes far less)."""
    tls: bool = False
    """Encrypt the bus: the run's mosquitto gets a TLS-only listener with a CA and server certificate
    generated for the run (broker/tls.py), and every agent verifies it against that CA. With
    --broker, the URL must be mqtts:// (add ?ca=PATH to trust a CA of your own)."""
    faults: tuple[FaultConfig, ...] = ()
    """Faults to inject (stress tests, at most 1000), e.g. [{client: client-2, op: stage1_fit, round: 1}]."""

    def __post_init__(self) -> None:
        for name in ("join_timeout_s", "round_timeout_s", "stage2_timeout_s", "eval_timeout_s", "inference_deadline_s",
                     "coordinator_grace_s"):
            value = getattr(self, name)
            check(math.isfinite(value) and 0 < value <= MAX_TIMEOUT_S, name,
                  f"must be a finite number > 0 and <= {MAX_TIMEOUT_S:.0f} (got {value})")
        check(math.isfinite(self.rejected_grace_s) and 0 <= self.rejected_grace_s <= MAX_TIMEOUT_S,
              "rejected_grace_s", f"must be a finite number in 0..{MAX_TIMEOUT_S:.0f} (got {self.rejected_grace_s})")
        check(self.min_clients >= 1, "min_clients", "must be >= 1")
        check(4096 <= self.chunk_size <= MAX_CHUNK, "chunk_size",
               f"must be in 4096..{MAX_CHUNK} bytes (mosquitto.conf's max_packet_size is 4 MiB)")
        check(1 <= self.agent_threads <= 1024, "agent_threads", f"must be in 1..1024 (got {self.agent_threads})")
        check(len(self.faults) <= MAX_FAULTS, "faults", f"at most {MAX_FAULTS} (got {len(self.faults)})")

    def deadline_s(self, op: Op) -> float:
        """The deadline of a task of this kind, in the run's (modeled) seconds; a sync has none."""
        if op is Op.SYNC:
            return math.inf
        return {Op.STAGE2_FIT: self.stage2_timeout_s, Op.STAGE3_PREPARE: self.eval_timeout_s,
                Op.EVALUATE: self.eval_timeout_s}.get(op, self.round_timeout_s)
