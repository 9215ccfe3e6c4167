"""Accuracy and macro-F1, per client and averaged over clients (the paper's two figures)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Scores:
    accuracy: float
    f1_macro: float
    samples: int


def score(pred: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, classes: int) -> Scores:
    p = np.asarray(pred).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"score: {p.shape[0]} predictions for {y.shape[0]} labels")
    if y.size == 0:
        return Scores(0.0, 0.0, 0)
    from sklearn.metrics import f1_score  # imported on first use: it costs 0.6 s at start-up

    acc = float((p == y).mean())
    f1 = float(f1_score(y, p, labels=list(range(classes)), average="macro", zero_division=0))
    return Scores(acc, f1, int(y.size))


def average(per_client: Mapping[int, Scores]) -> Scores:
    """Unweighted mean over clients (every client's test set has the same size in the paper)."""
    if not per_client:
        return Scores(0.0, 0.0, 0)
    vals = list(per_client.values())
    return Scores(
        float(np.mean([s.accuracy for s in vals])),
        float(np.mean([s.f1_macro for s in vals])),
        int(sum(s.samples for s in vals)),
    )
