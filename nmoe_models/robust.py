"""Robust aggregation: pure functions over state dicts, like fedavg.py (Flower's aggregate.py).

A client's *update* is what it sends minus the state the round started from (the reference). A
malicious client can send anything well-formed: weights scaled by 1000, or sign-flipped. The screen
measures each update's size (the L2 norm of its difference from the reference, over every float
tensor) against the round's median and rejects those far beyond it; the aggregators bound what a
remaining update can do (norm-bounded FedAvg clips each difference; the coordinate-wise median and
the trimmed mean ignore extremes coordinate by coordinate).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .fedavg import StateDict, fedavg

State = Mapping[str, torch.Tensor]


def update_norm(state: State, reference: State) -> float:
    """L2 norm of ``state - reference`` over the float tensors both hold (in float64)."""
    total = 0.0
    for name, ref in reference.items():
        t = state.get(name)
        if t is not None and ref.is_floating_point():
            total += float((t.to(torch.float64) - ref.to(torch.float64)).pow(2).sum())
    return total**0.5


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def outliers(norms: Sequence[float], factor: float, min_updates: int = 3) -> list[int]:
    """Indices of updates more than ``factor`` times the median update norm (none with fewer than
    ``min_updates`` updates: with two, the median cannot tell an honest update from a bad one)."""
    if factor <= 0 or len(norms) < min_updates:
        return []
    m = median(norms)
    return [i for i, n in enumerate(norms) if n > factor * m]


def clipped(state: State, reference: State, bound: float) -> StateDict:
    """``state`` with its difference from ``reference`` scaled down to norm ``bound`` if larger."""
    norm = update_norm(state, reference)
    if norm <= bound or norm == 0:
        return dict(state)
    scale = bound / norm
    out: StateDict = {}
    for name, t in state.items():
        ref = reference.get(name)
        if ref is None or not t.is_floating_point():
            out[name] = t
        else:
            out[name] = (ref.to(torch.float64) + (t.to(torch.float64) - ref.to(torch.float64)) * scale).to(t.dtype)
    return out


def norm_bounded_fedavg(states: Sequence[State], weights: Sequence[float], reference: State,
                        clip_factor: float) -> StateDict:
    """FedAvg of the updates, each difference clipped to ``clip_factor`` x the median norm."""
    bound = clip_factor * median([update_norm(s, reference) for s in states])
    return fedavg([clipped(s, reference, bound) for s in states], weights)


def _stacked(states: Sequence[State], name: str) -> torch.Tensor:
    ref = states[0][name]
    for s in states:
        if s[name].shape != ref.shape:
            raise ValueError(f"'{name}' has shape {tuple(s[name].shape)} vs {tuple(ref.shape)}")
    return torch.stack([s[name].to(torch.float64) for s in states])  # (n, ...)


def coordinate_median(states: Sequence[State]) -> StateDict:
    """The coordinate-wise median (the mean of the two middle values for an even count)."""
    if not states:
        raise ValueError("median: no states")
    out: StateDict = {}
    for name, ref in states[0].items():
        x = _stacked(states, name).sort(dim=0).values
        n = x.shape[0]
        mid = x[n // 2] if n % 2 else (x[n // 2 - 1] + x[n // 2]) / 2
        out[name] = mid.round().to(ref.dtype) if not ref.is_floating_point() else mid.to(ref.dtype)
    return out


def trimmed_mean(states: Sequence[State], trim: float) -> StateDict:
    """Per coordinate, the mean after dropping the ``trim`` fraction of values at each end (at
    least one value is kept)."""
    if not states:
        raise ValueError("trimmed_mean: no states")
    n = len(states)
    cut = min(int(trim * n), (n - 1) // 2)
    out: StateDict = {}
    for name, ref in states[0].items():
        x = _stacked(states, name).sort(dim=0).values[cut : n - cut].mean(dim=0)
        out[name] = x.round().to(ref.dtype) if not ref.is_floating_point() else x.to(ref.dtype)
    return out


def cosine(state: State, reference: State) -> float:
    """Cosine between ``state`` and ``reference`` over their float tensors (1.0 if either is zero)."""
    dot = na = nb = 0.0
    for name, ref in reference.items():
        t = state.get(name)
        if t is not None and ref.is_floating_point():
            a, b = t.to(torch.float64), ref.to(torch.float64)
            dot += float((a * b).sum())
            na += float(a.pow(2).sum())
            nb += float(b.pow(2).sum())
    return dot / (na * nb) ** 0.5 if na > 0 and nb > 0 else 1.0


def screen(states: Mapping[int, State], reference: State, factor: float, reject_reversed: bool) -> dict[int, str]:
    """client -> why its update is an outlier of the round: parameters pointing away from the round's
    start (cosine < 0: a sign flip), or a difference from it over ``factor`` x the round's median."""
    out: dict[int, str] = {}
    if reject_reversed:
        for i, s in states.items():
            c = cosine(s, reference)
            if c < 0:
                out[i] = f"outlier: parameters reversed (cosine {c:.2f} with the round's start)"
    order = sorted(states)
    norms = [update_norm(states[i], reference) for i in order]
    m = median(norms) if norms else 0.0
    for k in outliers(norms, factor):
        out.setdefault(order[k], f"outlier: update norm {norms[k]:.4g} is {norms[k] / m:.1f}x the round's "
                                 f"median (limit {factor:g}x)")
    return out
