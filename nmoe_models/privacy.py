"""Differential privacy of FedSC's shared correlation matrices.

Each client releases R_i once per round, computed over its n_i local samples (labeled and
unlabeled) with representations clipped to norm sqrt(mu) and averaged over augmented passes.
Replacing one sample changes 2P rank-one terms z z^T (P passes, two views) out of 2 n_i P, and for
PSD terms ||a a^T - b b^T||_F <= sqrt(2) mu, so the Frobenius sensitivity is sqrt(2) mu / n_i.
The Gaussian mechanism adds symmetric noise (Dwork et al.'s "Analyze Gauss": i.i.d. N(0, sigma^2)
on the upper triangle and diagonal, mirrored) with sigma = noise_multiplier * sensitivity; the
upper-triangle vector's L2 change is at most the Frobenius change, so this is (conservatively)
the Gaussian mechanism with that noise multiplier. Rounds compose through an RDP accountant
(Google's dp-accounting). Only the correlation matrices are protected, as in the paper: model
weights shared by FedAvg are not.
"""

from __future__ import annotations

import math

import torch


def sensitivity(mu: float, n_samples: int) -> float:
    """Frobenius L2 sensitivity of R_i to replacing one of the client's n_samples samples."""
    return math.sqrt(2.0) * mu / n_samples


def symmetric_gaussian(dim: int, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """A (dim, dim) symmetric matrix, upper triangle and diagonal i.i.d. N(0, sigma^2)."""
    a = torch.randn((dim, dim), generator=generator, dtype=torch.float32) * sigma
    upper = torch.triu(a)
    return upper + torch.triu(a, diagonal=1).T


def privatize(r: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    return r + symmetric_gaussian(r.shape[0], sigma, generator).to(r.dtype)


def epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """(epsilon, delta)-DP of ``releases`` Gaussian releases with this noise multiplier (RDP)."""
    if releases <= 0:
        return 0.0
    import dp_accounting  # imported on first use: it pulls in scipy (0.6 s at start-up)
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    event = dp_accounting.GaussianDpEvent(noise_multiplier=noise_multiplier)
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, releases))
    return float(accountant.get_epsilon(delta))
