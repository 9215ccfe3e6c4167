"""Top-k routing of a batch of latents to experts, and assembly of the experts' replies.

Serverless inference on client i: gate weights pick k experts per row; rows are grouped by chosen
expert; each group is one request (served locally when the expert is client i's own). Replies
that never come back are a normal case: their weights are dropped and the row is renormalized
over the experts that answered; a row with no answer at all falls back to the local expert.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from .moe import topk_weights


@dataclass(frozen=True)
class RoutePlan:
    weights: torch.Tensor
    """(B, n) top-k weights, exactly k non-zeros per row, rows summing to 1."""
    rows: dict[int, torch.Tensor]
    """expert j -> indices of the rows routed to it (only experts with at least one row)."""


@dataclass(frozen=True)
class Mixture:
    probs: torch.Tensor
    """(B, C) class probabilities of the mixture."""
    fallback_rows: int
    """Rows that lost at least one chosen expert's reply."""
    local_only_rows: int
    """Rows that got no reply at all and were answered by the local expert alone."""


def plan(gate_logits: torch.Tensor, k: int) -> RoutePlan:
    weights = topk_weights(gate_logits, k)  # (B, n)
    chosen = weights > 0
    rows = {j: chosen[:, j].nonzero().squeeze(1) for j in range(weights.shape[1]) if bool(chosen[:, j].any())}
    return RoutePlan(weights, rows)


def assemble(
    route: RoutePlan, replies: Mapping[int, torch.Tensor], local_logprobs: torch.Tensor | None = None,
    combine: Literal["probs", "logits"] = "probs",
) -> Mixture:
    """Mix the replies (expert j -> (len(rows[j]), C) log-probabilities) into (B, C) probabilities.

    ``combine``: 'probs' mixes probabilities, sum_j w_j p_j; 'logits' is the paper's
    y' = sum_j w_j H_j, returned as softmax(y'). Experts answer log-probabilities
    log p_j = H_j - logsumexp(H_j), and with weights summing to 1 the logsumexp terms add one
    constant per row, so softmax(sum_j w_j log p_j) = softmax(sum_j w_j H_j) exactly: no change on
    the wire. ``local_logprobs`` (B, C) is the local expert on every row; it is needed only when
    some row got no reply (pass it lazily: compute it when ``missing_rows`` says so).
    """
    b, n = route.weights.shape
    some = next(iter(replies.values()), local_logprobs)
    assert some is not None, "assemble needs at least one reply or the local expert's output"
    probs = torch.zeros((b, some.shape[1]), dtype=some.dtype)
    mass = torch.zeros(b, dtype=route.weights.dtype)
    lost = torch.zeros(b, dtype=torch.bool)
    for j, rows in route.rows.items():
        w = route.weights[rows, j]
        if j in replies:
            answer = replies[j] if combine == "logits" else replies[j].exp()
            probs.index_add_(0, rows, w.unsqueeze(1) * answer)
            mass.index_add_(0, rows, w)
        else:
            lost[rows] = True
    answered = mass > 0
    probs[answered] /= mass[answered].unsqueeze(1)  # renormalized over the experts that answered
    if combine == "logits":
        probs[answered] = torch.softmax(probs[answered], dim=1)
    none = ~answered
    if bool(none.any()):
        if local_logprobs is None:
            raise ValueError(f"assemble: {int(none.sum())} rows got no reply; pass the local expert's output")
        probs[none] = local_logprobs[none].exp()
    return Mixture(probs, int(lost.sum()), int(none.sum()))


def missing_rows(route: RoutePlan, replies: Mapping[int, torch.Tensor]) -> torch.Tensor:
    """Bool (B,) of rows none of whose chosen experts replied."""
    got = torch.zeros(route.weights.shape[0], dtype=torch.bool)
    for j, rows in route.rows.items():
        if j in replies:
            got[rows] = True
    return ~got
