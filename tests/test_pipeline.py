"""The in-process pipeline end to end: outputs, determinism, and that the method learns."""

import json

import pytest
import torch
from conftest import FMNIST, quiet, toy_scenario
from safetensors.torch import load_file

from scenarios.runner import run_inprocess
from scenarios.scenario import load_scenario


def test_inprocess_run_writes_every_output(tmp_path):
    scn = toy_scenario(tmp_path, ["baselines=[local, fedavg, centralized, fedavg_gate]"])
    results = run_inprocess(scn, tmp_path / "out", quiet())
    out = tmp_path / "out"
    for name in ("results.json", "metrics.csv", "methods.png", "training.png", "checkpoint.safetensors"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "results.json").read_text())
    assert saved["methods"].keys() == {"nmoe", "nmoe_fedavg_gate", "fedavg", "local", "centralized"}
    for method in saved["methods"].values():
        assert set(method["per_client"]) == {"0", "1", "2"}
        assert 0.0 <= method["accuracy"] <= 1.0 and 0.0 <= method["f1_macro"] <= 1.0
    nmoe = saved["methods"]["nmoe"]
    assert nmoe["fallback_rate"] == 0.0  # nothing is lost in process
    assert 0.0 <= nmoe["local_share"] <= 1.0
    assert {"stage1", "stage2", "baselines"} <= saved["stage_seconds"].keys()
    assert saved["privacy"]["epsilon"] > 0 and saved["privacy"]["releases"] == 2
    assert saved["config"]["stage1"]["method"] == "fedsc"
    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("stage,round,op")
    assert sum(",stage1_fit," in r for r in rows) == 2 and sum(",stage1_corr," in r for r in rows) == 2
    assert results["methods"]["nmoe"]["accuracy"] == nmoe["accuracy"]
    from safetensors import safe_open

    with safe_open(out / "checkpoint.safetensors", "pt") as ck:  # the coordinator's last state
        keys, meta = set(ck.keys()), ck.metadata()
    assert meta["stage"] == "stage3:fedavg" and meta["round"] == "1"
    assert {"corr.0", "corr.1", "corr.2"} <= keys
    assert any(k.startswith("global.shared.") for k in keys) and any(k.startswith("stage1.features.") for k in keys)
    assert json.loads(meta["releases"]) == {"0": 2, "1": 2, "2": 2}


def test_inprocess_run_is_deterministic(tmp_path):
    scn = toy_scenario(tmp_path, ["baselines=[]", "stage1.method=fedce"])
    a = run_inprocess(scn, tmp_path / "a", quiet())
    b = run_inprocess(scn, tmp_path / "b", quiet())
    assert _scores(a) == _scores(b)
    sa, sb = load_file(tmp_path / "a" / "checkpoint.safetensors"), load_file(tmp_path / "b" / "checkpoint.safetensors")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    c = run_inprocess(toy_scenario(tmp_path, ["baselines=[]", "stage1.method=fedce", "seed=4"]),
                      tmp_path / "c", quiet())
    assert _scores(c) != _scores(a)


def _scores(results):
    return {i: (m["accuracy"], m["f1_macro"]) for i, m in results["methods"]["nmoe"]["per_client"].items()}


@pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist (make test installs it)")
def test_nmoe_learns_fashion_mnist(tmp_path):
    scn = toy_scenario(tmp_path, text="""
name: learn
clients: 3
threads: 2
partition: {kind: iid, train_per_client: 300, test_per_client: 200}
stage1: {method: fedce, rounds: 3, local_epochs: 3, batch_size: 32}
stage2: {epochs: 10}
stage3: {rounds: 3, local_epochs: 3}
""")
    results = run_inprocess(scn, tmp_path / "out", quiet())
    # chance is 0.1; a few rounds on 900 images already gets far above it
    assert results["methods"]["nmoe"]["accuracy"] > 0.5
    assert results["methods"]["fedavg"]["accuracy"] > 0.4


@pytest.mark.slow
@pytest.mark.skipif(not FMNIST.exists(), reason="needs Debian's dataset-fashion-mnist (make test installs it)")
def test_paper_sized_run_shows_the_papers_qualitative_claims(tmp_path):
    """10 clients x 1000/1000 Fashion-MNIST, non-IID(0.2), FedCE (a few minutes on 2 cores):
    FedGate beats FedAvg-gate, and NMoE's macro-F1 beats the local classifier's (which in strong
    non-IID has high accuracy but low F1)."""
    scn = load_scenario("paper_fedce_noniid", ["stage1.rounds=8", "baselines=[local, fedavg_gate]"])
    results = run_inprocess(scn, tmp_path / "out", quiet())
    m = results["methods"]
    assert m["nmoe"]["accuracy"] > m["nmoe_fedavg_gate"]["accuracy"]
    assert m["nmoe"]["f1_macro"] > m["local"]["f1_macro"]
    assert m["local"]["accuracy"] > 0.7 > m["local"]["f1_macro"]


def test_dp_noise_is_fresh_unless_asked_to_be_reproducible(tmp_path):
    from nmoe_models.learner import noise_generator

    secure = toy_scenario(tmp_path)
    a, b = (torch.randn(4, generator=noise_generator(secure, 0, 1)) for _ in range(2))
    assert not torch.equal(a, b)  # nobody holding the scenario file can regenerate it
    repro = toy_scenario(tmp_path, ["privacy.reproducible_noise=true"])
    a, b = (torch.randn(4, generator=noise_generator(repro, 0, 1)) for _ in range(2))
    assert torch.equal(a, b)


def test_evaluation_reports_what_remote_experts_cost_on_the_air_in_process_too(tmp_path):
    # Arrange: top-2 over 3 clients, in process (no wire: bytes_per_sample is 0 there)
    scn = toy_scenario(tmp_path, ["eval.top_k=2", "baselines=[]"])
    # Act
    results = run_inprocess(scn, tmp_path / "out", quiet())
    # Assert: each row goes to 2 experts; those not local carry a latent (64 floats) and bring back 10 log-probs
    for m in results["methods"]["nmoe"]["per_client"].values():
        assert m["bytes_per_sample"] == 0.0
        assert m["remote_rows_per_sample"] == pytest.approx(2 * (1 - m["local_share"]))
        assert m["payload_bytes_per_sample"] == pytest.approx(m["remote_rows_per_sample"] * (64 + 10) * 4)
    assert results["methods"]["nmoe"]["remote_rows_per_sample"] > 0
