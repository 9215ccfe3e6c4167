"""Edge devices: how fast a client computes and how much power it draws, independent of this host.

A scenario's ``devices:`` section gives every client a :class:`DeviceProfile` (a preset, a mixed
fleet drawn from the seed, per-client overrides). A client agent then counts the FLOPs of what it
ran (``agents.compute``) and models its compute time as FLOPs / the device's effective throughput,
so a Raspberry Pi and a server differ by what they are, not by how loaded this machine happens to be.

The values are *representative* effective throughputs of PyTorch fp32 training and inference of
small CNNs and MLPs (what this project runs), not peak figures; each preset's docstring says where
its numbers come from. Effective throughput is a share of peak: small convolutions and MLPs in
eager PyTorch commonly reach 5-20 % of a CPU's peak and less of a GPU's; as a check, this
project's ResNet-20 Stage 1 step runs at ~30 GFLOP/s on one core of the x86 host it was built on.

==============  ==========  ==========  ========  ======  ==========================================
preset          train       inference   active    idle    hardware
==============  ==========  ==========  ========  ======  ==========================================
server          4000 GF/s   8000 GF/s   300 W     60 W    a data-centre GPU server (A100 class)
laptop          60 GF/s     120 GF/s    28 W      4 W     a 4-core laptop CPU
jetson-nano     25 GF/s     50 GF/s     10 W      1.3 W   NVIDIA Jetson Nano, 10 W mode, its GPU
phone           8 GF/s      16 GF/s     3.5 W     0.4 W   a mid-range phone's CPU, thermally limited
raspberry-pi-4  3 GF/s      6 GF/s      6.4 W     2.7 W   Raspberry Pi 4 Model B, 4x Cortex-A72
==============  ==========  ==========  ========  ======  ==========================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Literal, get_args

import numpy as np

from nmoe.errors import check

DeviceName = Literal["server", "laptop", "jetson-nano", "phone", "raspberry-pi-4"]
DEVICE_NAMES: tuple[str, ...] = get_args(DeviceName)
MAX_GFLOPS = 1e7  # 10 PFLOP/s effective: more is a typo
MAX_WATTS = 1e4
SHARE_TOLERANCE = 1e-6


@dataclass(frozen=True)
class DeviceProfile:
    """One client's hardware: effective throughputs (GFLOP/s) and power draw (W)."""

    train_gflops: float
    """Effective training throughput: FLOPs of forward + backward passes per second, in GFLOP/s."""
    infer_gflops: float
    """Effective inference throughput (forward passes only: latents, correlation, expert queries)."""
    active_w: float
    """Power drawn while computing, whole board, watts."""
    idle_w: float
    """Power drawn while idle (waiting for the radio or the next task), watts."""

    def __post_init__(self) -> None:
        for name in ("train_gflops", "infer_gflops"):
            v = getattr(self, name)
            check(math.isfinite(v) and 0 < v <= MAX_GFLOPS, name, f"must be a number in (0, {MAX_GFLOPS:g}] (got {v})")
        for name in ("active_w", "idle_w"):
            v = getattr(self, name)
            check(math.isfinite(v) and 0 <= v <= MAX_WATTS, name, f"must be a number in 0..{MAX_WATTS:g} (got {v})")

    def seconds(self, flops: float, kind: Literal["train", "infer"]) -> float:
        """Modeled seconds to compute ``flops`` floating-point operations of this kind."""
        rate = self.train_gflops if kind == "train" else self.infer_gflops
        return flops / (rate * 1e9)


SERVER = DeviceProfile(train_gflops=4000.0, infer_gflops=8000.0, active_w=300.0, idle_w=60.0)
"""A GPU server: NVIDIA A100 PCIe (19.5 TFLOP/s fp32 peak, 250 W TDP, NVIDIA's datasheet) plus its
host. Small models use a GPU poorly: ~20 % of the fp32 peak in training, ~40 % in inference. Active
300 W (GPU at TDP and the host's share), idle 60 W (GPU idle ~50 W, host)."""

LAPTOP = DeviceProfile(train_gflops=60.0, infer_gflops=120.0, active_w=28.0, idle_w=4.0)
"""A 4-core laptop CPU, e.g. Intel Core i7-1185G7 (28 W TDP, Intel ARK; AVX2 FMA peak ~600 GFLOP/s
fp32 at 4.8 GHz turbo). Effective: two cores' worth of the ~30 GFLOP/s one x86 core reached on this
project's ResNet-20 (eager PyTorch rarely scales small convolutions over all cores); inference 2x
training (no backward pass, no optimizer). Active at its TDP, idle ~4 W (screen off)."""

JETSON_NANO = DeviceProfile(train_gflops=25.0, infer_gflops=50.0, active_w=10.0, idle_w=1.3)
"""NVIDIA Jetson Nano (NVIDIA's datasheet: 128-core Maxwell GPU, 472 GFLOP/s fp16, i.e. 236 fp32
peak; power modes 5 W and 10 W). Effective ~10 % of the fp32 peak for training small models,
~20 % for inference; active 10 W (its 10 W mode), idle ~1.3 W (commonly measured at the barrel jack)."""

PHONE = DeviceProfile(train_gflops=8.0, infer_gflops=16.0, active_w=3.5, idle_w=0.4)
"""A mid-range phone training on its CPU (e.g. PyTorch Mobile / ExecuTorch on Cortex-A7x cores).
Sustained performance is thermally limited to ~3-4 W of SoC power; effective training throughput
a few GFLOP/s to ~10 (on-device training papers report seconds per batch for ResNet-class models);
idle 0.4 W with the screen off."""

