"""The paper's reference points, trained in one process (they involve no federation).

- local: each client trains F + head on its own data only.
- centralized: one MoE (F, n experts, one gate) trained jointly on the union of all clients'
  training data, evaluated on each client's test set with the same top-k routing (upper bound).
Both get the compute budget of Stage 1 (rounds x local epochs passes over the data), and the
end-to-end FedAvg classifier is FedCE's Stage 1 (see agents.strategy).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .config import ExperimentConfig
from .learner import Inputs
from .metrics import Scores, score
from .moe import CentralizedMoE, Classifier, Gate, combine, mixture_nll, topk_weights
from .partition import ClientData
from .resnet import resnet20
from .train import (
    apply_batched,
    batches,
    cosine_lr,
    generator,
    make_optimizer,
    optimizer_step,
    seeded_init,
    train_classifier,
)

OnEpoch = Callable[[int, int], None]


def _epochs(exp: ExperimentConfig) -> int:
    return max(1, exp.stage1.rounds * exp.stage1.local_epochs)


def new_local_model(exp: ExperimentConfig, data: ClientData) -> Classifier:
    """Client ``data.client_id``'s local classifier (F + head) at its seeded initialization."""
    with seeded_init(exp.seed, "local-init", data.client_id):
        return Classifier(resnet20(data.image_shape[0], exp.model.width, exp.model.channels_last),
                          exp.model.head_hidden, data.num_classes)


def train_local(exp: ExperimentConfig, data: ClientData) -> Classifier:
    """Client ``data.client_id`` alone: F + head trained on its own data, with Stage 1's budget."""
    s1 = exp.stage1
    model = new_local_model(exp, data)
    gen = generator(exp.seed, "local", data.client_id)
    train_classifier(model, data.train_x, data.train_y, Inputs(exp, data.dataset).augment, epochs=_epochs(exp),
                     batch_size=s1.batch_size, optim=s1.optim, lr=s1.optim.lr, gen=gen)
    return model


def score_local(exp: ExperimentConfig, model: Classifier, data: ClientData) -> Scores:
    logits = apply_batched(model, data.test_x, Inputs(exp, data.dataset).prep)
    return score(logits.argmax(1), data.test_y, data.num_classes)


def local_classifier(exp: ExperimentConfig, data: ClientData) -> Scores:
    """Client ``data.client_id`` alone: F + head trained on its data, scored on its test set."""
    return score_local(exp, train_local(exp, data), data)


def new_centralized(exp: ExperimentConfig, channels: int, num_classes: int) -> CentralizedMoE:
    """The centralized MoE (F, n experts, one gate) at its seeded initialization."""
    m = exp.model
    with seeded_init(exp.seed, "centralized-init"):
        features = resnet20(channels, m.width, m.channels_last)
        gate = Gate(m.latent_dim, m.gate_hidden, exp.clients, m.gate_layers, m.gate_shared_layers)
        return CentralizedMoE(features, m.head_hidden, num_classes, exp.clients, gate)


def train_centralized(
    exp: ExperimentConfig, union: ClientData, progress: OnEpoch | None = None
) -> tuple[CentralizedMoE, torch.optim.Optimizer]:
    """Train one MoE (F, n experts, one gate) end to end on ``union``; returns it and its optimizer.

    One optimizer lives for the whole training, so Adam's moments (or SGD's momentum) carry over
    from epoch to epoch as in any centralized training; a fresh optimizer per epoch would weaken
    the upper bound. The learning rate follows Stage 1's schedule, stepped once per epoch:
    cosine annealing over all epochs when ``stage1.optim.cosine`` is set, constant otherwise, so
    the baseline and the federated methods it bounds share one recipe.
    """
    s1 = exp.stage1
    inputs = Inputs(exp, union.dataset)
    model = new_centralized(exp, union.image_shape[0], union.num_classes)
    params = list(model.parameters())
    gen = generator(exp.seed, "centralized")
    k = exp.stage3.train_top_k or exp.clients
    epochs = _epochs(exp)
    opt = make_optimizer(params, s1.optim)
    model.train()
    for epoch in range(epochs):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(s1.optim, epoch, epochs)
        for idx in batches(len(union.train_x), s1.batch_size, gen, drop_last=True):
            h = model.features(inputs.augment(union.train_x[idx], gen))  # (B, d)
            w = topk_weights(model.gate(h), k, exp.stage3.noise_std, gen)  # (B, n)
            loss = mixture_nll(w, model.expert_logprobs(h), union.train_y[idx])
            optimizer_step(opt, loss, params, s1.optim.grad_clip)
        if progress is not None:
            progress(epoch + 1, epochs)
    model.eval()
    return model, opt


def centralized_moe(
    exp: ExperimentConfig, union: ClientData, tests: Mapping[int, ClientData], progress: OnEpoch | None = None
) -> dict[int, Scores]:
    """Train one MoE on ``union`` end to end; score top-k routing on every client's test set."""
    model, _ = train_centralized(exp, union, progress)
    return score_centralized(exp, model, tests)


def score_centralized(exp: ExperimentConfig, model: CentralizedMoE,
                      tests: Mapping[int, ClientData]) -> dict[int, Scores]:
    """Top-k routing (``eval``'s k and combination) of the centralized MoE on every client's test set."""
    model.eval()
    out: dict[int, Scores] = {}
    with torch.no_grad():
        for i, data in sorted(tests.items()):
            h = apply_batched(model.features, data.test_x, Inputs(exp, data.dataset).prep)
            probs = combine(topk_weights(model.gate(h), exp.eval.top_k), model.expert_logprobs(h), exp.eval.combine)
            out[i] = score(probs.argmax(1), data.test_y, data.num_classes)
    return out
