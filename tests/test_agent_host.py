"""The agent host: agents forked from a copy of the run process, their starts and exits reported
back, their output in their own log file, and nothing left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TOY, needs_mosquitto

ROOT = Path(__file__).resolve().parent.parent

# In a fresh interpreter: the host must be forked while the process is single-threaded, which a
# pytest process that already ran other tests may no longer be.
SCRIPT = r"""
import json, os, sys, time
from scenarios.agent_host import AgentHost, can_fork_host
assert can_fork_host()
host = AgentHost.fork()
log = sys.argv[1]
# an agent whose scenario does not exist: `nmoe agent` says so on stderr (its log) and exits 2
host.spawn("client-0", ["--id", "client-0", "--scenario", sys.argv[2], "--broker", "mqtt://client-0@127.0.0.1:1"],
           "secret", log)
deadline = time.monotonic() + 60
while "client-0" not in host.exits and time.monotonic() < deadline:
    host.poll()
    time.sleep(0.05)
pid = host.pids["client-0"]
host.close()
print(json.dumps({"pid": pid, "exits": host.exits, "host": host.pid, "me": os.getpid()}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the agent host is Linux's (fork, prctl)")
def test_an_agent_forked_by_the_host_logs_to_its_file_and_its_exit_status_comes_back(tmp_path: Path) -> None:
    # Prepare
    log = tmp_path / "client-0.log"
    missing = tmp_path / "nowhere.yaml"
    # Execute
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log), str(missing)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    # Assert
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["exits"] == {"client-0": 2}
    assert report["pid"] not in (report["host"], report["me"])
    text = log.read_text()
    assert "error:" in text and "nowhere.yaml" in text
    assert "secret" not in text
    assert (log.stat().st_mode & 0o777) == 0o600
    for pid in (report["pid"], report["host"]):  # both reaped: no process, not even a zombie
        assert not Path(f"/proc/{pid}").exists()


def test_no_host_is_forked_once_a_thread_runs() -> None:
    import threading

    from scenarios.agent_host import AgentHost, can_fork_host

    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        assert not can_fork_host()
        with pytest.raises(RuntimeError, match="single|thread"):
            AgentHost.fork()
    finally:
        stop.set()
        worker.join()


# Twelve agents in one batch: the host forks some, three spawners (copies of it) the others.
BATCH = r"""
import json, os, sys, time
from scenarios.agent_host import AgentHost, can_fork_host
host = AgentHost.fork()
ids = [f"client-{i}" for i in range(12)]
for agent in ids:
    host.spawn(agent, ["--id", agent, "--scenario", sys.argv[2], "--broker", f"mqtt://{agent}@127.0.0.1:1"],
               "secret", os.path.join(sys.argv[1], agent + ".log"))
deadline = time.monotonic() + 90
while len(host.exits) < len(ids) and time.monotonic() < deadline:
    host.poll()
    time.sleep(0.05)
host.close()
print(json.dumps({"pids": host.pids, "exits": host.exits, "host": host.pid}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the agent host is Linux's (fork, prctl)")
def test_a_batch_of_agents_is_forked_side_by_side_and_every_start_and_exit_comes_back(tmp_path: Path) -> None:
    # Prepare: agents whose scenario does not exist (each says so in its log and exits 2)
    missing = tmp_path / "nowhere.yaml"
    # Execute
    proc = subprocess.run([sys.executable, "-c", BATCH, str(tmp_path), str(missing)], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)
    # Assert
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    ids = [f"client-{i}" for i in range(12)]
    assert report["exits"] == {a: 2 for a in ids}
    assert sorted(report["pids"]) == sorted(ids) and len(set(report["pids"].values())) == 12
    for agent in ids:
        assert "nowhere.yaml" in (tmp_path / f"{agent}.log").read_text()
    # the host tried the scenario once for all of them, not once per agent
    assert proc.stderr.count("not warming") == 1
    for pid in (*report["pids"].values(), report["host"]):  # every one reaped, spawners included
        assert not Path(f"/proc/{pid}").exists()


LATER_CHILD = r"""
import json, os, sys
from scenarios import agent_host
from scenarios.agent_host import AgentHost, child_main
host = AgentHost.fork()
fds = sorted(agent_host._RUN_ENDS)
r, w = os.pipe()
pid = os.fork()
if pid == 0:  # a later child of the run, as a baseline worker is
    def body():
        still = []
        for fd in fds:
            try:
                os.fstat(fd)
                still.append(fd)
            except OSError:
                pass
        os.write(w, json.dumps(still).encode())
    child_main(body)
os.close(w)
held = json.loads(os.read(r, 4096))
os.waitpid(pid, 0)
host.close()
print(json.dumps({"fds": fds, "held": held, "left": sorted(agent_host._RUN_ENDS)}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the agent host is Linux's (fork, prctl)")
def test_a_later_child_of_the_run_lets_go_of_the_hosts_pipes() -> None:
    # A baseline worker that kept the host's request pipe open kept the host from seeing its EOF,
    # and the run's close() waited out its timeout for the host.
    proc = subprocess.run([sys.executable, "-c", LATER_CHILD], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(out["fds"]) == 3 and out["held"] == [] and out["left"] == []


@pytest.mark.skipif(sys.platform != "linux", reason="the agent host is Linux's (fork, prctl)")
@needs_mosquitto
def test_an_agent_forked_by_the_host_imports_nothing_of_its_own(tmp_path: Path) -> None:
    """Whatever an agent imports after its fork, every agent pays for (CPU at start-up, unshared
    pages): the host's PRELOAD must hold it. A whole networked run (all three stages, evaluation)
    with Python's import profiling on; an agent's log shows each module it imported itself."""
    # Prepare
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(TOY)
    env = os.environ | {"PYTHONPROFILEIMPORTTIME": "1"}
    # Execute
    proc = subprocess.run([sys.executable, "-m", "scenarios.cli", "run", str(scenario), "--set", "baselines=[]",
                           "--set", "stage1.rounds=1", "--set", "stage3.rounds=1", "--no-cache",
                           "--out", str(tmp_path / "out")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    # Assert
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "import time:" in proc.stderr  # the profiling is on: the run's own imports are listed
    logs = sorted((tmp_path / "out" / "logs").glob("client-*.log"))
    assert len(logs) == 3
    for log in logs:
        imported = [line.rsplit("|", 1)[1].strip() for line in log.read_text().splitlines()
                    if line.startswith("import time:") and "|" in line]  # fmt: skip
        imported = [name for name in imported if name != "imported package"]  # the profile's header
        assert not imported, f"{log.name}: the agent imported {imported}; add them to the host's PRELOAD"
