"""The baselines of a networked run, trained in a forked worker beside the federated stages
(scenarios/baseline_worker.py): the same numbers as training them afterwards, and a worker that
fails or dies is an error that says so, never a run that hangs or reports nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import TOY, needs_mosquitto

ROOT = Path(__file__).resolve().parent.parent


def nmoe_run(scenario: Path, out: Path, *, parallel: bool) -> dict:
    env = {**os.environ, "NMOE_PARALLEL_BASELINES": "1" if parallel else "0"}
    proc = subprocess.run(
        [sys.executable, "-m", "scenarios.cli", "run", str(scenario), "--agents", "inprocess", "--no-cache",
         "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads((out / "results.json").read_text())


@needs_mosquitto
def test_baselines_trained_beside_the_federated_stages_match_those_trained_after(tmp_path):
    scenario = tmp_path / "toy.yaml"
    # reproducible DP noise: else Stage 1 draws fresh noise in every run
    scenario.write_text(TOY + "baselines: [local, fedavg, centralized]\nprivacy: {reproducible_noise: true}\n")
    after = nmoe_run(scenario, tmp_path / "after", parallel=False)
    beside = nmoe_run(scenario, tmp_path / "beside", parallel=True)
    assert "baseline_worker" not in after
    assert beside["baseline_worker"]["baselines"] == ["local", "fedavg", "centralized"]
    for name in ("local", "fedavg", "centralized"):
        assert beside["methods"][name]["per_client"] == after["methods"][name]["per_client"], name
    # and the federated stages are untouched by what ran beside them
    for i, m in after["methods"]["nmoe"]["per_client"].items():
        got = beside["methods"]["nmoe"]["per_client"][i]
        assert (got["accuracy"], got["f1_macro"]) == (m["accuracy"], m["f1_macro"])


SCRIPT = """
import os, signal, sys
sys.path.insert(0, {root!r})
from scenarios.baseline_worker import BaselineError, BaselineWorker
from scenarios.scenario import load_scenario
scn = load_scenario({scenario!r}, {overrides!r})
worker = BaselineWorker.fork(scn, None)
if {kill!r}:
    os.kill(worker.pid, signal.SIGKILL)
try:
    worker.result()
except BaselineError as err:
    print("ERROR", err)
else:
    print("NO ERROR")
"""


def run_script(tmp_path: Path, overrides: list[str], kill: bool) -> str:
    scenario = tmp_path / "toy.yaml"
    scenario.write_text(TOY + "baselines: [local]\n")
    code = SCRIPT.format(root=str(ROOT), scenario=str(scenario), overrides=overrides, kill=kill)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_a_worker_that_fails_says_why(tmp_path):
    out = run_script(tmp_path, ["data.name=cifar10", f"data.root={tmp_path / 'nothing-here'}"], kill=False)
    assert out.startswith("ERROR training the baselines failed: DataError:"), out
    assert "nothing-here" in out


def test_a_worker_that_dies_is_an_error_not_a_hang(tmp_path):
    out = run_script(tmp_path, [], kill=True)
    assert out.startswith("ERROR the baseline worker"), out
    assert "ended without an answer (exit status -9)" in out
