"""Many client agents as tasks of one process (``--agents inprocess``): a fleet of 200 over a real
mosquitto, each agent with its own session, their heavy work one call at a time."""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import needs_mosquitto

from broker.server import ensure_open_files
from nmoe.errors import ConfigError
from scenarios.agent_tasks import SerialWorker

ROOT = Path(__file__).resolve().parent.parent

# 200 clients of a tiny model (ResNet20 width 1, MLPs of 8 and 4) on 4 synthetic images each, one
# FedCE round, then Stage 2: every update (~1.1 MB, 5 chunks) reaches the coordinator at about the
# same time. Before the reassembly backstop grew with the clients, the 65th concurrent update and
# those after it were dropped and the round waited for them until its deadline.
MANY = """
name: many
seed: 1
clients: 200
threads: 1
data: {name: synthetic, synthetic_train: 1200}
partition: {kind: iid, train_per_client: 4, test_per_client: 2}
model: {head_hidden: 8, gate_hidden: 4}
stage1: {method: fedce, rounds: 1, local_epochs: 1, batch_size: 4}
stage2: {epochs: 0}
stage3: {rounds: 0}
baselines: []
until: stage2
network: {join_timeout_s: 240, round_timeout_s: 240, stage2_timeout_s: 240, min_clients: 200}
"""


@needs_mosquitto
@pytest.mark.skipif(sys.platform != "linux", reason="the multi-agent process is forked by the agent host (Linux)")
def test_two_hundred_inprocess_agents_finish_a_round_over_mosquitto(tmp_path: Path) -> None:
    # Prepare: `nmoe run` in a fresh interpreter (the agent host is forked while it is single-threaded)
    scenario = tmp_path / "many.yaml"
    scenario.write_text(MANY)
    out = tmp_path / "out"
    # Execute
    proc = subprocess.run([sys.executable, "-m", "scenarios.cli", "run", str(scenario), "--agents", "inprocess",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    # Assert
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    rounds = {(r["op"], r["round"]): r for r in results["rounds"]}
    fit = rounds[("stage1_fit", 0)]
    assert len(fit["answered"]) == 200 and not fit["failures"]
    assert len(rounds[("stage2_fit", 0)]["answered"]) == 200
    traffic = results["traffic"]
    assert traffic["agents"] == "inprocess"
    assert len(traffic["joined"]) == 200
    assert not {k: v for k, v in traffic["rejected"].items() if "overflow" in k}
    # every agent said goodbye over its own session, with its own counters
    assert len(traffic["clients"]) == 200
    assert all(c["sent_messages.update"] == 1 for c in traffic["clients"].values())
    # one process held them all, with one log, not one per agent
    logs = sorted(p.name for p in (out / "logs").iterdir())
    assert logs == ["agents.log"]
    assert not any(s.startswith("stage3") for s in results["stage_seconds"])  # until: stage2


def test_the_serial_worker_runs_one_call_at_a_time_in_arrival_order() -> None:
    # Prepare
    active, peak, order = [0], [0], []
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.01)
        with lock:
            active[0] -= 1
        order.append(i)
        return i * i

    async def main() -> list[int]:
        worker = SerialWorker()
        try:
            return await asyncio.gather(*(worker(lambda i=i: work(i)) for i in range(8)))
        finally:
            worker.close()

    # Execute
    results = asyncio.run(main())
    # Assert
    assert results == [i * i for i in range(8)]
    assert peak[0] == 1
    assert order == list(range(8))


def test_too_low_a_hard_limit_of_open_files_names_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a hard limit of 1024 open files, too few for 1000 sessions
    monkeypatch.setattr(resource, "getrlimit", lambda _: (256, 1024))
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"clients: 1000 agents .* hard limit is 1024"):
        ensure_open_files(4256, "1000 agents in one process")


def test_the_soft_limit_of_open_files_is_raised_to_what_the_agents_need(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    calls = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 1 << 20))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: calls.append(limits))
    # Execute
    soft = ensure_open_files(4256, "1000 agents in one process")
    # Assert
    assert soft == 4256 and calls == [(4256, 1 << 20)]
