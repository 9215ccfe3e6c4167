"""The wireless channel: a SimPy model of the radio links between agents (see model.py).

The model is pure (no MQTT): ``ChannelModel`` takes messages and returns Delivery/Drop records in
modeled time; ``RealtimeDriver`` runs it from an asyncio loop; the emulator on the bus uses both.
"""

from broker.channel.clock import RealtimeDriver
from broker.channel.config import (
    ChannelConfig,
    ClientOverrides,
    DirectionOverrides,
    LinkOverrides,
    LinkParams,
    RadioProfile,
)
from broker.channel.model import ChannelModel, Delivery, Drop, LinkStats, Result
from broker.channel.presets import PRESETS, resolve_profile
from broker.topics import BROADCAST

__all__ = [
    "BROADCAST",
    "PRESETS",
    "ChannelConfig",
    "ChannelModel",
    "ClientOverrides",
    "Delivery",
    "DirectionOverrides",
    "Drop",
    "LinkOverrides",
    "LinkParams",
    "LinkStats",
    "RadioProfile",
    "RealtimeDriver",
    "Result",
    "resolve_profile",
]
