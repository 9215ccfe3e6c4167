"""The project's tiny error hierarchy (like aiomqtt's exceptions.py).

Errors are translated at boundaries: ``raise WireError(...) from err``. The CLI prints any
NmoeError as a one-line message telling the user what to do, and exits with status 2.
"""

from __future__ import annotations


class NmoeError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(NmoeError):
    """A scenario file or setting is invalid; the message names the key path."""


class BrokerError(NmoeError):
    """The MQTT broker could not be started, reached or stopped."""


class WireError(NmoeError):
    """A message on the bus is malformed; ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class BusError(NmoeError):
    """The bus session failed (connect, publish or request deadline)."""


class ChannelError(NmoeError):
    """The wireless channel emulator failed or is misconfigured."""
