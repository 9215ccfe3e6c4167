"""Federated averaging over state dicts keyed by parameter name (Flower's aggregate, by name).

"Only the gate's shared layers" or "without BatchNorm statistics" is a key filter, never index
arithmetic. Clients are reduced in the order given: callers pass them sorted by client id, so the
result does not depend on which update arrived first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch

StateDict = dict[str, torch.Tensor]
KeyFilter = Callable[[str], bool]

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def is_bn_buffer(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in BN_BUFFERS


def with_prefix(*prefixes: str) -> KeyFilter:
    return lambda name: name.startswith(prefixes)


def select(state: Mapping[str, torch.Tensor], keep: KeyFilter | None = None) -> StateDict:
    """The entries of ``state`` whose names pass ``keep`` (all when None), detached, not copied."""
    return {k: v.detach() for k, v in state.items() if keep is None or keep(k)}


def fedavg(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    keys: Iterable[str] | None = None,
) -> StateDict:
    """Weighted mean of ``states`` (weights: sample counts), for ``keys`` (default: the first's).

    Float tensors are averaged in float64 and cast back; integer tensors (BatchNorm's
    num_batches_tracked) are averaged and rounded.
    """
    if not states:
        raise ValueError("fedavg: no states to average")
    if len(states) != len(weights):
        raise ValueError(f"fedavg: {len(states)} states but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("fedavg: weights must sum to a positive number")
    names = list(keys) if keys is not None else list(states[0])
    out: StateDict = {}
    for name in names:
        ref = states[0][name]
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for state, w in zip(states, weights, strict=True):
            t = state[name]
            if t.shape != ref.shape:
                raise ValueError(f"fedavg: '{name}' has shape {tuple(t.shape)} vs {tuple(ref.shape)}")
            acc += t.to(torch.float64) * (w / total)
        out[name] = acc.round().to(ref.dtype) if not ref.is_floating_point() else acc.to(ref.dtype)
    return out
