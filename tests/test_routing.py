"""Serverless routing: grouping rows by expert, assembling replies, falling back."""

import torch

from nmoe_models.routing import assemble, missing_rows, plan


def _replies(route, lp):
    return {j: lp[rows, j] for j, rows in route.rows.items()}


def test_plan_groups_rows_by_chosen_expert():
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [5.0, 0, 0], [0, 0, 5.0]])
    route = plan(logits, k=1)
    assert {j: r.tolist() for j, r in route.rows.items()} == {0: [0, 2], 1: [1], 2: [3]}


def test_assemble_with_every_reply_is_the_top_k_mixture():
    torch.manual_seed(0)
    logits, lp = torch.randn(8, 4), torch.log_softmax(torch.randn(8, 4, 3), dim=2)
    route = plan(logits, k=2)
    out = assemble(route, _replies(route, lp))
    expected = torch.einsum("bn,bnc->bc", route.weights, lp.exp())
    assert torch.allclose(out.probs, expected, atol=1e-6)
    assert out.fallback_rows == 0 and out.local_only_rows == 0


def test_a_lost_reply_renormalizes_over_the_experts_that_answered():
    torch.manual_seed(1)
    logits, lp = torch.randn(16, 3), torch.log_softmax(torch.randn(16, 3, 5), dim=2)
    route = plan(logits, k=2)
    replies = _replies(route, lp)
    del replies[1]
    out = assemble(route, replies, local_logprobs=lp[:, 0])
    for b in range(16):
        alive = [j for j in range(3) if route.weights[b, j] > 0 and j != 1]
        if not alive:
            assert torch.allclose(out.probs[b], lp[b, 0].exp())
            continue
        w = route.weights[b, alive] / route.weights[b, alive].sum()
        assert torch.allclose(out.probs[b], (w.unsqueeze(1) * lp[b, alive].exp()).sum(0), atol=1e-6)
    lost = int((route.weights[:, 1] > 0).sum())
    assert out.fallback_rows == lost
    assert out.local_only_rows == int(missing_rows(route, replies).sum())


def test_no_reply_at_all_falls_back_to_the_local_expert():
    lp = torch.log_softmax(torch.randn(4, 2, 3), dim=2)
    route = plan(torch.tensor([[0.0, 9.0]] * 4), k=1)
    out = assemble(route, {}, local_logprobs=lp[:, 0])
    assert torch.allclose(out.probs, lp[:, 0].exp())
    assert out.local_only_rows == 4
