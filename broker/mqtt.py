"""What every client of the bus shares (agents and the channel emulator): result codes, and the
connection loop that reconnects with backoff."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

import aiomqtt

from broker.auth import BrokerAddress
from nmoe.errors import NmoeError

log = logging.getLogger(__name__)

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


async def stay_connected(
    client: aiomqtt.Client,
    *,
    who: str,
    address: BrokerAddress,
    on_connect: Callable[[bool], Awaitable[None]],
    on_message: Callable[[aiomqtt.Message], None],
    connected: asyncio.Event,
    closing: Callable[[], bool],
    initial_s: float,
    max_s: float,
    config_error: type[NmoeError],
) -> NmoeError | None:
    """Connect, run ``on_connect(reconnected)``, read; on a lost broker retry with jittered
    exponential backoff (aiomqtt's Client is reusable by entering ``async with`` again).

    Returns when ``closing()`` turns true (None) or on a fault that retrying cannot mend (the
    error to report): credentials refused at the first connection, or a ``config_error`` raised
    by ``on_connect`` (e.g. a refused subscription: configuration, not weather).
    """
    backoff = initial_s
    ever_connected = False
    while not closing():
        try:
            async with client:
                await on_connect(ever_connected)
                if ever_connected:
                    log.info("%s reconnected to %s", who, address.redacted())
                ever_connected = True
                backoff = initial_s
                connected.set()
                async for message in client.messages:
                    on_message(message)
        except aiomqtt.MqttError as err:
            connected.clear()
            if closing():
                return None
            if refused_credentials(err) and not ever_connected:
                return config_error(f"broker refused the credentials ({err})")
            log.warning("%s lost the broker (%s); retrying in %.2fs", who, err, backoff)
        except config_error as err:
            connected.clear()
            return err
        await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
        backoff = min(backoff * 2, max_s)
    return None
