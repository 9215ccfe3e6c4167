"""Accuracy and macro-F1, per client and averaged over clients (the paper's two figures)."""

from __future__ import annotations

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
