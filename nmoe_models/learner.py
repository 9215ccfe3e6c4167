"""What one edge client computes in each stage, as plain methods: no transport, no event loop.

The in-process pipeline calls these methods directly; a networked client agent calls the very same
methods when the coordinator's messages arrive. That is what makes a networked run reproduce the
in-process one: the method is implemented once, here.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .augment import supervised_augment, two_views
from .config import ExperimentConfig
from .data import dataset_info, to_float
from .fedavg import StateDict, is_bn_buffer, select, with_prefix
from .metrics import Scores, score
from .moe import SHARED_GATE_PREFIX, Classifier, ContrastiveModel, Gate, expert
from .partition import ClientData
from .privacy import privatize, sensitivity
from .resnet import resnet20
from .train import (
    GateOptimizer,
    apply_batched,
    cosine_lr,
    fedsc_correlation,
    generator,
    seeded_init,
    train_classifier,
    train_fedsc,
    train_gate,
    train_head,
)


def build_stage1_model(exp: ExperimentConfig) -> Classifier | ContrastiveModel:
    """Stage 1's model (F + classifier head for FedCE, F + projector for FedSC), seeded."""
    info = dataset_info(exp.data.name)
    with seeded_init(exp.seed, "stage1-init"):
        features = resnet20(info.channels, exp.model.width, exp.model.channels_last)
        if exp.stage1.method == "fedce":
            return Classifier(features, exp.model.head_hidden, info.classes)
        return ContrastiveModel(features, exp.stage1.fedsc.projector)


FEATURES_PREFIX = "features."


