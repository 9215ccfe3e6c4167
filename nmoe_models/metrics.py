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
    acc = float((p == y).mean())
    return Scores(acc, f1_macro(p, y, classes), int(y.size))


def f1_macro(pred: np.ndarray, labels: np.ndarray, classes: int) -> float:
    """Macro-F1 over the classes 0..classes-1, a class with no true and no predicted sample scoring 0.

    The same arithmetic as scikit-learn's ``f1_score(labels, pred, labels=range(classes),
    average="macro", zero_division=0)``: per class 2 tp / (true + predicted), then the plain mean,
    so it gives the same float (tests/test_metrics.py checks that against sklearn). Computed here
    because importing sklearn.metrics cost every run and every agent host 0.6-1.2 s at start-up.
    """
    p = np.asarray(pred).reshape(-1).astype(np.int64, copy=False)
    y = np.asarray(labels).reshape(-1).astype(np.int64, copy=False)
    if ((p < 0) | (p >= classes)).any() or ((y < 0) | (y >= classes)).any():
        raise ValueError(f"f1_macro: a label or prediction outside 0..{classes - 1}")
    tp = np.bincount(y[p == y], minlength=classes)
    denom = np.bincount(y, minlength=classes) + np.bincount(p, minlength=classes)
    f = np.zeros(classes, dtype=np.float64)
    np.divide(2.0 * tp, denom, out=f, where=denom > 0)
    return float(np.mean(f))
