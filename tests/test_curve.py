"""eval.every_round: NMoE evaluated after each Stage 3 round against the modeled clock, and the
time it took to reach eval.target_accuracy."""

from __future__ import annotations

import dataclasses
import io
import json
import math

import pytest
from conftest import needs_mosquitto, quiet, toy_scenario
from rich.console import Console

from agents.codec import decode_elapsed, encode_elapsed
from agents.config import NetworkConfig
from agents.coordinator import BusFleet
from agents.messages import Metrics, Op
from agents.rounds import RoundOutcome
from nmoe.errors import ConfigError, ProtocolError
from scenarios.report import build_curve, print_curve, time_to_target
from scenarios.runner import run_inprocess
from scenarios.sweep_report import run_figures

CURVE = ["stage3.rounds=3", "eval.every_round=true", "eval.target_accuracy=0.01"]


TIMED = ("latency_p50_ms", "latency_p95_ms", "latency_p99_ms", "eval_wall_s")
"""Per-client figures measured on this host's clock in process (they move from run to run)."""


def _training_clock(results: dict) -> float:
    return sum(r["modeled_s"] for r in results["rounds"] if r["op"] != "evaluate")


def test_the_curve_in_process_leaves_the_final_evaluation_unchanged(tmp_path):
    # Prepare: the same toy run without and with the curve
    off = run_inprocess(toy_scenario(tmp_path, ["stage3.rounds=3"]), tmp_path / "off", quiet())
    scn = toy_scenario(tmp_path, CURVE)
    # Execute
    on = run_inprocess(scn, tmp_path / "on", quiet())
    # Assert: the method's numbers do not move, to the last bit
    for i, m in off["methods"]["nmoe"]["per_client"].items():
        got = on["methods"]["nmoe"]["per_client"][i]
        assert {k: v for k, v in got.items() if k not in TIMED} == {k: v for k, v in m.items() if k not in TIMED}
    assert "curve" not in off
    curve = on["curve"]
    points = curve["points"]
    assert [(p["stage"], p["round"], p["clients"]) for p in points] == [("stage3:fedgate", r, 3) for r in range(3)]
    assert points[-1]["accuracy"] == pytest.approx(on["methods"]["nmoe"]["accuracy"])
    # the clock: training steps only (two curve evaluations and the final one are off it), never back
    evaluations = [r for r in on["rounds"] if r["op"] == "evaluate"]
    assert len(evaluations) == 3 and all(r["modeled_s"] > 0 for r in evaluations)
    clock = [p["modeled_s"] for p in points]
    assert clock == sorted(clock) and clock[0] > 0
    assert clock[-1] == pytest.approx(_training_clock(on)) == pytest.approx(on["training_modeled_s"])
    assert on["training_modeled_s"] < sum(r["modeled_s"] for r in on["rounds"])
    assert curve["clock"].startswith("this host's compute seconds")
    # 0.01 is reached at the first point: its clock, not the end's
    assert curve["reached"] and curve["time_to_target_s"] == clock[0]
    assert (tmp_path / "on" / "learning_curve.png").stat().st_size > 10_000
    figures = run_figures(json.loads((tmp_path / "on" / "results.json").read_text()))  # what a sweep reads
    assert figures["target_reached"] == 1.0 and figures["time_to_target_s"] == clock[0]


def test_time_to_target_is_read_from_the_recorded_curve():
    points = [{"modeled_s": 10.0, "accuracy": 0.4}, {"modeled_s": 12.5, "accuracy": None},
              {"modeled_s": 15.0, "accuracy": 0.62}, {"modeled_s": 20.0, "accuracy": 0.58}]
    assert time_to_target(points, 0.4) == 10.0  # at or above
    assert time_to_target(points, 0.6) == 15.0  # the first point over it, even if a later one falls back
    assert time_to_target(points, 0.63) is None
    assert time_to_target([], 0.1) is None


def test_a_target_never_reached_is_null_and_said_so(tmp_path):
    scn = toy_scenario(tmp_path, CURVE)
    run = run_inprocess(scn, tmp_path / "out", quiet())
    best = max(p["accuracy"] for p in run["curve"]["points"])
    # the recorded curve under a target just above its best point
    from agents.strategy import CurvePoint

    recorded = [CurvePoint(p["stage"], p["round"], p["modeled_s"], {0: {"accuracy": p["accuracy"], "f1_macro": 0.0}})
                for p in run["curve"]["points"]]
    above = dataclasses.replace(scn, eval=dataclasses.replace(scn.eval, target_accuracy=min(1.0, best + 1e-6)))
    curve = build_curve(above, "inprocess", recorded)
    assert curve["reached"] is False and curve["time_to_target_s"] is None
    out = io.StringIO()
    print_curve(Console(file=out, width=120), curve)
    assert "not reached" in out.getvalue()
    assert run_figures({"curve": curve, "rounds": []}) == {"target_reached": 0.0}


@pytest.mark.parametrize(("overrides", "message"), [
    (["eval.every_round=true", "eval.target_accuracy=1.5"], r"eval\.target_accuracy: must be a number in \(0, 1\]"),
    (["eval.every_round=true", "eval.target_accuracy=0"], r"eval\.target_accuracy: must be a number in \(0, 1\]"),
    (["eval.target_accuracy=0.6"], r"eval\.target_accuracy: needs eval\.every_round: true"),
    (["eval.every_round=often"], r"eval\.every_round"),
    (["eval.target_accuracy=high", "eval.every_round=true"], r"eval\.target_accuracy"),
])
def test_bad_curve_settings_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        toy_scenario(tmp_path, overrides)


