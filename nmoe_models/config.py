"""The learning configuration: typed, frozen, validated on construction.

Every field is documented where it is declared. Scenario files (scenarios/) are loaded into these
dataclasses once, at the edge; invalid values raise ``ConfigError("<field>: <what is allowed>")`` and
the loader prefixes the key path. Defaults follow PAPER_NOTES.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from nmoe.errors import check

# Upper bounds: far above any experiment a CPU (or one GPU) finishes, far below what exhausts memory
# or never ends. A value past one is a typo (an extra zero, a pasted number), refused before any work.
MAX_ROUNDS = 10_000
MAX_EPOCHS = 10_000
MAX_PER_CLIENT = 100_000  # samples per client (Fashion-MNIST has 60,000 in all)
MAX_SYNTHETIC = 200_000  # the synthetic pool: about 160 MB as uint8, 630 MB while generated
MAX_BATCH = 65_536
MAX_HIDDEN = 8_192
MAX_LAYERS = 16
MAX_SEED = 2**32 - 1
MAX_THREADS = 1_024


def _finite(x: float) -> bool:
    return math.isfinite(x)

DatasetName = Literal["fashion_mnist", "cifar10", "synthetic"]
Baseline = Literal["local", "fedavg", "centralized", "fedavg_gate"]


@dataclass(frozen=True)
class DataConfig:
    name: DatasetName = "fashion_mnist"
    """Dataset: Fashion-MNIST (1x28x28), CIFAR-10 (3x32x32) or a seeded synthetic set (1x28x28)."""
    root: str | None = None
    """An extra folder to look in; the search order is $NMOE_DATA, ./data, this, then the system
    folder (/usr/share/datasets/fashion-mnist from Debian's dataset-fashion-mnist)."""
    download: bool = False
    """Let torchvision download the dataset when no local copy is found (needs internet)."""
    synthetic_train: int = 6000
    """Synthetic only: size of the generated training pool (test pool is half of it), 10..200,000."""

    def __post_init__(self) -> None:
        check(10 <= self.synthetic_train <= MAX_SYNTHETIC, "synthetic_train",
              f"must be in 10..{MAX_SYNTHETIC} (got {self.synthetic_train})")


@dataclass(frozen=True)
class PartitionConfig:
    kind: Literal["iid", "noniid", "dirichlet"] = "noniid"
    """iid; the paper's non-IID(tau); or Dirichlet(beta) label proportions."""
    tau: float = 0.2
    """non-IID share of the non-dominant classes: client i's class i mod C holds 1 - tau."""
    beta: float = 0.5
    """Dirichlet concentration (smaller is more skewed)."""
    train_per_client: int = 1000
    """Labeled training samples per client (paper: 1000), 1..100,000."""
    test_per_client: int = 1000
    """Test samples per client, drawn from the dataset's test split (paper: 1000), 1..100,000."""
    test_distribution: Literal["same", "iid"] = "same"
    """'same': test with the client's class proportions (setup a); 'iid': uniform classes (setup b)."""
    unlabeled_per_client: int = 0
    """Extra unlabeled training samples per client for FedSC (paper: 4000), 0..100,000."""

    def __post_init__(self) -> None:
        check(0.0 <= self.tau <= 1.0, "tau", f"must be in [0, 1] (got {self.tau})")
        check(_finite(self.beta) and self.beta > 0, "beta", f"must be a finite number > 0 (got {self.beta})")
        for name in ("train_per_client", "test_per_client", "unlabeled_per_client"):
            low = 0 if name == "unlabeled_per_client" else 1
            value = getattr(self, name)
            check(low <= value <= MAX_PER_CLIENT, name, f"must be in {low}..{MAX_PER_CLIENT} (got {value})")


@dataclass(frozen=True)
class ModelConfig:
    width: int = 1
    """ResNet20 width multiplier: latents are 64 * width wide (1: about 0.27M parameters)."""
    head_hidden: int = 128
    """Hidden width of the 4-layer MLPs (experts and the classifier head), 1..8192."""
    gate_hidden: int = 64
    """Hidden width of the gate MLP, 1..8192."""
    gate_layers: int = 4
    """Linear layers in the gate; the last one is the local decision layer (1..16)."""
    gate_shared_layers: int = 3
    """FedGate shares the first this-many gate layers (paper: 3 of 4)."""
    channels_last: bool = True
    """Run convolutions in channels-last memory format (about 1.7x faster on x86 CPUs)."""

    def __post_init__(self) -> None:
        check(1 <= self.width <= 16, "width", f"must be in 1..16 (got {self.width})")
        for name, top in (("head_hidden", MAX_HIDDEN), ("gate_hidden", MAX_HIDDEN), ("gate_layers", MAX_LAYERS)):
            value = getattr(self, name)
            check(1 <= value <= top, name, f"must be in 1..{top} (got {value})")
        check(0 <= self.gate_shared_layers < self.gate_layers, "gate_shared_layers",
              f"must be in 0..gate_layers-1 = {self.gate_layers - 1} (got {self.gate_shared_layers})")

    @property
    def latent_dim(self) -> int:
        return 64 * self.width


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "adam"
    """Optimizer. Adam is the default: within the few hundred local steps a CPU run affords, it
    reached 0.56-0.58 Fashion-MNIST accuracy where SGD (lr 0.05, momentum 0.9) reached 0.33-0.34
    (ResNet20, 1000 samples, 3 epochs); the FedSC reference's SGD recipe is one setting away."""
    lr: float = 1e-3
    """Learning rate."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 0.0
    """Weight decay (L2 for sgd/adam, decoupled for adamw)."""
    cosine: bool = False
    """Cosine-anneal the learning rate over the stage's rounds (FedSC reference)."""
    grad_clip: float = 0.0
    """Clip the gradient norm to this value (0: off; FedSC reference: 3)."""

    def __post_init__(self) -> None:
        check(_finite(self.lr) and self.lr > 0, "lr", f"must be a finite number > 0 (got {self.lr})")
        check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1) (got {self.momentum})")
        check(_finite(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
              f"must be a finite number >= 0 (got {self.weight_decay})")
        check(_finite(self.grad_clip) and self.grad_clip >= 0, "grad_clip",
              f"must be a finite number >= 0 (got {self.grad_clip})")


@dataclass(frozen=True)
class FedSCConfig:
    mu: float = 4.0
    """Representations are clipped to norm <= sqrt(mu); also bounds the DP sensitivity."""
    q: Literal["proportional", "schedule"] = "proportional"
    """q_i = n_i / n (theory), or the reference code's linear decay from 1 to q_final."""
    q_final: float = 0.2
    """Final q of the 'schedule' option."""
    corr_passes: int = 1
    """Augmented passes over the local set when computing the shared R_i (1..100)."""
    corr_bn: Literal["batch", "running"] = "batch"
    """BatchNorm while computing the shared R_i: 'batch' normalizes by each batch's statistics
    (train mode, batches of stage1.batch_size, running statistics untouched), as the local loss
    computes its R_i, so Tr(R_i Rbar_{-i}) compares like with like; 'running' uses eval mode
    with the FedAvg-averaged running statistics (the behaviour before, kept to reproduce it)."""
    projector: bool = True
    """Train with a projector MLP (latent -> 2x -> latent) that is dropped after Stage 1."""

    def __post_init__(self) -> None:
        check(_finite(self.mu) and self.mu > 0, "mu", f"must be a finite number > 0 (got {self.mu})")
        check(0 < self.q_final <= 1, "q_final", "must be in (0, 1]")
        check(1 <= self.corr_passes <= 100, "corr_passes", f"must be in 1..100 (got {self.corr_passes})")


def _check_loop(rounds: int, local_epochs: int, batch_size: int) -> None:
    check(0 <= rounds <= MAX_ROUNDS, "rounds", f"must be in 0..{MAX_ROUNDS} (got {rounds})")
    check(1 <= local_epochs <= MAX_EPOCHS, "local_epochs", f"must be in 1..{MAX_EPOCHS} (got {local_epochs})")
    check(2 <= batch_size <= MAX_BATCH, "batch_size",
          f"must be in 2..{MAX_BATCH} (BatchNorm needs two samples; got {batch_size})")


@dataclass(frozen=True)
class FedCEConfig:
    share: Literal["all", "extractor"] = "all"
    """What FedCE averages: the whole classifier, F and head ('all', plain FedAvg), or only F
    ('extractor': the paper's Eq. 1, each client keeping a personal head, which then seeds its
    Stage 2 expert under stage2.init: head)."""


@dataclass(frozen=True)
class Stage1Config:
    method: Literal["fedce", "fedsc"] = "fedsc"
    """How the shared feature extractor F is trained."""
    rounds: int = 20
    """Federated rounds, 0..10,000."""
    local_epochs: int = 1
    """Local epochs per round, 1..10,000."""
    batch_size: int = 64
    """Mini-batch size, 2..65,536."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Local optimizer (state resets each round, as in FedAvg)."""
    augment: Literal["none", "weak", "strong"] = "weak"
    """Augmentation of the supervised training (FedCE, and the local, FedAvg and centralized
    baselines): none, weak (pad-and-crop + flip) or strong (one SSL view: resized crop, colour
    jitter, flip, grayscale; the paper's Fig. 5 compares FedSC against FedCE with strong)."""
    bn: Literal["avg", "local"] = "avg"
    """BatchNorm under FedAvg: average statistics by name ('avg') or keep them local (FedBN)."""
    fedsc: FedSCConfig = field(default_factory=FedSCConfig)
    """FedSC settings (method: fedsc)."""
    fedce: FedCEConfig = field(default_factory=FedCEConfig)
    """FedCE settings (method: fedce)."""

    def __post_init__(self) -> None:
        _check_loop(self.rounds, self.local_epochs, self.batch_size)


@dataclass(frozen=True)
class Stage2Config:
    epochs: int = 10
    """Epochs of expert training on F's latents (F frozen), 0..10,000."""
    batch_size: int = 64
    """Mini-batch size, 2..65,536."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(name="adamw", lr=1e-3, weight_decay=1e-4))
    """Expert optimizer."""
    init: Literal["fresh", "head"] = "head"
    """FedCE only: start the expert from the Stage 1 head ('head') or from scratch."""

    def __post_init__(self) -> None:
        check(0 <= self.epochs <= MAX_EPOCHS, "epochs", f"must be in 0..{MAX_EPOCHS} (got {self.epochs})")
        check(2 <= self.batch_size <= MAX_BATCH, "batch_size",
              f"must be in 2..{MAX_BATCH} (the expert's BatchNorm needs two samples; got {self.batch_size})")


@dataclass(frozen=True)
class Stage3Config:
    method: Literal["fedgate", "fedavg"] = "fedgate"
    """FedGate shares the gate's first layers only; FedAvg-gate shares every layer."""
    rounds: int = 10
    """Federated rounds, 0..10,000."""
    local_epochs: int = 1
    """Local epochs per round, 1..10,000."""
    batch_size: int = 64
    """Mini-batch size, 2..65,536."""
    optimizer: Literal["muon", "adamw"] = "muon"
    """'muon': torch.optim.Muon on 2-D weights plus AdamW on the rest; 'adamw': AdamW on all."""
    lr: float = 1e-3
    """AdamW learning rate."""
    muon_lr: float = 0.02
    """Muon learning rate."""
    weight_decay: float = 1e-4
    """Weight decay of both optimizers."""
    grad_norm: Literal["layer", "global", "none"] = "layer"
    """Gradient normalization: divide each tensor's (or the whole) gradient by its norm."""
    noise_std: float = 1.0
    """Std of the Gaussian noise added to gate logits while training (noisy top-k)."""
    train_top_k: int = 0
    """Experts mixed in the training loss (0: all, dense; else 2..clients); inference uses eval.top_k.
    1 is refused: a softmax over one expert is the constant 1, so the gate would get no gradient."""
    reset_optimizer: bool = False
    """Reset optimizer state every round (default keeps it: the decision layer is local)."""

    def __post_init__(self) -> None:
        _check_loop(self.rounds, self.local_epochs, self.batch_size)
        for name in ("lr", "muon_lr"):
            value = getattr(self, name)
            check(_finite(value) and value > 0, name, f"must be a finite number > 0 (got {value})")
        for name in ("weight_decay", "noise_std"):
            value = getattr(self, name)
            check(_finite(value) and value >= 0, name, f"must be a finite number >= 0 (got {value})")
        check(self.train_top_k >= 0, "train_top_k", f"must be 0 (all experts) or >= 2 (got {self.train_top_k})")
        check(self.train_top_k != 1, "train_top_k",
              "1 gives the gate zero gradient (a softmax over one expert is constant); "
              "use 0 (all experts, dense) or 2..clients")


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = True
    """Add symmetric Gaussian noise to each shared correlation matrix R_i (FedSC only)."""
    noise_multiplier: float = 1.0
    """sigma = noise_multiplier * sensitivity, with sensitivity = sqrt(2) * mu / n_i (see privacy.py)."""
    delta: float = 1e-5
    """delta of the reported (epsilon, delta) guarantee."""
    reproducible_noise: bool = False
    """Draw the noise from the scenario's seed, so that runs are bit-reproducible. INSECURE: anyone
    holding the scenario file can regenerate and subtract the noise. Off: fresh OS randomness."""

    def __post_init__(self) -> None:
        check(_finite(self.noise_multiplier) and self.noise_multiplier > 0, "noise_multiplier",
              f"must be a finite number > 0 (got {self.noise_multiplier})")
        check(0 < self.delta < 1, "delta", "must be in (0, 1)")


@dataclass(frozen=True)
class EvalConfig:
    top_k: int = 1
    """Experts each test sample is routed to (paper: 1)."""
    combine: Literal["probs", "logits"] = "probs"
    """How the chosen experts' answers are mixed: 'probs', y = sum_j G_j softmax(H_j) (the mixture
    the gate is trained for), or 'logits', y = softmax(sum_j G_j H_j) as the paper writes y'. Both
    are the same prediction under top-1 routing."""
    batch_size: int = 256
    """Inference batch size, 1..65,536."""
    routing: Literal["topk", "deadline"] = "topk"
    """'topk': route each row to its top-k experts whatever their links; 'deadline': a client predicts
    each chosen expert's response time (link presets, rates measured on recent replies,
    availability, the expert's device) and swaps an expert that would miss
    network.inference_deadline_s for the next-best by gate score, or serves the row locally
    (agents/routing.py). In process (no network) the two are the same."""
    every_round: bool = False
    """Also evaluate the NMoE (the same serverless Evaluate step, through the same fleet) after each
    Stage 3 round but the last (whose point is the final evaluation), and record its accuracy against
    the modeled clock: results.json's ``curve``. The evaluations' own time is not on that clock."""
    target_accuracy: float | None = None
    """With every_round: the accuracy (mean over clients, 0..1] whose first reaching gives
    ``curve.time_to_target_s``, the modeled seconds of training until then (null: not reached)."""

    def __post_init__(self) -> None:
        check(self.top_k >= 1, "top_k", "must be >= 1")
        check(1 <= self.batch_size <= MAX_BATCH, "batch_size", f"must be in 1..{MAX_BATCH} (got {self.batch_size})")
        if self.target_accuracy is not None:
            check(0 < self.target_accuracy <= 1, "target_accuracy",
                  f"must be a number in (0, 1] (got {self.target_accuracy!r})")
            check(self.every_round, "target_accuracy", "needs eval.every_round: true (it is read from the curve)")


@dataclass(frozen=True)
class AggregationConfig:
    """How the coordinator combines the clients' updates, in every federated stage (Stage 1 and 3)."""

    method: Literal["fedavg", "norm_bounded", "median", "trimmed_mean"] = "fedavg"
    """fedavg: sample-weighted mean (the paper's); norm_bounded: FedAvg of updates whose difference
    from the round's start is clipped to clip_factor x the round's median; median: coordinate-wise
    median; trimmed_mean: coordinate-wise mean without the trim fraction at each end."""
    outlier_factor: float = 3.0
    """Reject (as 'rejected: outlier ...') an update whose difference from the round's start is over
    this many times the round's median difference (needs >= 3 updates; 0: off). Honest updates of a
    round were within 2.2x of their median in every run measured; a x1000 or sign-flipped one was
    over 3.3x in Stage 1."""
    reject_reversed: bool = True
    """Reject an update whose parameters point away from the round's start (cosine < 0: a sign flip).
    Honest updates measured 0.66..0.998."""
    clip_factor: float = 2.0
    """norm_bounded: the clip, in multiples of the round's median difference."""
    trim: float = 0.25
    """trimmed_mean: fraction of the values cut at each end, per coordinate (at least one is kept)."""

    def __post_init__(self) -> None:
        check(math.isfinite(self.outlier_factor) and (self.outlier_factor == 0 or self.outlier_factor >= 1),
              "outlier_factor", f"must be 0 (off) or a finite number >= 1 (got {self.outlier_factor})")
        check(math.isfinite(self.clip_factor) and self.clip_factor > 0, "clip_factor",
              f"must be a finite number > 0 (got {self.clip_factor})")
        check(0 <= self.trim < 0.5, "trim", f"must be in [0, 0.5) (got {self.trim})")


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything the learning needs; a scenario adds the network around it."""

    seed: int = 0
    """Seeds data partitions, initializations, augmentations and noise (0..2**32-1)."""
    clients: int = 10
    """Number of edge clients N (each holds one expert)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Dataset."""
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    """How the dataset is split across clients."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model sizes."""
    stage1: Stage1Config = field(default_factory=Stage1Config)
    """Stage 1: feature extractor (FedCE or FedSC)."""
    stage2: Stage2Config = field(default_factory=Stage2Config)
    """Stage 2: personal experts."""
    stage3: Stage3Config = field(default_factory=Stage3Config)
    """Stage 3: gates (FedGate or FedAvg-gate)."""
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    """Differential privacy of FedSC's shared correlation matrices."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Top-k inference."""
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    """How updates are combined (FedAvg by default, with outlier screening)."""
    baselines: tuple[Baseline, ...] = ()
    """Baselines to run beside NMoE: local, fedavg (end-to-end classifier), centralized (MoE),
    fedavg_gate (the NMoE pipeline again with a FedAvg gate)."""
    threads: int = 0
    """torch intra-op threads in this process (0: one per available core; at most 1024)."""

    def __post_init__(self) -> None:
        check(0 <= self.seed <= MAX_SEED, "seed", f"must be in 0..{MAX_SEED} (got {self.seed})")
        check(1 <= self.clients <= 1000, "clients", f"must be in 1..1000 (got {self.clients})")
        check(self.eval.top_k <= self.clients, "eval.top_k",
              f"must be <= clients = {self.clients} (got {self.eval.top_k})")
        check(0 <= self.threads <= MAX_THREADS, "threads", f"must be in 0..{MAX_THREADS} (got {self.threads})")
        check(self.stage3.train_top_k <= self.clients, "stage3.train_top_k",
              f"must be <= clients = {self.clients} (got {self.stage3.train_top_k})")
        check(len(set(self.baselines)) == len(self.baselines), "baselines", "has duplicates")
