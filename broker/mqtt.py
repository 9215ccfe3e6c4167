"""Small facts about MQTT result codes, shared by every client of the bus (agents and the channel)."""

from __future__ import annotations

import aiomqtt

AUTH_FAILURES = frozenset({4, 5, 134, 135})  # CONNACK: bad user name or password / not authorized (3.1.1, 5)


def reason_code(code: object) -> int:
    """A SUBACK/CONNACK result as an int (paho gives ints on MQTT 3.1.1 and ReasonCodes on 5)."""
    value = getattr(code, "value", code)
    return int(value) if isinstance(value, int) else 0x80


def refused_credentials(err: aiomqtt.MqttError) -> bool:
    """Whether the broker refused the connection for its user name or password."""
    return isinstance(err, aiomqtt.MqttCodeError) and reason_code(err.rc) in AUTH_FAILURES


def refused_subscriptions(filters: list[str], granted: object) -> list[str]:
    """The filters a SUBACK refused (granted QoS >= 0x80)."""
    codes = list(granted) if isinstance(granted, (list, tuple)) else []
    return [f for f, code in zip(filters, codes, strict=False) if reason_code(code) >= 0x80]
