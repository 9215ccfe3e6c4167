"""`nmoe run --resume RUN_DIR`: a run whose coordinator is SIGKILLed mid-Stage 1 continues from its
latest checkpoint, redoes no completed round, and ends with the numbers of a run never interrupted."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import needs_mosquitto, quiet, toy_scenario
from safetensors import safe_open

from nmoe.errors import ConfigError
from scenarios.cli import main
from scenarios.runner import Checkpoint, run_inprocess

SETS = ["stage1.method=fedce", "stage1.rounds=4", "stage1.local_epochs=3", "privacy.reproducible_noise=true",
        "baselines=[]", "stage3.rounds=1"]


def _checkpoint_round(out: Path) -> tuple[str, int] | None:
    try:
        with safe_open(str(out / "checkpoint.safetensors"), framework="pt") as fh:
            meta = fh.metadata() or {}
        return meta["stage"], int(meta["round"])
    except (OSError, KeyError, ValueError):
        return None


def _stage1_losses(out: Path) -> list[tuple[str, str]]:
    with open(out / "metrics.csv") as fh:
        return [(r["round"], r["mean_loss"]) for r in csv.DictReader(fh) if r["stage"] == "stage1"]


@needs_mosquitto
def test_a_run_killed_mid_stage1_resumes_to_the_numbers_of_an_uninterrupted_run(tmp_path):
    scn = toy_scenario(tmp_path, SETS)
    ref = run_inprocess(scn, tmp_path / "ref", quiet())
    out = tmp_path / "net"
    cmd = [sys.executable, "-m", "scenarios.cli", "run", str(tmp_path / "scenario.yaml"), "--out", str(out),
           *[x for s in SETS for x in ("--set", s)]]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while (_checkpoint_round(out) or ("", -1))[1] < 1:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no Stage 1 checkpoint in time"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)  # the coordinator dies mid-Stage 1, no cleanup of its own
    finally:
        proc.wait(30)
    stage, done = _checkpoint_round(out) or ("", -1)
    assert stage == "stage1" and 1 <= done < 3
    time.sleep(2)  # its agents and broker die with it (PR_SET_PDEATHSIG)
    assert main(["run", "--resume", str(out)]) == 0
    resumed = json.loads((out / "results.json").read_text())
    for i, m in ref["methods"]["nmoe"]["per_client"].items():
        got = resumed["methods"]["nmoe"]["per_client"][i]
        assert (got["accuracy"], got["f1_macro"]) == (m["accuracy"], m["f1_macro"])
    assert _stage1_losses(out) == _stage1_losses(tmp_path / "ref")  # every round once, none redone
    assert [r["round"] for r in resumed["rounds"] if r["stage"] == "stage1"] == [0, 1, 2, 3]


def test_resume_refuses_a_folder_without_a_checkpoint_or_with_other_arguments(tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint.safetensors there"):
        Checkpoint.load(tmp_path)
    (tmp_path / "scenario.yaml").write_text("name: x\n")
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert main(["run", "quickstart", "--resume", str(tmp_path)]) == 2
    assert main(["run"]) == 2
