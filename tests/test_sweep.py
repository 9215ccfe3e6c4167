"""`nmoe sweep`: validated before any work, resumable, failures recorded, summary from disk."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from nmoe.errors import ConfigError
from scenarios.cli import main
from scenarios.scenario import PACKAGED, Scenario
from scenarios.schema import build, to_dict
from scenarios.sweep import finished, load_sweep
from scenarios.sweep_report import ci95, training_losses

BASE = """
name: toy
seed: 3
clients: 3
threads: 1
data: {name: synthetic, synthetic_train: 2000}
partition: {kind: noniid, tau: 0.5, train_per_client: 48, test_per_client: 24}
model: {head_hidden: 16, gate_hidden: 8}
stage1: {method: fedce, rounds: 1, batch_size: 16}
stage2: {epochs: 1}
stage3: {rounds: 1, local_epochs: 1}
baselines: [local]
"""


def _files(tmp_path: Path, sweep: str) -> Path:
    (tmp_path / "base.yaml").write_text(BASE)
    path = tmp_path / "sweep.yaml"
    path.write_text(sweep)
    return path


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ("base: base.yaml\ngrid: {stage1.methd: [fedsc]}", "grid cell stage1.methd=fedsc, seed 3: stage1.methd: "
                                                          "unknown key (did you mean 'method'?)"),
        ("base: base.yaml\ngrid: {}", "grid: empty or missing"),
        ("base: base.yaml", "grid: empty or missing"),
        ("base: base.yaml\ngrid: {partition.tau: [0.5, 1.5]}", "partition.tau: must be in [0, 1] (got 1.5)"),
        ("base: base.yaml\ngrid: {stage3.train_top_k: [0, 1]}", "stage3.train_top_k: 1 gives the gate zero gradient"),
        ("base: base.yaml\ngrid: {partition.tau: []}", "grid.partition.tau: must be a non-empty list"),
        ("base: no-such-scenario\ngrid: {partition.tau: [0.5]}", "scenario file not found: no-such-scenario"),
        ("base: base.yaml\ngird: {partition.tau: [0.5]}", "gird: unknown key; allowed keys: base"),
        ("base: base.yaml\ngrid: {partition.tau: [0.5]}\nseeds: [1, 1]", "seeds: has duplicates"),
        ("base: base.yaml\ngrid: {partition.tau.x: [0.5]}", "grid.partition.tau.x: partition.tau is a value"),
    ],
)
def test_bad_sweeps_fail_before_any_work_naming_the_problem(tmp_path, sweep, message):
    path = _files(tmp_path, sweep)
    with pytest.raises(ConfigError) as err:
        load_sweep(path, str(tmp_path / "out"))
    assert message in str(err.value)
    assert not (tmp_path / "out").exists()


def test_cells_are_the_grid_product_times_the_seeds(tmp_path):
    path = _files(tmp_path, "base: base.yaml\ngrid: {partition.tau: [0.9, 0.2], stage1.method: [fedce, fedsc]}\n"
                            "set: {stage2: {epochs: 2}}\nseeds: [0, 1, 2]")
    sweep = load_sweep(path, str(tmp_path / "out"), ["stage3.rounds=2"], threads=2)
    assert len(sweep.runs) == 12 and len({r.cell for r in sweep.runs}) == 4
    run = sweep.runs[0]
    assert run.cell == 'partition.tau=0.9,stage1.method=fedce'
    assert run.folder == tmp_path / "out" / run.cell / "seed-0"
    assert (run.data["stage2"]["epochs"], run.data["stage3"]["rounds"]) == (2, 2)
    assert run.data["stage1"]["rounds"] == 1  # `set` merges into a section, it does not replace it
    assert run.data["threads"] == 2  # cores / jobs, not the base's 1
    own = load_sweep(path, str(tmp_path / "out"), ["threads=1"], threads=2)
    assert own.runs[0].data["threads"] == 1  # unless the sweep sets it


def test_ci95_is_students_t_interval():
    assert ci95([0.5]) != ci95([0.5])  # NaN: one seed gives no interval
    assert ci95([1.0, 2.0, 3.0]) == pytest.approx(4.302653 * 1.0 / 3**0.5, rel=1e-5)


def test_a_tiny_sweep_runs_resumes_records_failures_and_reports(tmp_path, capsys):
    # Prepare: two cells x two seeds; the second cell asks for more samples than the data has
    path = _files(tmp_path, "base: base.yaml\ngrid: {partition.train_per_client: [48, 5000]}\nseeds: [0, 1]")
    out = tmp_path / "out"
    # Execute
    code = main(["sweep", str(path), "--out", str(out)])
    # Assert: the good cell's runs are ordinary run folders, the bad cell's failures are recorded
    assert code == 1
    for seed in (0, 1):
        assert (out / "partition.train_per_client=48" / f"seed-{seed}" / "results.json").is_file()
        assert "DataError" in (out / "partition.train_per_client=5000" / f"seed-{seed}" / "error.txt").read_text()
    with open(out / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    good = {r["method"]: r for r in rows if r["partition.train_per_client"] == "48"}
    assert set(good) == {"nmoe", "fedavg", "local"}
    assert all(r["n_seeds"] == "2" and r["failed_seeds"] == "0" for r in good.values())
    assert 0 <= float(good["nmoe"]["accuracy_mean"]) <= 1 and float(good["nmoe"]["accuracy_ci95"]) >= 0
    bad = [r for r in rows if r["partition.train_per_client"] == "5000"]
    assert len(bad) == 1 and bad[0]["method"] == "-" and bad[0]["failed_seeds"] == "2"
    assert "DataError" in bad[0]["error"]
    assert (out / "chart_partition.train_per_client.png").stat().st_size > 0
    assert "2 run(s) failed" in capsys.readouterr().out
    # Execute again, in two worker processes, with one finished run's results.json cut short
    cut = out / "partition.train_per_client=48" / "seed-1" / "results.json"
    cut.write_text(cut.read_text()[:100])
    kept = (out / "partition.train_per_client=48" / "seed-0" / "results.json").stat().st_mtime_ns
    assert main(["sweep", str(path), "--out", str(out), "--jobs", "2"]) == 1
    said = capsys.readouterr().out
    # Assert: the finished run is skipped, the cut one runs again, the failed ones are retried
    assert "skipping 1 finished run(s) of 4" in said and "retrying 2 run(s) that failed before" in said
    assert (out / "partition.train_per_client=48" / "seed-0" / "results.json").stat().st_mtime_ns == kept
    assert cut.read_text().startswith("{") and len(cut.read_text()) > 100
    # --report redraws from disk and runs nothing
    (out / "summary.csv").unlink()
    assert main(["sweep", str(path), "--out", str(out), "--report"]) == 0
    assert (out / "summary.csv").is_file()
    assert (out / "partition.train_per_client=48" / "seed-0" / "results.json").stat().st_mtime_ns == kept


def test_the_training_chart_follows_each_stage_round_by_round(tmp_path, capsys):
    """chart_training.png: every stage's loss per round from the runs' metrics.csv (FedCE and FedSC in
    panels of their own); a run whose metrics.csv cannot be read is left out and named, not hidden."""
    # Prepare: FedCE and FedSC, two rounds of Stage 1 and of Stage 3
    path = _files(tmp_path, "base: base.yaml\ngrid: {stage1.method: [fedce, fedsc]}\n"
                            "set: {stage1: {rounds: 2}, stage3: {rounds: 2}, baselines: []}\nseeds: [0]")
    out = tmp_path / "out"
    # Execute
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    # Assert
    chart = out / "chart_training.png"
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweep = load_sweep(path, str(out))
    for run in sweep.runs:
        with open(run.folder / "metrics.csv") as fh:
            fits = [r for r in csv.DictReader(fh) if r["op"] in ("stage1_fit", "stage3_fit") and r["mean_loss"]]
        losses = training_losses(run)
        assert [len(losses[s]) for s in ("stage1", "stage3:fedgate")] == [2, 2]
        assert sum(len(v) for v in losses.values()) == len(fits)
        assert losses["stage1"][1] == (1, float(next(r for r in fits if r["op"] == "stage1_fit" and r["round"] == "1")
                                                 ["mean_loss"]))  # fmt: skip
    # Execute: one run's metrics.csv damaged, then --report
    bad = sweep.runs[1].folder / "metrics.csv"
    with open(bad) as fh:
        rows = list(csv.DictReader(fh))
    next(r for r in rows if r["op"] == "stage1_fit")["mean_loss"] = "n/a"
    with open(bad, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    chart.unlink()
    assert main(["sweep", str(path), "--out", str(out), "--report"]) == 0
    # Assert: drawn from the other run, and the damaged file named
    assert chart.is_file()
    said = capsys.readouterr().out
    assert "leaves out 1 run(s)" in said and "metrics.csv" in said


@pytest.mark.parametrize("path", sorted((PACKAGED / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_sweeps_validate(path, tmp_path):
    sweep = load_sweep(path, str(tmp_path / "out"))
    assert sweep.runs and sweep.name == path.stem


STRESS = sorted(p for p in (PACKAGED / "stress").glob("*.yaml") if p.stem != "base")


@pytest.mark.parametrize("path", STRESS, ids=lambda p: p.stem)
def test_stress_sweeps_validate(path, tmp_path):
    sweep = load_sweep(path, str(tmp_path / "out"))
    assert sweep.runs and sweep.name == f"stress_{path.stem}"
    assert all(r.data["channel"]["model"] == "emulated" for r in sweep.runs)


def test_a_sweep_over_a_later_stage_trains_stage1_once(tmp_path):
    import json

    path = _files(tmp_path, "base: base.yaml\ngrid: {stage3.rounds: [1, 2]}\nseeds: [3]")
    assert main(["sweep", str(path), "--out", str(tmp_path / "out")]) == 0
    stages = [json.loads(p.read_text())["cache"]["stages"] for p in sorted((tmp_path / "out").rglob("results.json"))]
    assert sorted(s["stage1"]["status"] for s in stages) == ["computed", "loaded"]
    assert len({s["stage1"]["key"] for s in stages}) == 1
    path.write_text("base: base.yaml\ngrid: {stage3.rounds: [1]}\nseeds: [3]")
    assert main(["sweep", str(path), "--out", str(tmp_path / "nocache"), "--no-cache"]) == 0
    assert all("cache" not in json.loads(p.read_text()) for p in (tmp_path / "nocache").rglob("results.json"))


def test_a_run_made_before_a_new_setting_existed_still_counts_as_finished(tmp_path):
    # Arrange: a run's results.json whose config lacks a field the schema has since gained (at its default)
    path = _files(tmp_path, "base: base.yaml\ngrid: {partition.tau: [0.5]}")
    run = load_sweep(path, str(tmp_path / "out"), [], threads=1).runs[0]
    config = to_dict(build(Scenario, run.data))
    del config["network"]["round_timeout_s"]
    run.folder.mkdir(parents=True)
    (run.folder / "results.json").write_text(json.dumps({"config": config}))
    # Act / assert: the missing field takes its default, so the run is the same one
    assert finished(run)
    # ... but a run that used another value of a setting is not
    config["network"]["rejected_grace_s"] = 99.0
    (run.folder / "results.json").write_text(json.dumps({"config": config}))
    assert not finished(run)


def test_a_finished_run_still_counts_under_another_sweep_name(tmp_path):
    # a run made by the sweep under one name (its scenario's name and description are the sweep's)
    path = _files(tmp_path, "base: base.yaml\ngrid: {partition.tau: [0.5]}")
    run = load_sweep(path, str(tmp_path / "out"), [], threads=1).runs[0]
    config = to_dict(build(Scenario, run.data))
    config["name"], config["description"] = "an-earlier-name", "said otherwise"
    run.folder.mkdir(parents=True)
    (run.folder / "results.json").write_text(json.dumps({"config": config}))
    assert finished(run)
