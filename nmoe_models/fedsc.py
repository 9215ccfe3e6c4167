"""FedSC (Jing et al., ICML 2024): spectral contrastive learning with shared correlation matrices.

Pure functions of the paper's Eq. 3 (see PAPER_NOTES.md). Per batch of B pairs of views (z1, z0),
Z = concat(z1, z0) (2B x d), R_i = Z^T Z / (2B), Tr(R_i^+) = sum_b <z1_b, z0_b> / B. The local loss
is -Tr(R_i^+) + q_i/2 ||R_i||_F^2 + (1 - q_i) Tr(R_i Rbar_{-i}); the reference code's loss is twice
this (only the learning rate differs).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


def clip_norm(z: torch.Tensor, mu: float) -> torch.Tensor:
    """Scale each row of z (B, d) to norm at most sqrt(mu) (bounds R's DP sensitivity)."""
    limit = math.sqrt(mu)
    norms = z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return z * (limit / norms).clamp(max=1.0)


def correlation(z1: torch.Tensor, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, Tr(R^+)) of a batch of view pairs z1, z0 (B, d): R is (d, d), Tr(R^+) a scalar."""
    assert z1.shape == z0.shape and z1.dim() == 2
    b = z1.shape[0]
    z = torch.cat([z1, z0], dim=0)  # (2B, d)
    r = z.T @ z / (2 * b)  # (d, d)
    tr_plus = (z1 * z0).sum() / b
    return r, tr_plus


def fedsc_loss(z1: torch.Tensor, z0: torch.Tensor, q: float, rbar: torch.Tensor | None) -> torch.Tensor:
    """The local objective of Eq. 3 for one batch; ``rbar`` is Rbar_{-i}, fixed in the round.

    Without an Rbar (no other client has reported yet) the loss is the plain local spectral
    contrastive loss -Tr(R^+) + 1/2 ||R||_F^2, whatever q is, as in the reference code: keeping
    only q/2 ||R||^2 there would drop (1 - q) of the repulsion term and let representations grow.
    """
    r, tr_plus = correlation(z1, z0)
    if rbar is None:
        return -tr_plus + 0.5 * (r * r).sum()
    loss = -tr_plus + 0.5 * q * (r * r).sum()
    if q < 1.0:
        loss = loss + (1.0 - q) * (r * rbar).sum()  # Tr(R Rbar) with both symmetric
    return loss


def q_weights(samples: Mapping[int, int]) -> dict[int, float]:
    """The theory's q_i = n_i / n."""
    total = sum(samples.values())
    return {i: n / total for i, n in samples.items()}


def scheduled_q(round_index: int, rounds: int, q_final: float) -> float:
    """The reference code's q: linear decay from 1 at round 0 to q_final at the last round."""
    if rounds <= 1:
        return q_final
    return 1.0 + (q_final - 1.0) * round_index / (rounds - 1)


def rbar_minus(corrs: Mapping[int, torch.Tensor], q: Mapping[int, float]) -> dict[int, torch.Tensor]:
    """Rbar_{-i} = sum_{j != i} q_j R_j / (1 - q_i) for every i in ``q``.

    ``corrs`` holds the latest R_j of the clients that reported (a client that never did is left
    out of the sum; the weights are renormalized over those present so Rbar stays an average).
    """
    out: dict[int, torch.Tensor] = {}
    order = sorted(corrs)
    for i in sorted(q):
        others = [j for j in order if j != i]
        if not others:
            continue
        mass = sum(q[j] for j in others)
        acc = torch.zeros_like(corrs[others[0]], dtype=torch.float64)
        for j in others:
            acc += corrs[j].to(torch.float64) * (q[j] / mass)
        out[i] = acc.to(corrs[others[0]].dtype)
    return out