RASPBERRY_PI_4 = DeviceProfile(train_gflops=3.0, infer_gflops=6.0, active_w=6.4, idle_w=2.7)
"""Raspberry Pi 4 Model B (4x Cortex-A72 at 1.5 GHz; NEON peak ~48 GFLOP/s fp32). PyTorch on it
reaches a few GFLOP/s on small convolutions; 3 for training, 6 for inference. Power: 2.7 W idle and
6.4 W with all four cores loaded, as measured by Raspberry Pi reviewers (e.g. Tom's Hardware's and
RasPi.TV's Pi 4 power tests) at the USB-C input."""

PRESETS: dict[str, DeviceProfile] = {"server": SERVER, "laptop": LAPTOP, "jetson-nano": JETSON_NANO,
                                     "phone": PHONE, "raspberry-pi-4": RASPBERRY_PI_4}


@dataclass(frozen=True)
class DeviceOverrides:
    """One client's device: a preset (optional) and fields overriding it (None: inherit)."""

    preset: DeviceName | None = None
    """Start from this preset instead of the one the scenario (preset or mix) gives the client."""
    train_gflops: float | None = None
    """See DeviceProfile.train_gflops."""
    infer_gflops: float | None = None
    """See DeviceProfile.infer_gflops."""
    active_w: float | None = None
    """See DeviceProfile.active_w."""
    idle_w: float | None = None
    """See DeviceProfile.idle_w."""

    def __post_init__(self) -> None:
        check(self.preset is None or self.preset in DEVICE_NAMES, "preset",
              f"unknown device preset {self.preset!r}; presets: {', '.join(DEVICE_NAMES)}")
        probe = replace(LAPTOP, **self.changes())  # the same bounds as a complete profile
        del probe

    def changes(self) -> dict[str, float]:
        names = {f.name for f in fields(DeviceProfile)}
        return {k: v for k in names if (v := getattr(self, k)) is not None}


@dataclass(frozen=True)
class DevicesConfig:
    """The scenario's ``devices:`` section. Empty (the default): no device model, a client computes
    at this host's speed. A client's device is, later wins: ``preset`` (every client) or its draw
    from ``mix`` <- ``clients.<id>`` (its own preset, then its own fields)."""

    preset: DeviceName | None = None
    """Every client's device: server, laptop, jetson-nano, phone, raspberry-pi-4."""
    mix: dict[str, float] = field(default_factory=dict)
    """A mixed fleet: preset -> share of the clients, shares summing to 1, e.g.
    {raspberry-pi-4: 0.5, jetson-nano: 0.3, laptop: 0.2}. Each preset gets its share of the clients
    rounded by largest remainder, and which client gets which is a permutation drawn from the seed."""
    clients: dict[str, DeviceOverrides] = field(default_factory=dict)
    """Per-client device, keyed by agent id (e.g. client-3: {preset: raspberry-pi-4})."""
    seed: int | None = None
    """Seed of the mix's draw (0..2**32-1); None uses the scenario's seed."""

    def __post_init__(self) -> None:
        check(self.preset is None or self.preset in DEVICE_NAMES, "preset",
              f"unknown device preset {self.preset!r}; presets: {', '.join(DEVICE_NAMES)}")
        check(not (self.preset is not None and self.mix), "mix", "give either preset (every client) or mix, not both")
        for name, share in self.mix.items():
            check(name in DEVICE_NAMES, f"mix.{name}", f"unknown device preset; presets: {', '.join(DEVICE_NAMES)}")
            check(math.isfinite(share) and 0 <= share <= 1, f"mix.{name}", f"a share must be in 0..1 (got {share})")
        if self.mix:
            total = sum(self.mix.values())
            check(abs(total - 1.0) <= SHARE_TOLERANCE, "mix", f"shares must sum to 1 (got {total:g})")
        check(self.seed is None or 0 <= self.seed <= 2**32 - 1, "seed", f"must be in 0..{2**32 - 1} (got {self.seed})")

    @property
    def enabled(self) -> bool:
        return self.preset is not None or bool(self.mix) or bool(self.clients)


@dataclass(frozen=True)
class Device:
    """A client's resolved device: the preset it came from (or 'custom') and its profile."""

    name: str
    profile: DeviceProfile


def mix_counts(mix: dict[str, float], n: int) -> dict[str, int]:
    """How many of ``n`` clients each preset gets: largest remainder (Hamilton), ties by preset order."""
    quotas = {k: v * n for k, v in mix.items()}
    counts = {k: int(math.floor(q)) for k, q in quotas.items()}
    left = n - sum(counts.values())
    order = sorted(mix, key=lambda k: (-(quotas[k] - counts[k]), DEVICE_NAMES.index(k)))
    for k in order[:left]:
        counts[k] += 1
    return counts


def assign(cfg: DevicesConfig, clients: int, seed: int) -> dict[int, Device] | None:
    """Every client's device (None when the scenario models none). Pure and deterministic: the same
    config, client count and seed always give the same assignment."""
    if not cfg.enabled:
        return None
    base: list[str | None] = [cfg.preset] * clients
    if cfg.mix:
        names = [k for k, c in mix_counts(cfg.mix, clients).items() for _ in range(c)]
        rng = np.random.default_rng(np.random.SeedSequence(cfg.seed if cfg.seed is not None else seed,
                                                           spawn_key=(0x6465766963,)))  # "devic"
        base = [names[int(j)] for j in rng.permutation(clients)]
    out: dict[int, Device] = {}
    for i in range(clients):
        own = cfg.clients.get(f"client-{i}", DeviceOverrides())
        name = own.preset or base[i]
        if name is None:  # only some clients given a device: the others keep this host's speed
            if not own.changes():
                continue
            raise ValueError(f"clients.client-{i}: give a preset (no scenario-wide preset or mix to start from)")
        profile = replace(PRESETS[name], **own.changes())
        out[i] = Device(name if not own.changes() else f"{name}*", profile)
    return out
