"""Fidelity to the paper: fixes found in a review of the code against it (issue 9, point 3)."""

from __future__ import annotations

import math

from conftest import toy_scenario

from nmoe_models.baselines import train_centralized
from nmoe_models.partition import load_union


def test_centralized_moe_keeps_one_optimizer_for_the_whole_training(tmp_path):
    # Prepare: 3 epochs of the toy union, cosine schedule
    scn = toy_scenario(tmp_path, ["stage1.rounds=3", "stage1.optim.cosine=true", "model.channels_last=false"])
    union = load_union(scn)
    steps_per_epoch = len(union.train_x) // scn.stage1.batch_size
    # Execute
    model, opt = train_centralized(scn, union)
    # Assert: Adam counted every step of every epoch (a fresh optimizer per epoch counts one epoch's)
    steps = {int(state["step"]) for state in opt.state.values()}
    assert steps == {3 * steps_per_epoch}
    assert len(opt.state) == len(list(model.parameters()))
    last_lr = scn.stage1.optim.lr * 0.5 * (1 + math.cos(math.pi * 2 / 3))
    assert math.isclose(opt.param_groups[0]["lr"], last_lr)
    assert not model.training
