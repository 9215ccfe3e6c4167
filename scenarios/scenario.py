"""A scenario: the experiment plus the network around it, loaded from YAML once, at the edge."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from agents.config import NetworkConfig
from agents.devices import DevicesConfig
from agents.messages import Op
from broker.channel import ChannelConfig
from nmoe.errors import ConfigError, check
from nmoe_models.config import ExperimentConfig

from . import yamlload
from .schema import apply_overrides, build

PACKAGED = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Scenario(ExperimentConfig):
    """Top level of a scenario file: every ExperimentConfig key plus the ones below."""

    name: str = ""
    """Scenario name (runs/<name>/...); defaults to the file name."""
    description: str = ""
    """One line shown at the start of a run."""
    network: NetworkConfig = field(default_factory=NetworkConfig)
    """Deadlines and participation of networked runs."""
    channel: ChannelConfig = field(default_factory=lambda: ChannelConfig(model="direct"))
    """The wireless channel between the agents: direct (none), or an emulated model (presets ideal,
    wifi, lte, edge-poor; per-client overrides; time_scale)."""
    until: Literal["stage2", "done"] = "done"
    """Where the run stops: 'done' (every stage and the evaluation) or 'stage2' (Stage 1, then Stage 2:
    the experts trained and the FedCE classifier scored, no Stage 3 and no NMoE evaluation). Stage 3
    starts with an all-to-all exchange of latents, n(n-1) requests: scale tests of 1000 clients stop
    before it (bench/scale.py)."""
    devices: DevicesConfig = field(default_factory=DevicesConfig)
    """The clients' hardware (presets server, laptop, jetson-nano, phone, raspberry-pi-4; a mix drawn
    from the seed; per-client overrides): networked runs then model compute time from FLOPs and
    report energy. Empty: clients compute at this host's speed."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check(bool(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.name)), "name",
              f"must be 1-64 letters, digits, '_' or '-' (got {self.name!r})")
        check(self.network.min_clients <= self.clients, "network.min_clients",
              f"must be <= clients = {self.clients} (got {self.network.min_clients})")
        for i, fault in enumerate(self.network.faults):
            where = f"network.faults[{i}]"
            check(fault.client in {f"client-{i}" for i in range(self.clients)}, f"{where}.client",
                  f"{fault.client!r} is not a client of this scenario (client-0 .. client-{self.clients - 1})")
            check(fault.op is not Op.STAGE1_CORR or self.stage1.method == "fedsc", f"{where}.op",
                  "stage1_corr only happens with stage1.method: fedsc")
            rounds = {Op.STAGE1_CORR: self.stage1.rounds, Op.STAGE1_FIT: self.stage1.rounds,
                      Op.STAGE3_FIT: self.stage3.rounds}.get(fault.op, 1)
            check(fault.round < rounds, f"{where}.round",
                  f"{fault.op.value} has rounds 0..{rounds - 1} here (got {fault.round}): the fault would never fire")
        for agent, own in self.devices.clients.items():
            check(agent in {f"client-{i}" for i in range(self.clients)}, f"devices.clients.{agent}",
                  f"is not a client of this scenario (client-0 .. client-{self.clients - 1})")
            check(own.preset is not None or self.devices.preset is not None or bool(self.devices.mix),
                  f"devices.clients.{agent}.preset", "give a preset: there is no devices.preset or devices.mix "
                  "to start from")
        for agent in self.channel.clients:
            check(agent in {f"client-{i}" for i in range(self.clients)}, f"channel.clients.{agent}",
                  f"is not a client of this scenario (client-0 .. client-{self.clients - 1})")


def resolve_path(spec: str) -> Path:
    """A scenario file path, or the name of one shipped in scenarios/ (e.g. 'quickstart')."""
    path = Path(spec)
    if path.is_file():
        return path
    for candidate in (PACKAGED / spec, PACKAGED / f"{spec}.yaml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.stem for p in PACKAGED.glob("*.yaml"))) or "none"
    raise ConfigError(f"scenario file not found: {spec} (shipped scenarios: {shipped})")


def read_yaml(path: Path) -> dict[str, Any]:
    """The scenario file as a mapping: bounded, strict UTF-8, strict YAML (scenarios/yamlload.py).

    An empty file (or one of comments only) is refused: a run with every default from a file that
    says nothing is far more likely a mistake (a wrong path, a truncated copy) than a wish; ``{}``
    says "every default" explicitly and is accepted.
    """
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from err
    data = yamlload.read(str(path), raw)
    if data is None:
        raise ConfigError(f"{path}: the file is empty; write at least one key (or {{}} for every default), "
                          "e.g. copy a shipped scenario (nmoe scenarios)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def load_scenario(spec: str, overrides: list[str] | None = None) -> Scenario:
    """Load, override (--set key.path=value) and validate a scenario; errors name the key path."""
    path = resolve_path(spec)
    data = apply_overrides(read_yaml(path), overrides or [])
    data.setdefault("name", path.stem)
    try:
        return build(Scenario, data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err