def test_a_steps_modeled_duration_is_its_slowest_reply_or_its_deadline():
    net = NetworkConfig(round_timeout_s=30.0)
    fleet = BusFleet(None, 3, net)  # type: ignore[arg-type]  # _modeled_s touches no bus
    done = Metrics({}, 1)
    answered = RoundOutcome({0: done, 1: done}, {2: "offline"})
    assert fleet._modeled_s(Op.STAGE1_FIT, answered, {0: 4.0, 1: 7.5}) == 7.5  # an offline one is not waited for
    silent = RoundOutcome({0: done, 1: done}, {2: "missing"})
    assert fleet._modeled_s(Op.STAGE1_FIT, silent, {0: 4.0, 1: 7.5}) == 30.0  # the coordinator waited it out
    rejected = RoundOutcome({0: done}, {1: "rejected: outlier"})
    assert fleet._modeled_s(Op.STAGE1_FIT, rejected, {0: 4.0}) == 30.0


def test_a_replys_elapsed_time_is_bounded_and_checked():
    assert decode_elapsed(encode_elapsed(2.5)) == 2.5
    assert decode_elapsed({}) is None
    assert decode_elapsed(encode_elapsed(-1.0)) == 0.0  # clamped on the way out
    for bad in (-1.0, math.nan, math.inf, "3", True, 1e9):
        with pytest.raises(ProtocolError) as err:
            decode_elapsed({"elapsed_s": bad})
        assert err.value.reason == "bad_reply"


@needs_mosquitto
def test_the_curve_networked_agrees_with_in_process(tmp_path):
    """Direct channel, one thread, reproducible DP noise (as the bit-exact test): the same curve."""
    from scenarios.networked import run_networked_scenario

    scn = toy_scenario(tmp_path, [*CURVE, "privacy.reproducible_noise=true"])
    ref = run_inprocess(scn, tmp_path / "inprocess", quiet())
    net = run_networked_scenario(scn, tmp_path / "networked", quiet(), "inprocess")
    acc = [(p["round"], p["accuracy"], p["f1_macro"]) for p in net["curve"]["points"]]
    assert acc == [(p["round"], p["accuracy"], p["f1_macro"]) for p in ref["curve"]["points"]]
    for i, m in ref["methods"]["nmoe"]["per_client"].items():
        got = net["methods"]["nmoe"]["per_client"][i]
        assert (got["accuracy"], got["f1_macro"]) == (m["accuracy"], m["f1_macro"])
    # every networked step was timed from the clients' replies; direct channel: no transit, host compute
    assert all(r["modeled_s"] is not None and r["modeled_s"] > 0 for r in net["rounds"])
    assert net["curve"]["clock"].startswith("no channel model (direct) + this host's compute seconds")
    assert net["curve"]["points"][-1]["modeled_s"] == pytest.approx(_training_clock(net))


def test_in_process_with_devices_the_clock_is_the_devices_not_this_hosts(tmp_path):
    """FLOPs over throughput: a 10x faster device takes a tenth of the modeled time for the same
    work, to rounding, which this host's own seconds would never do."""
    nano = run_inprocess(toy_scenario(tmp_path, [*CURVE, "devices.preset=jetson-nano"]), tmp_path / "a", quiet())
    faster = "{train_gflops: 250, infer_gflops: 500}"
    fast = run_inprocess(toy_scenario(tmp_path, [
        *CURVE, "devices.preset=jetson-nano",
        f"devices.clients={{client-0: {faster}, client-1: {faster}, client-2: {faster}}}"]), tmp_path / "b", quiet())
    clock = [r["modeled_s"] for r in nano["rounds"]]
    # (Stage 3's exchange of latents runs the experts outside the task's own compute: nothing to count)
    assert all(r["modeled_s"] > 0 for r in nano["rounds"] if r["op"] != "stage3_prepare")
    assert [r["modeled_s"] for r in fast["rounds"]] == pytest.approx([c / 10 for c in clock], rel=1e-9)
    assert nano["curve"]["clock"].startswith("the devices' modeled compute")


def test_a_sweep_summarizes_and_charts_the_time_to_target(tmp_path):
    import csv

    from scenarios.cli import main

    (tmp_path / "base.yaml").write_text(
        "name: toy\nseed: 3\nclients: 3\nthreads: 1\ndata: {name: synthetic, synthetic_train: 2000}\n"
        "partition: {kind: noniid, tau: 0.5, train_per_client: 48, test_per_client: 24}\n"
        "model: {head_hidden: 16, gate_hidden: 8}\nstage1: {method: fedce, rounds: 1, batch_size: 16}\n"
        "stage2: {epochs: 1}\nstage3: {rounds: 2, local_epochs: 1}\nbaselines: []\n")
    # one target every run reaches (a tiny accuracy) and one none does (1.0 on this noise-level toy)
    (tmp_path / "sweep.yaml").write_text("base: base.yaml\ngrid: {eval.target_accuracy: [0.001, 1.0]}\n"
                                         "set: {eval.every_round: true}\nseeds: [0]\n")
    out = tmp_path / "out"
    assert main(["sweep", str(tmp_path / "sweep.yaml"), "--out", str(out)]) == 0
    with open(out / "summary.csv") as fh:
        rows = {r["eval.target_accuracy"]: r for r in csv.DictReader(fh) if r["method"] == "nmoe"}
    assert rows["0.001"]["target_reached_mean"] == "1" and float(rows["0.001"]["time_to_target_s_mean"]) > 0
    assert rows["1.0"]["target_reached_mean"] == "0" and rows["1.0"]["time_to_target_s_mean"] == ""
    assert float(rows["1.0"]["training_modeled_s_mean"]) > 0
    assert (out / "chart_curves.png").stat().st_size > 10_000
