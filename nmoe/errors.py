"""The project's one error hierarchy (like aiomqtt's exceptions.py), with no dependencies.

Errors are translated at boundaries: ``raise WireError(...) from err``. The CLI prints any
NmoeError as a one-line message telling the user what to do, and exits with status 2.

    NmoeError
    ├── ConfigError      a scenario file or setting is invalid (also a ValueError)
    ├── DataError        a dataset is missing or a partition request is impossible
    ├── BrokerError      the MQTT broker could not be started, reached or stopped
    ├── WireError        a message on the bus is malformed (``reason`` is a counter key)
    │   └── ProtocolError  a well-formed message that is not a valid stage-protocol message
    ├── RejectedReply    a reply that does not carry what its task asked for
    ├── TaskError        a client cannot run a task (it answers with the reason)
    ├── BusError         the bus session failed (connect, publish, request deadline)
    └── ChannelError     the wireless channel emulator failed or is misconfigured
"""

from __future__ import annotations


class NmoeError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(NmoeError, ValueError):
    """A scenario file or setting is invalid; the message names the key path."""


class DataError(NmoeError):
    """A dataset is missing or a partition request is impossible; the message says what to do."""


class BrokerError(NmoeError):
    """The MQTT broker could not be started, reached or stopped."""


class WireError(NmoeError):
    """A message on the bus is malformed; ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ProtocolError(WireError):
    """A message that decoded but is not a valid message of the stage protocol (unknown op, a
    missing or mistyped field); counted under ``reason`` like any other rejected message."""


class RejectedReply(NmoeError):
    """A reply that does not carry what its task asked for (tensors, shapes, sample count)."""


class TaskError(NmoeError):
    """A client cannot run a task (out of order, tensors that do not fit its model, a result that
    is not finite); it answers with a Refusal carrying this message and keeps serving."""


class BusError(NmoeError):
    """The bus session failed (connect, publish or request deadline)."""


class ChannelError(NmoeError):
    """The wireless channel emulator failed or is misconfigured."""


def check(ok: bool, name: str, msg: str) -> None:
    """Raise the ConfigError a config class's ``__post_init__`` uses: '<field>: <msg>'; the scenario
    loader prefixes the key path."""
    if not ok:
        raise ConfigError(f"{name}: {msg}")
