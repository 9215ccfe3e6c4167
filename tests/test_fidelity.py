"""Fidelity to the paper: fixes found in a review of the code against it (issue 9, point 3)."""

from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest
import torch
from conftest import quiet, toy_scenario

from agents.inprocess import InProcessFleet
from agents.protocol import serverless_eval
from agents.strategy import Strategy
from nmoe.errors import ConfigError
from nmoe_models.augment import ssl_view, supervised_augment
from nmoe_models.baselines import train_centralized
from nmoe_models.config import ExperimentConfig
from nmoe_models.fedsc import clip_norm, correlation, fedsc_loss
from nmoe_models.learner import ClientLearner, build_stage1_model, stage1_shared_keys
from nmoe_models.metrics import score
from nmoe_models.moe import combine, mixture_nll, topk_weights
from nmoe_models.partition import load_client_data, load_union
from nmoe_models.routing import assemble, plan
from nmoe_models.train import fedsc_correlation
from scenarios.cache import cache_key, key_fields
from scenarios.runner import fedavg_scenario, run_inprocess
from scenarios.schema import build


def test_centralized_moe_keeps_one_optimizer_for_the_whole_training(tmp_path):
    # Prepare: 2 epochs of the toy union, cosine schedule
    scn = toy_scenario(tmp_path, ["stage1.rounds=2", "stage1.optim.cosine=true", "model.channels_last=false"])
    union = load_union(scn)
    steps_per_epoch = len(union.train_x) // scn.stage1.batch_size
    # Execute
    model, opt = train_centralized(scn, union)
    # Assert: Adam counted every step of every epoch (a fresh optimizer per epoch counts one epoch's)
    steps = {int(state["step"]) for state in opt.state.values()}
    assert steps == {2 * steps_per_epoch}
    assert len(opt.state) == len(list(model.parameters()))
    last_lr = scn.stage1.optim.lr * 0.5 * (1 + math.cos(math.pi * 1 / 2))
    assert math.isclose(opt.param_groups[0]["lr"], last_lr)
    assert not model.training


@pytest.mark.parametrize(("k", "moves"), [(1, False), (2, True), (0, True)])
def test_the_gate_gets_a_gradient_only_when_it_mixes_two_or_more_experts(k, moves):
    # Prepare: gate logits over 4 experts, each expert confident in a different class
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 4, generator=gen, requires_grad=True)
    expert_logprobs = torch.log_softmax(3 * torch.randn(8, 4, 5, generator=gen), dim=2)
    labels = torch.randint(0, 5, (8,), generator=gen)
    # Execute
    loss = mixture_nll(topk_weights(logits, k or 4), expert_logprobs, labels)
    loss.backward()
    # Assert: this is why stage3.train_top_k: 1 is refused
    assert logits.grad is not None
    assert bool(logits.grad.abs().sum() > 1e-6) == moves
    if k == 1:
        with pytest.raises(ConfigError, match="stage3.train_top_k: 1 gives the gate zero gradient.*use 0"):
            build(ExperimentConfig, {"stage3": {"train_top_k": 1}})
    else:
        assert build(ExperimentConfig, {"stage3": {"train_top_k": k}}).stage3.train_top_k == k


def test_fedsc_loss_without_rbar_keeps_the_full_repulsion_term():
    # Prepare: a batch of view pairs and the reference schedule's q in a late round
    gen = torch.Generator().manual_seed(1)
    z1, z0 = torch.randn(16, 6, generator=gen), torch.randn(16, 6, generator=gen)
    q = 0.2
    r, tr_plus = correlation(z1, z0)
    # Execute
    loss = fedsc_loss(z1, z0, q, None)
    # Assert: -Tr(R+) + 1/2 ||R||^2, not the q/2 ||R||^2 that dropped (1 - q) of the repulsion
    assert math.isclose(float(loss), float(-tr_plus + 0.5 * (r * r).sum()), rel_tol=1e-6)
    assert not math.isclose(float(loss), float(-tr_plus + 0.5 * q * (r * r).sum()), rel_tol=1e-3)
    # and its gradient is Eq. 3's with Rbar = this client's own R (the others taken to look like it)
    a = z1.clone().requires_grad_()
    fedsc_loss(a, z0, q, None).backward()
    b = z1.clone().requires_grad_()
    fedsc_loss(b, z0, q, correlation(z1, z0)[0]).backward()
    assert a.grad is not None and b.grad is not None
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_fedce_share_extractor_averages_f_and_keeps_personal_heads(tmp_path):
    # Prepare: FedCE as Eq. 1 writes it, beside today's whole-model FedAvg
    scn = toy_scenario(tmp_path, ["stage1.method=fedce", "stage1.fedce.share=extractor", "stage1.rounds=1",
                                  "baselines=[fedavg]"])
    default = toy_scenario(tmp_path, ["stage1.method=fedce"])
    model = build_stage1_model(scn)
    keys = stage1_shared_keys(scn, model)
    assert keys and all(k.startswith("features.") for k in keys)
    assert stage1_shared_keys(default, model) == list(model.state_dict())  # default: everything
    learners = {i: ClientLearner(scn, load_client_data(scn, i)) for i in range(scn.clients)}
    # Execute: one FedCE round, then Stage 2 (which loads the averaged F)
    strategy = Strategy(scn)
    fleet = InProcessFleet(learners)

    async def stages() -> dict[int, dict[str, float]]:
        await strategy.stage1(fleet)
        return await strategy.stage2(fleet)

    classifier = asyncio.run(stages())
    # Assert: F is the same everywhere, the heads are each client's own
    f0, f1 = learners[0].stage1.features.state_dict(), learners[1].stage1.features.state_dict()
    assert all(torch.equal(f0[k], f1[k]) for k in f0)
    h0, h1 = learners[0].stage1.state_dict(), learners[1].stage1.state_dict()
    assert not torch.equal(h0["head.1.weight"], h1["head.1.weight"])
    assert set(classifier) == {0, 1, 2}
    # and the run reports them as personal-head classifiers, with the FedAvg baseline trained apart
    results = run_inprocess(scn, tmp_path / "out", quiet())
    assert {"fedce_personal", "fedavg", "nmoe"} <= results["methods"].keys()
    assert results["methods"]["fedce_personal"]["label"] == "FedCE classifier (personal heads)"
    assert results["config"]["stage1"]["fedce"]["share"] == "extractor"


