"""The stage cache: a run that changes only later stages loads Stage 1 and 2 and gets exactly the
numbers of a run that computes them; a damaged entry is recomputed; keys follow their fields."""

from __future__ import annotations

import json

import pytest
from conftest import quiet, toy_scenario

from scenarios.cache import StageCache, cache_key, default_root, key_fields
from scenarios.runner import run_inprocess

FAST = ["stage1.rounds=1", "stage3.rounds=1", "baselines=[local]", "privacy.reproducible_noise=true"]


def _per_client(results, method="nmoe"):
    return {i: (m["accuracy"], m["f1_macro"]) for i, m in results["methods"][method]["per_client"].items()}


def test_a_later_stage_sweep_reuses_stage1_and_2_with_the_same_numbers(tmp_path):
    cache = StageCache(tmp_path / "cache")
    first = run_inprocess(toy_scenario(tmp_path, FAST), tmp_path / "a", quiet(), cache)
    assert {s: e["status"] for s, e in first["cache"]["stages"].items()} == {
        "stage1": "computed", "stage2": "computed", "local_models": "computed"}
    changed = [*FAST, "stage3.local_epochs=2", "eval.top_k=1"]
    cache.report.clear()
    again = run_inprocess(toy_scenario(tmp_path, changed), tmp_path / "b", quiet(), cache)
    assert {s: e["status"] for s, e in again["cache"]["stages"].items()} == {
        "stage1": "loaded", "stage2": "loaded", "local_models": "loaded"}
    assert again["cache"]["stages"]["stage1"]["key"] == first["cache"]["stages"]["stage1"]["key"]
    fresh = run_inprocess(toy_scenario(tmp_path, changed), tmp_path / "c", quiet(), None)
    assert "cache" not in fresh
    assert _per_client(again) == _per_client(fresh)
    assert _per_client(again, "local") == _per_client(fresh, "local")
    def stage1_rounds(results):  # the cached rounds, as recorded when they ran (host-timed fields apart:
        # in process without devices:, a round's modeled_s is this host's seconds too)
        return [{k: v for k, v in r.items() if k not in ("seconds", "modeled_s")} for r in results["rounds"]
                if r["stage"] == "stage1"]

    assert stage1_rounds(again) == stage1_rounds(fresh) and stage1_rounds(again)


def test_a_damaged_or_foreign_entry_is_recomputed_never_used(tmp_path):
    scn = toy_scenario(tmp_path, FAST)
    cache = StageCache(tmp_path / "cache")
    run_inprocess(scn, tmp_path / "a", quiet(), cache)
    key = cache.report["stage1"]["key"]
    tensors = tmp_path / "cache" / "stage1" / f"{key}.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    meta_path = tmp_path / "cache" / "stage2" / f"{cache.report['stage2']['key']}.json"
    meta = json.loads(meta_path.read_text())
    meta["fields"]["seed"] = 99  # an entry made for other settings under this name
    meta_path.write_text(json.dumps(meta))
    cache.report.clear()
    again = run_inprocess(scn, tmp_path / "b", quiet(), cache)
    assert again["cache"]["stages"]["stage1"]["status"] == "recomputed"
    assert "sha256" in again["cache"]["stages"]["stage1"]["why"]
    stage2 = again["cache"]["stages"]["stage2"]
    assert stage2["status"] == "recomputed" and "other settings" in stage2["why"]
    cache.report.clear()
    third = run_inprocess(scn, tmp_path / "c", quiet(), cache)  # the recomputed entries were written again
    assert third["cache"]["stages"]["stage1"]["status"] == "loaded"


@pytest.mark.parametrize(("override", "stage1_changes"), [
    ("stage3.rounds=7", False), ("eval.top_k=1", False), ("partition.test_distribution=iid", False),
    ("channel.preset=lte", False), ("network.min_clients=2", False), ("stage2.epochs=3", False),
    ("stage1.rounds=5", True), ("partition.tau=0.9", True), ("seed=4", True), ("privacy.noise_multiplier=2.0", True),
    ("eval.combine=logits", False), ("stage1.fedsc.corr_bn=running", True),
])
def test_stage1_keys_hold_exactly_the_fields_stage1_depends_on(tmp_path, override, stage1_changes):
    base = toy_scenario(tmp_path)
    other = toy_scenario(tmp_path, [override])
    assert (cache_key(key_fields("stage1", base)) != cache_key(key_fields("stage1", other))) == stage1_changes
    stage2_changes = stage1_changes or override.startswith("stage2.")
    assert (cache_key(key_fields("stage2", base)) != cache_key(key_fields("stage2", other))) == stage2_changes


def test_the_cache_folder_follows_nmoe_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NMOE_CACHE", str(tmp_path / "x"))
    assert default_root() == tmp_path / "x"


@pytest.mark.parametrize(("override", "retrains"), [
    ("partition.test_distribution=iid", False), ("eval.top_k=1", False), ("stage1.method=fedce", False),
    ("stage3.rounds=7", False), ("stage1.rounds=5", True), ("partition.tau=0.9", True),
])
def test_baseline_models_are_keyed_by_what_trains_them_not_by_the_test_set(tmp_path, override, retrains):
    base, other = toy_scenario(tmp_path), toy_scenario(tmp_path, [override])
    for name in ("local_models", "centralized_models"):
        assert (cache_key(key_fields(name, base)) != cache_key(key_fields(name, other))) == retrains, name
