"""Local training loops of every stage: plain functions over models and uint8 image tensors.

Every random draw comes from a ``torch.Generator`` derived from (seed, purpose, round, client), so
a client's computation is the same whichever process runs it and in whatever order.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import OptimConfig, Stage3Config
from .fedavg import is_bn_buffer
from .fedsc import clip_norm, correlation, fedsc_loss
from .moe import mixture_nll, topk_weights

Batches = Iterator[torch.Tensor]
Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
Views = Callable[[torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def derive_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed for (seed, *keys); stable across processes and Python versions."""
    digest = hashlib.blake2b(repr((seed, *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(seed: int, *keys: object) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *keys))


_GLOBAL_RNG = threading.Lock()


@contextmanager
def seeded_init(seed: int, *keys: object) -> Iterator[None]:
    """Seed torch's global RNG (used by nn.Module initializers) inside the block, then restore it.

    The global RNG is process-wide, so agents building models in parallel threads take turns.
    """
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, *keys))
        yield


def batches(n: int, batch_size: int, gen: torch.Generator, drop_last: bool = False) -> Batches:
    """Shuffled index batches over range(n); the last short batch is kept unless drop_last."""
    perm = torch.randperm(n, generator=gen)
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = perm[start : start + batch_size]
        if len(idx) >= (2 if drop_last else 1):
            yield idx


Opt = TypeVar("Opt", bound=torch.optim.Optimizer)


@functools.cache
def eager(cls: type[Opt]) -> type[Opt]:
    """``cls`` without torch.compile's guards: the same update, bit for bit, without importing
    ``torch._dynamo``.

    torch.optim wraps ``step``, ``zero_grad``, ``add_param_group`` (which ``__init__`` calls) and
    the state-dict methods in functions whose first call imports torch's compiler front end, only
    to tell it where a graph breaks. Nothing here compiles, and that import costs every process
    that trains 1.1 s of CPU on this 2-core machine (far more on a Raspberry Pi), ~80 MB of heap
    and ~70 MB of mapped files; in the agent host it was the critical path of a run's start-up.
    This subclass calls the functions inside those wrappers (``inspect.unwrap``: torch wraps them
    with ``functools.wraps``), with gradients off as ``_use_grad_for_differentiable`` turns them
    off; ``Optimizer.__init__`` still adds its step hooks and profiler range to the new ``step``.
    ``tests/test_train.py`` checks both halves: no import, and the same parameters and state as
    torch's class after 12 steps.
    """
    namespace: dict[str, Any] = {
        name: inspect.unwrap(getattr(cls, name))
        for name in ("add_param_group", "zero_grad", "state_dict", "load_state_dict")
    }
    raw_step = inspect.unwrap(cls.step)

    def step(self: torch.optim.Optimizer, closure: Callable[[], float] | None = None) -> float | None:
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))):
            return raw_step(self, closure)

    namespace |= {"step": step, "__module__": __name__, "__qualname__": f"eager.{cls.__name__}"}
    return type(cls.__name__, (cls,), namespace)


def make_optimizer(params: list[nn.Parameter], cfg: OptimConfig, lr: float | None = None) -> torch.optim.Optimizer:
    lr = cfg.lr if lr is None else lr
    if cfg.name == "sgd":
        return eager(torch.optim.SGD)(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    adam = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return eager(adam)(params, lr=lr, weight_decay=cfg.weight_decay)


def cosine_lr(cfg: OptimConfig, round_index: int, rounds: int) -> float:
    if not cfg.cosine or rounds <= 1:
        return cfg.lr
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * round_index / rounds))


def optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params: list[nn.Parameter], clip: float) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        nn.utils.clip_grad_norm_(params, clip)
    opt.step()


