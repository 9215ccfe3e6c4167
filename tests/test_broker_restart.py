"""A broker restart loses no answer: the run's own mosquitto is SIGKILLed mid-round, the run
restarts it on the same port with the same accounts, and every answer of that round arrives."""

from __future__ import annotations

import csv
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from conftest import needs_mosquitto, quiet, toy_scenario
from test_lifetime import descendants, running

from nmoe.errors import NmoeError
from scenarios.networked import run_networked_scenario


def mosquitto_of(run_name: str) -> int | None:
    """PID of the mosquitto this test process started for ``run_name`` (from its command line)."""
    for pid in descendants(os.getpid()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd[0].endswith(b"mosquitto") and f"/nmoe-{run_name}-".encode() in b" ".join(cmd) and running(pid):
            return pid
    return None


@needs_mosquitto
def test_a_broker_killed_mid_round_is_restarted_and_no_answer_is_lost(tmp_path: Path) -> None:
    scn = toy_scenario(tmp_path, [
        "name=restart", "stage1.method=fedce", "stage1.rounds=2", "stage1.local_epochs=8",
        "network.round_timeout_s=60",
    ])  # fmt: skip
    out = tmp_path / "out"
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["results"] = run_networked_scenario(scn, out, quiet(), "subprocess")
        except NmoeError as err:  # shown by the test's thread (anything else: the thread prints it)
            result["error"] = err

    runner = threading.Thread(target=run)
    runner.start()
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.safetensors").exists():  # round 0 done: round 1 is being trained
        assert runner.is_alive() and time.monotonic() < deadline, result
        time.sleep(0.1)
    time.sleep(0.3)
    first = mosquitto_of("restart")
    assert first is not None
    os.kill(first, signal.SIGKILL)
    while (again := mosquitto_of("restart")) in (None, first) and time.monotonic() < deadline:
        time.sleep(0.1)
    runner.join(180)
    assert not runner.is_alive() and "results" in result, result.get("error")
    assert again not in (None, first)  # restarted, as a new process
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["answered"] for r in rows] == ["3"] * len(rows) and not any(r["failures"] for r in rows), rows
    traffic = result["results"]["traffic"]
    assert traffic["coordinator"]["reconnects"] >= 1
