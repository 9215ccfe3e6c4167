"""Every shipped scenario runs, at toy size, the way a user would run it (CONVENTIONS: every
scenario YAML gets a smoke run). Sizes shrink; the method, stages and settings stay the file's."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FMNIST, quiet
from test_data import write_cifar

from scenarios.networked import run_networked_scenario
from scenarios.runner import run_inprocess
from scenarios.scenario import PACKAGED, load_scenario

SHIPPED = sorted(PACKAGED.glob("*.yaml"))


def toy(path: Path, tmp_path: Path) -> list[str]:
    scn = load_scenario(str(path))
    sets = [
        "clients=3", "threads=1", "partition.train_per_client=48", "partition.test_per_client=24",
        f"partition.unlabeled_per_client={min(scn.partition.unlabeled_per_client, 48)}",
        "stage1.rounds=1", "stage1.batch_size=16", "stage2.epochs=1", "stage3.rounds=1", "stage3.local_epochs=1",
        f"eval.top_k={min(scn.eval.top_k, 3)}", "network.min_clients=1", "network.faults=[]", "channel.clients={}",
        "network.join_timeout_s=60", "channel.time_scale=0.05",
        # deadlines of a minute of wall time at that time_scale: a toy round waits for every client
        "network.round_timeout_s=1200", "network.stage2_timeout_s=1200", "network.eval_timeout_s=1200",
    ]
    if scn.data.name == "cifar10":
        write_cifar(tmp_path / "cifar-10-batches-py", per_batch=400, protocol=2)  # random labels
        sets.append(f"data.root={tmp_path}")
    elif scn.data.name == "fashion_mnist" and not FMNIST.exists():
        sets.append("data.name=synthetic")
    return sets


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_scenario_runs_at_toy_size(path, tmp_path):
    scn = load_scenario(str(path), toy(path, tmp_path))
    results = run_inprocess(scn, tmp_path / "out", quiet())
    assert set(results["methods"]["nmoe"]["per_client"]) == {"0", "1", "2"}
    assert (tmp_path / "out" / "methods.png").exists()


@pytest.mark.parametrize("path", [p for p in SHIPPED if load_scenario(str(p)).channel.model == "emulated"]
                         + [PACKAGED / "stress" / "base.yaml"], ids=lambda p: p.stem)
def test_shipped_channel_scenario_runs_networked_at_toy_size(path, tmp_path):
    scn = load_scenario(str(path), toy(path, tmp_path))
    results = run_networked_scenario(scn, tmp_path / "out", quiet(), "inprocess")
    assert set(results["methods"]["nmoe"]["per_client"]) == {"0", "1", "2"}
    assert results["traffic"]["channel"]["totals"]["delivered"] > 0
    if scn.devices.enabled:
        assert results["devices"]["totals"]["energy_j"] > 0
