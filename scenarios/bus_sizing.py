"""Bus settings of one agent in a run, with reassembly limits sized from the model's real size."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from agents.bus import BusConfig
from broker.auth import BrokerAddress, ChannelMode
from broker.held import HoldLimits
from broker.wire import ReassemblyLimits
from nmoe_models.learner import build_gate, build_stage1_model

from .scenario import Scenario

_LARGEST: dict[tuple[object, ...], int] = {}


def largest_message_bytes(scn: Scenario) -> int:
    """Bytes of the largest tensor message of the run: the Stage 1 model or a gate (whole), or
    Stage 3's latents of a client's training set, whichever is largest.

    Remembered per process by what it depends on: building the models to count their bytes is
    21 ms, two fifths of an agent's start-up, and 1000 agents of one process would each pay it."""
    key = (scn.data.name, scn.model, scn.stage1, scn.clients, scn.partition.train_per_client)
    if key not in _LARGEST:
        _LARGEST[key] = _largest_message_bytes(scn)
    return _LARGEST[key]


def _largest_message_bytes(scn: Scenario) -> int:
    def size(state: Mapping[str, torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in state.values())

    stage1 = size(build_stage1_model(scn).state_dict())
    gate = size(build_gate(scn, -1).state_dict())
    latents = scn.partition.train_per_client * scn.model.latent_dim * 4
    return max(stage1, gate, latents)


def bus_config(scn: Scenario, run_id: str, agent_id: str, address: BrokerAddress) -> BusConfig:
    mode: ChannelMode = "emulated" if scn.channel.model == "emulated" else "direct"
    largest = int(largest_message_bytes(scn) * 1.25)  # headers, chunk frames and safetensors metadata
    default = ReassemblyLimits()
    # per sender: room for two of its largest messages at once (a retry behind a lost one); in all
    # (the backstop, in bytes and in messages): every client's plus the coordinator's, so honest
    # senders never hit it: a round's updates all arrive at once (100 clients' chunked updates
    # overran the fixed 64-message backstop and the round waited for updates it had dropped)
    per_source = max(default.max_pending_bytes_per_source, 2 * largest)
    senders = scn.clients + 1
    limits = ReassemblyLimits(max_message_bytes=max(default.max_message_bytes, 2 * largest),
                              max_pending_bytes_per_source=per_source,
                              max_pending_messages=max(default.max_pending_messages,
                                                       senders * default.max_pending_per_source),
                              max_pending_bytes=max(default.max_pending_bytes, senders * per_source))
    # held bodies (relay: headers) wait at the receiver as reassembly does: the same budget per sender
    hold = HoldLimits(max_bytes_per_source=per_source)
    return BusConfig(run_id, agent_id, address, channel_mode=mode, relay=scn.channel.relay,
                     held_min_bytes=scn.channel.held_min_bytes,
                     chunk_size=scn.network.chunk_size, compression=scn.network.compression, limits=limits,
                     hold=hold)