def test_fedce_can_train_with_strong_augmentation(tmp_path):
    # Prepare: Fig. 5's comparison point, FedCE with strong augmentation
    scn = toy_scenario(tmp_path, ["stage1.method=fedce", "stage1.augment=strong"])
    learner = ClientLearner(scn, load_client_data(scn, 0))
    x = learner.data.train_x[:8]
    # Execute
    got = learner.inputs.augment(x, torch.Generator().manual_seed(5))
    # Assert: FedCE's training inputs are one SSL view (crop, jitter, flip, grayscale), not weak
    assert torch.equal(got, ssl_view(x, scn.data.name, torch.Generator().manual_seed(5)))
    weak = supervised_augment(x, scn.data.name, "weak", torch.Generator().manual_seed(5))
    assert not torch.equal(got, weak)


def test_fedsc_shares_r_computed_as_the_local_loss_computes_it(tmp_path):
    # Prepare: a FedSC model whose running BatchNorm statistics are far from any batch's (as after
    # averaging clients with different data), and one batch of local images
    scn = toy_scenario(tmp_path, ["model.channels_last=false"])
    learner = ClientLearner(scn, load_client_data(scn, 0))
    model, views = learner.stage1, learner.inputs.views
    for name, buf in model.named_buffers():
        if name.endswith("running_mean"):
            buf.fill_(3.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = learner.data.train_x[:32]
    # Execute: the shared R (default corr_bn: batch) and the R the local loss sees on the same views
    shared = fedsc_correlation(model, x, views, mu=4.0, passes=1, batch_size=32, gen=torch.Generator().manual_seed(2))
    after = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    with torch.no_grad():
        v1, v0 = views(x, torch.Generator().manual_seed(2))
        z1, z0 = clip_norm(model(torch.cat([v1, v0])), 4.0).chunk(2)
    local, _ = correlation(z1, z0)
    old = fedsc_correlation(model, x, views, mu=4.0, passes=1, batch_size=32, gen=torch.Generator().manual_seed(2),
                            bn="running")
    # Assert: the same matrix, the running statistics untouched; eval mode gives another one
    assert torch.allclose(shared, local, atol=1e-5)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.allclose(old, local, atol=1e-3)


def test_fedsc_correlation_batches_are_never_smaller_than_the_batch_size(tmp_path):
    scn = toy_scenario(tmp_path, ["model.channels_last=false"])
    learner = ClientLearner(scn, load_client_data(scn, 0))
    seen: list[int] = []

    def views(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(len(x))
        return learner.inputs.views(x, gen)

    fedsc_correlation(learner.stage1, learner.data.train_x[:70], views, mu=4.0, passes=1, batch_size=32,
                      gen=torch.Generator().manual_seed(0))
    assert seen == [35, 35]  # 70 = 32 + 32 + 6 would leave a batch of 6 with its own statistics


def test_logit_combination_is_the_papers_weighted_sum_of_expert_logits():
    # Prepare: two experts that disagree; expert 0 is sure of class 0, expert 1 leans to class 1
    # but rules class 0 out: probabilities pick class 0, the paper's logit sum picks class 1
    raw = torch.tensor([[[10.0, 0.0, 0.0], [-20.0, 3.0, 0.0]]])  # (B=1, n=2, C=3) expert logits H_j
    lp = torch.log_softmax(raw, dim=2)
    route = plan(torch.zeros(1, 2), k=2)  # equal weights 1/2
    replies = {j: lp[rows, j] for j, rows in route.rows.items()}
    # Execute
    by_logits = assemble(route, replies, combine="logits")
    by_probs = assemble(route, replies)
    # Assert: softmax(sum_j w_j H_j) from log-probabilities on the wire, whatever the logsumexp
    expected = torch.softmax(torch.einsum("bn,bnc->bc", route.weights, raw), dim=1)
    assert torch.allclose(by_logits.probs, expected, atol=1e-6)
    assert torch.allclose(combine(route.weights, lp, "logits"), expected, atol=1e-6)
    assert (int(by_logits.probs.argmax()), int(by_probs.probs.argmax())) == (1, 0)
    # a lost reply renormalizes over the expert that answered: its own prediction
    alone = assemble(route, {0: replies[0]}, combine="logits")
    assert torch.allclose(alone.probs, lp[:, 0].exp(), atol=1e-6) and alone.fallback_rows == 1


def test_serverless_eval_combines_as_eval_combine_says(tmp_path):
    # Prepare: experts and gates trained at toy size (F at its seeded init is enough for them)
    scn = toy_scenario(tmp_path, ["stage1.rounds=0", "partition.kind=iid", "partition.train_per_client=400",
                                  "stage2.epochs=30", "stage2.optim.lr=0.01", "stage3.rounds=1", "eval.top_k=2"])
    learners = {i: ClientLearner(scn, load_client_data(scn, i)) for i in range(scn.clients)}
    fleet = InProcessFleet(learners)

    asyncio.run(Strategy(scn).run(fleet))
    me = learners[1]
    h = me.test_latents
    assert h is not None
    w = topk_weights(me.gate_logits(h), 2)
    with torch.no_grad():
        raw = torch.stack([learners[j].expert.eval()(h) for j in range(scn.clients)], dim=1)  # (B, n, C)
    by = {"logits": torch.einsum("bn,bnc->bc", w, raw).argmax(1),
          "probs": torch.einsum("bn,bnc->bc", w, torch.softmax(raw, dim=2)).argmax(1)}
    assert not torch.equal(by["logits"], by["probs"])  # the two rules disagree on some samples here
    for mode in ("probs", "logits"):
        # Execute: the client reads eval.combine from its own config
        me.exp = dataclasses.replace(scn, eval=dataclasses.replace(scn.eval, combine=mode))
        metrics = asyncio.run(serverless_eval(me, fleet.pool, k=2, batch_size=16))
        # Assert: the scores of the mixture computed directly from every expert's raw logits
        expected = score(by[mode], me.data.test_y, me.classes)
        assert (metrics["accuracy"], metrics["f1_macro"]) == (expected.accuracy, expected.f1_macro), mode


def test_the_fedavg_baseline_is_cached_as_whole_model_fedce_whatever_the_run_shares(tmp_path):
    shared_f = toy_scenario(tmp_path, ["stage1.method=fedce", "stage1.fedce.share=extractor"])
    everything = toy_scenario(tmp_path, ["stage1.method=fedce"])
    assert cache_key(key_fields("stage1", fedavg_scenario(shared_f))) == cache_key(
        key_fields("stage1", fedavg_scenario(everything)))
    assert cache_key(key_fields("stage1", shared_f)) != cache_key(key_fields("stage1", everything))


def test_a_job_that_trains_neither_expert_nor_gate_computes_no_training_latents(tmp_path):
    """FedCE alone then evaluation (stage2.epochs 0, stage3.rounds 0): F(train) and the experts'
    outputs on it train nothing, so they are not computed; F(test) is, and evaluation runs."""
    scn = toy_scenario(tmp_path, ["stage1.method=fedce", "stage1.rounds=1", "stage2.epochs=0", "stage3.rounds=0",
                                  "baselines=[]"])
    learners = {i: ClientLearner(scn, load_client_data(scn, i)) for i in range(scn.clients)}
    summary = asyncio.run(Strategy(scn).run(InProcessFleet(learners)))
    assert all(lr.train_latents is None and lr.test_latents is not None and lr.expert_outputs is None
               for lr in learners.values())
    assert "stage3_prepare" not in {r.op.value for r in summary.rounds}
    assert sorted(summary.methods["nmoe"]) == list(range(scn.clients))
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in summary.methods["nmoe"].values())
    # as soon as either trains, F(train) is there again
    for extra in ("stage2.epochs=1", "stage3.rounds=1"):
        again = toy_scenario(tmp_path, ["stage1.rounds=0", "stage2.epochs=0", "stage3.rounds=0", extra])
        lr = ClientLearner(again, load_client_data(again, 0))
        lr.stage2_fit()
        assert lr.train_latents is not None and lr.stage2_done, extra