def run_epochs(n: int, *, epochs: int, batch_size: int, gen: torch.Generator,
               step: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Shuffled mini-batch epochs over n samples; ``step(idx)`` takes one optimizer step on those
    rows and returns its loss. Returns the mean loss of the last epoch."""
    last = 0.0
    for _ in range(epochs):
        total, seen = 0.0, 0
        for idx in batches(n, batch_size, gen, drop_last=True):
            total += float(step(idx).detach()) * len(idx)
            seen += len(idx)
        last = total / max(seen, 1)
    return last


def train_classifier(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, prep: Transform, *, epochs: int, batch_size: int,
    optim: OptimConfig, lr: float, gen: torch.Generator,
) -> float:
    """Cross-entropy training of an end-to-end classifier; ``prep`` turns uint8 batches into inputs.

    Returns the mean training loss of the last epoch.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optim, lr)

    def step(idx: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(model(prep(x[idx], gen)), y[idx])
        optimizer_step(opt, loss, params, optim.grad_clip)
        return loss

    try:
        return run_epochs(len(x), epochs=epochs, batch_size=batch_size, gen=gen, step=step)
    finally:
        opt.zero_grad(set_to_none=True)  # a model's gradients are as big as the model: not kept between tasks


def train_fedsc(
    model: nn.Module, x: torch.Tensor, views: Views,
    *, epochs: int, batch_size: int, optim: OptimConfig, lr: float, q: float, rbar: torch.Tensor | None, mu: float,
    gen: torch.Generator,
) -> float:
    """FedSC local training (Eq. 3) on the unlabeled or labeled images ``x``; returns the last loss."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optim, lr)

    def step(idx: torch.Tensor) -> torch.Tensor:
        v1, v0 = views(x[idx], gen)
        z = clip_norm(model(torch.cat([v1, v0])), mu)  # one pass over both views: (2B, d)
        z1, z0 = z.chunk(2)
        loss = fedsc_loss(z1, z0, q, rbar)
        optimizer_step(opt, loss, params, optim.grad_clip)
        return loss

    try:
        return run_epochs(len(x), epochs=epochs, batch_size=batch_size, gen=gen, step=step)
    finally:
        opt.zero_grad(set_to_none=True)  # a model's gradients are as big as the model: not kept between tasks


@contextmanager
def batch_statistics(model: nn.Module) -> Iterator[None]:
    """Run ``model`` with train-mode BatchNorm (each batch normalized by its own statistics) and
    leave its running statistics exactly as they were."""
    saved = {k: v.clone() for k, v in model.state_dict().items() if is_bn_buffer(k)}
    model.train()
    try:
        yield
    finally:
        model.load_state_dict(saved, strict=False)


@torch.no_grad()
def fedsc_correlation(
    model: nn.Module, x: torch.Tensor, views: Views,
    *, mu: float, passes: int, batch_size: int, gen: torch.Generator, bn: Literal["batch", "running"] = "batch",
) -> torch.Tensor:
    """R_i over the whole local set: the mean of z z^T over every view of every sample and pass.

    ``bn: batch`` (default) computes z as the local loss does: BatchNorm in train mode, batches of
    about ``batch_size`` (never smaller: the remainder joins the others), running statistics left
    untouched. The shared R_j then measures the same representation as the R_i it is compared
    with in Eq. 3's Tr(R_i Rbar_{-i}); eval mode would normalize with FedAvg-averaged running
    statistics, which under non-IID data describe no client's features. ``bn: running`` is that
    eval-mode computation (the behaviour before this was made consistent).
    """
    acc: torch.Tensor | None = None
    count = 0
    if bn == "running":
        model.eval()
        chunks = [torch.arange(s, min(s + batch_size, len(x))) for s in range(0, len(x), batch_size)]
    else:
        chunks = list(torch.arange(len(x)).tensor_split(max(1, len(x) // batch_size)))
    with batch_statistics(model) if bn == "batch" else nullcontext():
        for _ in range(passes):
            for idx in chunks:
                v1, v0 = views(x[idx], gen)
                z = clip_norm(model(torch.cat([v1, v0])), mu)
                z1, z0 = z.chunk(2)
                r, _ = correlation(z1, z0)
                part = r * (2 * len(z1))  # sum of z z^T in this batch
                acc = part if acc is None else acc + part
                count += 2 * len(z1)
    assert acc is not None, "fedsc_correlation needs at least one sample"
    return acc / count


@torch.no_grad()
def apply_batched(
    module: nn.Module, x: torch.Tensor, prep: Callable[[torch.Tensor], torch.Tensor], batch_size: int = 512
) -> torch.Tensor:
    """module(prep(x)) over x in batches, in eval mode: latents F(x) (N, d), or a classifier's logits."""
    module.eval()
    return torch.cat([module(prep(x[s : s + batch_size])) for s in range(0, len(x), batch_size)])


def train_head(
    head: nn.Module, h: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, optim: OptimConfig,
    gen: torch.Generator,
) -> float:
    """Cross-entropy training of an expert on cached latents (F frozen); returns the last loss."""
    head.train()
    params = list(head.parameters())
    opt = make_optimizer(params, optim)

    def step(idx: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(head(h[idx]), y[idx])
        optimizer_step(opt, loss, params, optim.grad_clip)
        return loss

    return run_epochs(len(h), epochs=epochs, batch_size=batch_size, gen=gen, step=step)


class GateOptimizer:
    """Muon on the gate's 2-D weights (torch.optim.Muon), AdamW on the rest (biases), with
    per-tensor or global gradient normalization applied before each step."""

    def __init__(self, gate: nn.Module, cfg: Stage3Config) -> None:
        self.cfg = cfg
        self.params = [p for p in gate.parameters() if p.requires_grad]
        matrices = [p for p in self.params if p.dim() == 2]
        others = [p for p in self.params if p.dim() != 2]
        self.opts: list[torch.optim.Optimizer] = []
        if cfg.optimizer == "muon" and matrices:
            self.opts.append(eager(torch.optim.Muon)(matrices, lr=cfg.muon_lr, weight_decay=cfg.weight_decay))
            rest = others
        else:
            rest = self.params
        if rest:
            self.opts.append(eager(torch.optim.AdamW)(rest, lr=cfg.lr, weight_decay=cfg.weight_decay))

    def step(self, loss: torch.Tensor) -> None:
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.cfg.grad_norm == "layer":
            for g in grads:
                g.div_(g.norm().clamp_min(1e-12))
        elif self.cfg.grad_norm == "global":
            total = torch.sqrt(sum((g * g).sum() for g in grads)).clamp_min(1e-12)  # type: ignore[arg-type]
            for g in grads:
                g.div_(total)
        for opt in self.opts:
            opt.step()


def train_gate(
    gate: nn.Module, opt: GateOptimizer, h: torch.Tensor, y: torch.Tensor, expert_logprobs: torch.Tensor,
    available: torch.Tensor, *, cfg: Stage3Config, gen: torch.Generator,
) -> float:
    """Gate training on cached latents and cached expert outputs (F and every H_j frozen).

    h (N, d); expert_logprobs (N, n, C); available (n,) bool marks experts that answered (others
    get -inf gate logits). Noisy top-k over ``cfg.train_top_k`` experts (0: all), mixture NLL.
    """
    gate.train()
    n = expert_logprobs.shape[1]
    mask = torch.where(available, 0.0, float("-inf"))  # (n,)
    k = min(cfg.train_top_k or n, int(available.sum()))

    def step(idx: torch.Tensor) -> torch.Tensor:
        w = topk_weights(gate(h[idx]) + mask, k, cfg.noise_std, gen)
        loss = mixture_nll(w, expert_logprobs[idx], y[idx])
        opt.step(loss)
        return loss

    return run_epochs(len(h), epochs=cfg.local_epochs, batch_size=cfg.batch_size, gen=gen, step=step)
