"""The topic scheme: every MQTT topic of a run is built and parsed here, nowhere else.

All topics live under ``nmoe/<run_id>/``:

- ``tx/<src>/<dst>/<kind>``: what a sender puts on the air when a channel emulator is in the path.
- ``rx/<dst>/<src>/<kind>``: what a receiver hears. The src segment is there so that the broker's
  ACL authenticates the sender in direct mode (an agent may only write ``rx/+/<own id>/#``).
- ``held/<dst>/<src>/<kind>``: a body the sender routed straight to the receiver, held there until
  the channel emulator releases it (``channel.relay: headers``, broker/held.py); the ACL lets an
  agent write only ``held/+/<own id>/#``.
- ``status/<agent>``: retained ``online`` / ``offline`` (offline is the MQTT last will).

``dst`` is an agent id or ``all`` (broadcast). Agent ids match ``^[a-z][a-z0-9_-]{0,31}$`` and
``all`` is reserved; run ids match ``^[A-Za-z0-9_-]{1,64}$``.
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass
from typing import Literal

from nmoe.errors import WireError

ROOT = "nmoe"
BROADCAST = "all"
AGENT_ID_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
RUN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

Direction = Literal["tx", "rx", "held"]


class Kind(str, enum.Enum):
    """What a message carries; the last segment of every tx/rx topic."""

    MODEL = "model"  # global weights down
    UPDATE = "update"  # weights up
    CORR = "corr"  # correlation matrices up, their aggregate down
    LATENT = "latent"  # routed latents (a request)
    LOGITS = "logits"  # expert replies, tied to their request by message id
    CTRL = "ctrl"  # stage and round commands (content in header meta)
    METRICS = "metrics"  # measurements (content in header meta)

    def __str__(self) -> str:
        return self.value


class Status(str, enum.Enum):
    """Payload of the retained ``status/<agent>`` topic."""

    ONLINE = "online"
    OFFLINE = "offline"

    def __str__(self) -> str:
        return self.value


def is_agent_id(value: object) -> bool:
    """True for a valid agent id (``all`` is reserved and is not one)."""
    return isinstance(value, str) and value != BROADCAST and AGENT_ID_RE.fullmatch(value) is not None


def is_destination(value: object) -> bool:
    """True for an agent id or the broadcast destination ``all``."""
    return value == BROADCAST or is_agent_id(value)


def is_run_id(value: object) -> bool:
    return isinstance(value, str) and RUN_ID_RE.fullmatch(value) is not None


def check_agent_id(value: object, what: str = "agent id") -> str:
    """Return ``value`` if it is a valid agent id, else raise WireError('bad_topic')."""
    if not is_agent_id(value):
        raise WireError("bad_topic", f"invalid {what} {value!r}")
    assert isinstance(value, str)
    return value


def parse_kind(value: object) -> Kind:
    """The Kind named by ``value`` (a Kind or its string), else WireError('bad_topic')."""
    try:
        return Kind(value)
    except ValueError:
        raise WireError("bad_topic", f"unknown kind {value!r}") from None


@dataclass(frozen=True)
class ParsedTopic:
    """A validated tx or rx topic. ``dst`` may be ``all``; ``src`` never is."""

    direction: Direction
    src: str
    dst: str
    kind: Kind

    def __post_init__(self) -> None:
        if self.direction not in ("tx", "rx", "held"):
            raise WireError("bad_topic", f"unknown direction {self.direction!r}")
        check_agent_id(self.src, "source")
        if not is_destination(self.dst):
            raise WireError("bad_topic", f"invalid destination {self.dst!r}")
        object.__setattr__(self, "kind", parse_kind(self.kind))

    @property
    def is_broadcast(self) -> bool:
        return self.dst == BROADCAST


@functools.lru_cache(maxsize=4096)  # a run uses few distinct topics, each many times
def _parse(run_id: str, topic: str) -> ParsedTopic:
    parts = topic.split("/")
    if len(parts) != 6 or parts[0] != ROOT or parts[1] != run_id:
        raise WireError("bad_topic", f"not a message topic of run {run_id}: {topic!r}")
    direction = parts[2]
    if direction == "tx":
        return ParsedTopic("tx", src=parts[3], dst=parts[4], kind=parse_kind(parts[5]))
    if direction == "rx":
        return ParsedTopic("rx", src=parts[4], dst=parts[3], kind=parse_kind(parts[5]))
    if direction == "held":
        return ParsedTopic("held", src=parts[4], dst=parts[3], kind=parse_kind(parts[5]))
    raise WireError("bad_topic", f"unknown direction in {topic!r}")


def _build(run_id: str, direction: Direction, src: str, dst: str, kind: Kind | str) -> str:
    """A tx, rx or held topic, its parts checked once per distinct topic (WireError('bad_topic'))."""
    try:
        return _build_checked(run_id, direction, src, dst, kind)
    except TypeError:  # an unhashable part: not an id at all
        raise WireError("bad_topic", f"invalid topic parts {src!r}, {dst!r}, {kind!r}"[:200]) from None


@functools.lru_cache(maxsize=4096)  # built for every frame a session sends or a hold buffer frees
def _build_checked(run_id: str, direction: Direction, src: str, dst: str, kind: Kind | str) -> str:
    p = ParsedTopic(direction, src, dst, parse_kind(kind))
    first, second = (p.src, p.dst) if direction == "tx" else (p.dst, p.src)
    return f"{ROOT}/{run_id}/{direction}/{first}/{second}/{p.kind.value}"


@dataclass(frozen=True)
class Topics:
    """Builders and the parser for the topics of one run.

    >>> t = Topics("demo")
    >>> t.rx("coordinator", "client-0", Kind.UPDATE)
    'nmoe/demo/rx/coordinator/client-0/update'
    >>> t.parse("nmoe/demo/rx/coordinator/client-0/update")
    ParsedTopic(direction='rx', src='client-0', dst='coordinator', kind=<Kind.UPDATE: 'update'>)
    """

    run_id: str

    def __post_init__(self) -> None:
        if not is_run_id(self.run_id):
            raise WireError("bad_topic", f"invalid run id {self.run_id!r}")

    @property
    def prefix(self) -> str:
        return f"{ROOT}/{self.run_id}"

    # -- builders -------------------------------------------------------------------------------
    def tx(self, src: str, dst: str, kind: Kind | str) -> str:
        """What ``src`` puts on the air for ``dst`` (emulated channel)."""
        return _build(self.run_id, "tx", src, dst, kind)

    def rx(self, dst: str, src: str, kind: Kind | str) -> str:
        """What ``dst`` hears from ``src``."""
        return _build(self.run_id, "rx", src, dst, kind)

    def held(self, dst: str, src: str, kind: Kind | str) -> str:
        """Where ``src`` puts a body for ``dst`` that waits for the channel's release."""
        return _build(self.run_id, "held", src, dst, kind)

    def status(self, agent: str) -> str:
        return f"{self.prefix}/status/{check_agent_id(agent)}"

    # -- subscription filters -------------------------------------------------------------------
    def inbox_filters(self, agent: str) -> tuple[str, str]:
        """What an agent subscribes: its own inbox and the broadcast inbox."""
        return (f"{self.prefix}/rx/{check_agent_id(agent)}/#", f"{self.prefix}/rx/{BROADCAST}/#")

    def held_filters(self, agent: str) -> tuple[str, str]:
        """The held bodies an agent receives: its own and broadcast ones."""
        return (f"{self.prefix}/held/{check_agent_id(agent)}/#", f"{self.prefix}/held/{BROADCAST}/#")

    def tx_filter(self) -> str:
        """Everything put on the air (the channel emulator's subscription)."""
        return f"{self.prefix}/tx/#"

    def rx_filter(self) -> str:
        return f"{self.prefix}/rx/#"

    def status_filter(self) -> str:
        return f"{self.prefix}/status/#"

    # -- parsers --------------------------------------------------------------------------------
    def parse(self, topic: str) -> ParsedTopic:
        """Parse a tx, rx or held topic of this run, else raise WireError('bad_topic')."""
        if not isinstance(topic, str):
            raise WireError("bad_topic", f"not a topic: {topic!r}")
        return _parse(self.run_id, topic)

    def parse_status(self, topic: str) -> str:
        """The agent id of a ``status/<agent>`` topic, else raise WireError('bad_topic')."""
        parts = topic.split("/") if isinstance(topic, str) else []
        if len(parts) != 4 or parts[:3] != [ROOT, self.run_id, "status"]:
            raise WireError("bad_topic", f"not a status topic of run {self.run_id}: {topic!r}")
        return check_agent_id(parts[3])

    def relay(self, parsed: ParsedTopic, dst: str | None = None) -> str:
        """The rx topic the channel emulator republishes a tx topic on (``dst`` for broadcasts)."""
        if parsed.direction != "tx":
            raise WireError("bad_topic", "only tx topics are relayed")
        target = dst if dst is not None else parsed.dst
        return self.rx(target, parsed.src, parsed.kind)
