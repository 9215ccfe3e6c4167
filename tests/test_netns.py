"""Agents on other hosts, the path a user follows with boards on a LAN: the broker and coordinator in
one Linux network namespace, each agent in its own, joined by veth pairs on a private test subnet
made here, `nmoe run --agents external --listen 0.0.0.0` on one side and `nmoe agent` on the others.
Needs root and `ip netns` (skipped with the reason otherwise); the namespaces are removed by name."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import needs_mosquitto

ROOT = Path(__file__).resolve().parents[1]
SCENARIO = """
name: lan
seed: 3
clients: 2
threads: 1
data: {name: synthetic, synthetic_train: 1000}
partition: {kind: noniid, tau: 0.5, train_per_client: 48, test_per_client: 24}
model: {head_hidden: 16, gate_hidden: 8}
stage1: {method: fedce, rounds: 1, batch_size: 16}
stage2: {epochs: 1}
stage3: {rounds: 1, local_epochs: 1}
network: {join_timeout_s: 120, round_timeout_s: 120, inference_deadline_s: 10}
"""


def ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=10)


def _can_make_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    probe = f"nmoe-probe-{os.getpid()}"
    try:
        ip("netns", "add", probe)
        ip("link", "add", "vprobe0", "netns", probe, "type", "veth", "peer", "name", "vprobe1", "netns", probe)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        return f"cannot create network namespaces and veth pairs here ({err})"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return None


@needs_mosquitto
def test_agents_in_other_namespaces_join_a_run_over_veth_links(tmp_path):
    why = _can_make_namespaces()
    if why:
        pytest.skip(why)
    tag = os.getpid() % 10000
    server, agents = f"nmoe-srv-{tag}", [f"nmoe-a{i}-{tag}" for i in range(2)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ip("netns", "add", server)
        ip("link", "set", "lo", "up", ns=server)
        for i, ns in enumerate(agents):  # one veth pair per board: 10.77.<tag+i>.1 (server) <-> .2 (board)
            ip("netns", "add", ns)
            ip("link", "set", "lo", "up", ns=ns)
            ip("link", "add", f"vs{i}-{tag}", "netns", server, "type", "veth", "peer", "name", f"va{i}-{tag}",
               "netns", ns)
            net = f"10.77.{(tag + i) % 250}"
            ip("addr", "add", f"{net}.1/24", "dev", f"vs{i}-{tag}", ns=server)
            ip("addr", "add", f"{net}.2/24", "dev", f"va{i}-{tag}", ns=ns)
            ip("link", "set", f"vs{i}-{tag}", "up", ns=server)
            ip("link", "set", f"va{i}-{tag}", "up", ns=ns)
        (tmp_path / "lan.yaml").write_text(SCENARIO)
        out = tmp_path / "run"
        py = [sys.executable, "-m", "scenarios.cli"]
        coordinator = subprocess.Popen(
            ["ip", "netns", "exec", server, *py, "run", str(tmp_path / "lan.yaml"), "--agents", "external",
             "--listen", "0.0.0.0", "--out", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        procs.append(coordinator)
        deadline = time.monotonic() + 120
        while not (out / "agents.txt").is_file():
            assert coordinator.poll() is None, (coordinator.stdout.read() if coordinator.stdout else b"").decode()
            assert time.monotonic() < deadline, "the coordinator wrote no agents.txt"
            time.sleep(0.2)
        lines = [x for x in (out / "agents.txt").read_text().splitlines() if x.startswith("NMOE_BROKER_PASSWORD")]
        for i, (ns, line) in enumerate(zip(agents, lines, strict=True)):
            m = re.match(r"NMOE_BROKER_PASSWORD='([^']*)' .*--broker 'mqtt://(client-\d+)@<this-host>:(\d+)'", line)
            assert m is not None, line
            password, agent, port = m.groups()
            url = f"mqtt://{agent}@10.77.{(tag + i) % 250}.1:{port}"
            procs.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, *py, "agent", "--id", agent, "--run-id", "lan", "--scenario",
                 str(out / "scenario.yaml"), "--broker", url], cwd=ROOT, env={**os.environ,
                 "NMOE_BROKER_PASSWORD": password}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        output, _ = coordinator.communicate(timeout=300)
        assert coordinator.returncode == 0, output.decode()[-2000:]
        results = (out / "results.json").read_text()
        assert '"nmoe"' in results and '"client-0"' in results and '"client-1"' in results
        for p in procs[1:]:
            assert p.wait(60) == 0  # the agents leave when the coordinator says shutdown
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        for ns in (server, *agents):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