def stage1_shared_keys(exp: ExperimentConfig, model: torch.nn.Module) -> list[str]:
    """Names FedAvg averages in Stage 1: everything, or all but BatchNorm under FedBN; FedCE with
    ``stage1.fedce.share: extractor`` (Eq. 1) averages F alone and each client keeps its head.

    The coordinator averages exactly these names and clients load exactly what it sends, so the
    names left out here are personal without any change to the protocol.
    """
    keys = list(model.state_dict())
    if exp.stage1.method == "fedce" and exp.stage1.fedce.share == "extractor":
        keys = [k for k in keys if k.startswith(FEATURES_PREFIX)]
    if exp.stage1.bn == "avg":
        return keys
    bn_modules = [name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    bn_params = {f"{name}.{p}" for name in bn_modules for p in ("weight", "bias")}
    return [k for k in keys if k not in bn_params and not is_bn_buffer(k)]


def build_gate(exp: ExperimentConfig, client_id: int) -> Gate:
    m = exp.model
    with seeded_init(exp.seed, "gate", client_id):
        return Gate(m.latent_dim, m.gate_hidden, exp.clients, m.gate_layers, m.gate_shared_layers)


class Inputs:
    """uint8 images -> model inputs: normalized, augmented (FedCE), two views (FedSC), channels-last."""

    def __init__(self, exp: ExperimentConfig, dataset: str) -> None:
        self.dataset = dataset
        self.level = exp.stage1.augment
        self.channels_last = exp.model.channels_last

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def prep(self, x: torch.Tensor) -> torch.Tensor:
        return self._layout(to_float(x, self.dataset))

    def augment(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self._layout(supervised_augment(x, self.dataset, self.level, gen))

    def views(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        v1, v0 = two_views(x, self.dataset, gen)
        return self._layout(v1), self._layout(v0)


@dataclass(frozen=True)
class FitResult:
    state: StateDict
    """The part of the local model the coordinator averages."""
    samples: int
    """FedAvg weight: the number of local samples trained on."""
    loss: float


class ClientLearner:
    """Client i's data and models: F (a copy of the global one), H_i, G_i, and stage state."""

    def __init__(self, exp: ExperimentConfig, data: ClientData) -> None:
        self.exp = exp
        self.id = data.client_id
        self.data = data
        self.classes = data.num_classes
        self.inputs = Inputs(exp, data.dataset)
        self.stage1 = build_stage1_model(exp)
        self.features = self.stage1.features
        self.shared_stage1 = stage1_shared_keys(exp, self.stage1)
        with seeded_init(exp.seed, "expert", self.id):
            self.expert = expert(exp.model.latent_dim, exp.model.head_hidden, self.classes)
        self.gate = build_gate(exp, self.id)
        self._gate_init = {k: v.clone() for k, v in self.gate.state_dict().items()}
        self._gate_opt: GateOptimizer | None = None
        self.train_latents: torch.Tensor | None = None
        self.test_latents: torch.Tensor | None = None
        self.expert_outputs: torch.Tensor | None = None  # (n_i, n, C) log-probs of every expert
        self.available: torch.Tensor | None = None  # (n,) bool
        self.expert_ready = False  # set once Stage 2 has trained H_i: only then is it served

    @property
    def ssl_images(self) -> torch.Tensor:
        """FedSC trains on labeled and unlabeled images alike."""
        if len(self.data.unlabeled_x) == 0:
            return self.data.train_x
        return torch.cat([self.data.train_x, self.data.unlabeled_x])

    # -- Stage 1 ----------------------------------------------------------------------------------
    def stage1_state(self) -> StateDict:
        keys = set(self.shared_stage1)
        return select(self.stage1.state_dict(), lambda k: k in keys)

    def load_stage1(self, state: Mapping[str, torch.Tensor]) -> None:
        load_partial(self.stage1, state)
        self.train_latents = self.test_latents = None  # they were F's outputs before this state

    def stage1_corr(self, round_index: int) -> torch.Tensor:
        """FedSC: R_i of the current (global) F over the whole local set, with DP noise."""
        s1 = self.exp.stage1.fedsc
        gen = generator(self.exp.seed, "corr", round_index, self.id)
        x = self.ssl_images
        # batch statistics: the same batches the local loss sees; eval mode: larger batches are faster
        bs = self.exp.stage1.batch_size if s1.corr_bn == "batch" else max(self.exp.stage1.batch_size, 256)
        r = fedsc_correlation(self.stage1, x, self.inputs.views, mu=s1.mu, passes=s1.corr_passes,
                              batch_size=bs, gen=gen, bn=s1.corr_bn)
        if self.exp.privacy.enabled:
            sigma = self.exp.privacy.noise_multiplier * sensitivity(s1.mu, len(x))
            r = privatize(r, sigma, noise_generator(self.exp, round_index, self.id))
        return r

    def stage1_fit(self, round_index: int, q: float = 1.0, rbar: torch.Tensor | None = None) -> FitResult:
        s1 = self.exp.stage1
        gen = generator(self.exp.seed, "stage1", round_index, self.id)
        lr = cosine_lr(s1.optim, round_index, s1.rounds)
        if s1.method == "fedce":
            loss = train_classifier(self.stage1, self.data.train_x, self.data.train_y, self.inputs.augment,
                                    epochs=s1.local_epochs, batch_size=s1.batch_size, optim=s1.optim, lr=lr, gen=gen)
            n = len(self.data.train_x)
        else:
            d = self.exp.model.latent_dim
            if rbar is not None and tuple(rbar.shape) != (d, d):
                raise ValueError(f"Rbar has shape {tuple(rbar.shape)}, expected {(d, d)}")
            x = self.ssl_images
            loss = train_fedsc(self.stage1, x, self.inputs.views, epochs=s1.local_epochs, batch_size=s1.batch_size,
                               optim=s1.optim, lr=lr, q=q, rbar=rbar, mu=s1.fedsc.mu, gen=gen)
            n = len(x)
        return FitResult(self.stage1_state(), n, loss)

    def classifier_scores(self) -> Scores:
        """FedCE: the Stage 1 end-to-end classifier (F + this client's head) on the local test set:
        the FedAvg baseline when FedCE shares everything, personal heads under share: extractor."""
        assert isinstance(self.stage1, Classifier), "only FedCE trains a classifier in Stage 1"
        if self.test_latents is not None:  # F(test) is already there after Stage 2: only the head runs
            logits = apply_batched(self.stage1.head, self.test_latents, lambda h: h)
        else:
            logits = apply_batched(self.stage1, self.data.test_x, self.inputs.prep)
        return score(logits.argmax(1), self.data.test_y, self.classes)

    # -- Stage 2 ----------------------------------------------------------------------------------
    @property
    def stage2_done(self) -> bool:
        """F's latents are cached (Stage 2 ran, or was restored, on the current F)."""
        return self.test_latents is not None

    def _cache_latents(self) -> None:
        """F(test), and F(train) only where something trains on it: the expert (Stage 2 epochs) or
        the gate (Stage 3 rounds). A job that runs neither (e.g. FedCE alone, then evaluation)
        skips ten times the forward passes it would never use."""
        uses_train = self.exp.stage2.epochs > 0 or self.exp.stage3.rounds > 0
        self.train_latents = apply_batched(self.features, self.data.train_x, self.inputs.prep) if uses_train else None
        self.test_latents = apply_batched(self.features, self.data.test_x, self.inputs.prep)

    def stage2_fit(self) -> float:
        """Cache F's latents (F frozen from now on) and train the personal expert on them."""
        s2 = self.exp.stage2
        self._cache_latents()
        if isinstance(self.stage1, Classifier) and s2.init == "head":
            self.expert.load_state_dict(self.stage1.head.state_dict())
        gen = generator(self.exp.seed, "stage2", self.id)
        self.expert_ready = False
        loss = 0.0  # what no epoch reports
        if self.train_latents is not None:
            loss = train_head(self.expert, self.train_latents, self.data.train_y, epochs=s2.epochs,
                              batch_size=s2.batch_size, optim=s2.optim, gen=gen)
        self.expert_ready = True
        return loss

    def drop_stage2(self) -> None:
        """Forget a Stage 2 this client could not have finished (its device was too slow for the
        deadline): no latents, no expert served, as if the fit had never run."""
        self.train_latents = self.test_latents = None
        self.expert_ready = False

    def restore_stage2(self, expert_state: Mapping[str, torch.Tensor]) -> None:
        """Stage 2 from a saved expert (the stage cache): F's latents again, the expert as it was."""
        self._cache_latents()
        self.expert.load_state_dict(expert_state)
        self.expert_ready = True

    @torch.no_grad()
    def expert_logprobs(self, h: torch.Tensor) -> torch.Tensor:
        """Serve H_i: latents (B, d) -> log-probabilities (B, C)."""
        self.expert.eval()
        return F.log_softmax(self.expert(h), dim=1)

    # -- Stage 3 ----------------------------------------------------------------------------------
    def set_expert_outputs(self, outputs: Mapping[int, torch.Tensor]) -> None:
        """Cache every expert's answer on the training latents (F and the experts are frozen)."""
        assert self.train_latents is not None, "Stage 2 must run before Stage 3"
        n, c = self.exp.clients, self.classes
        table = torch.zeros((len(self.train_latents), n, c))
        available = torch.zeros(n, dtype=torch.bool)
        for j, out in outputs.items():
            table[:, j] = out
            available[j] = True
        self.expert_outputs, self.available = table, available

    def reset_gate(self) -> None:
        self.gate.load_state_dict(self._gate_init)
        self._gate_opt = None

    def gate_state(self, method: str) -> StateDict:
        """What the gate shares: its ``shared.*`` layers (FedGate) or everything (FedAvg-gate)."""
        return select(self.gate.state_dict(), with_prefix(SHARED_GATE_PREFIX) if method == "fedgate" else None)

    def load_gate(self, state: Mapping[str, torch.Tensor]) -> None:
        load_partial(self.gate, state)

    def stage3_fit(self, round_index: int, shared: Mapping[str, torch.Tensor] | None, method: str) -> FitResult:
        s3 = self.exp.stage3
        assert self.train_latents is not None and self.expert_outputs is not None and self.available is not None
        if shared:
            self.load_gate(shared)
        if self._gate_opt is None or s3.reset_optimizer:
            self._gate_opt = GateOptimizer(self.gate, s3)
        gen = generator(self.exp.seed, "stage3", method, round_index, self.id)
        loss = train_gate(self.gate, self._gate_opt, self.train_latents, self.data.train_y, self.expert_outputs,
                          self.available, cfg=s3, gen=gen)
        return FitResult(self.gate_state(method), len(self.train_latents), loss)

    @torch.no_grad()
    def gate_logits(self, h: torch.Tensor) -> torch.Tensor:
        self.gate.eval()
        return self.gate(h)  # (B, n)


def noise_generator(exp: ExperimentConfig, round_index: int, client: int) -> torch.Generator:
    """Where DP noise comes from: the OS's randomness (nobody can regenerate it), unless the
    scenario asks for reproducible (and therefore removable) noise."""
    if exp.privacy.reproducible_noise:
        return generator(exp.seed, "dp-noise", round_index, client)
    return torch.Generator().manual_seed(secrets.randbits(63))


def load_partial(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a subset of a state dict, refusing unknown names and wrong shapes."""
    own = model.state_dict()
    for name, value in state.items():
        if name not in own:
            raise ValueError(f"unknown parameter '{name}' for {type(model).__name__}")
        if own[name].shape != value.shape:
            raise ValueError(f"parameter '{name}' has shape {tuple(value.shape)}, expected {tuple(own[name].shape)}")
    model.load_state_dict(dict(state), strict=False)
