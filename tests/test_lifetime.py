"""A killed run leaves nothing behind: SIGKILL of `nmoe run` ends every process it started (fork
server, agents, channel emulator, mosquitto), the next start removes its broker folder, and an agent
whose coordinator went offline gives up after its grace period."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TOY, needs_mosquitto, toy_scenario

from agents.bus import BusConfig, BusSession
from agents.client import ClientAgent, CoordinatorGone
from broker.auth import make_accounts
from broker.lifetime import OWNER_FILE, make_run_dir, sweep_stale_run_dirs
from broker.server import MosquittoBroker

ROOT = Path(__file__).resolve().parent.parent


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc's parent links)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (a dead child nobody reaped yet)."""
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
@needs_mosquitto
@pytest.mark.parametrize("channel", ["direct", "emulated"])
def test_a_sigkilled_run_leaves_no_process_and_its_broker_folder_goes_next_start(tmp_path: Path,
                                                                                channel: str) -> None:
    scenario = tmp_path / "long.yaml"
    text = TOY.replace("name: toy", f"name: killed-{channel}")
    text = text.replace("rounds: 2, batch_size", "rounds: 50, batch_size")  # still running when killed
    if channel == "emulated":
        text += "channel: {model: emulated, preset: ideal}\n"
    scenario.write_text(text)
    out = tmp_path / "out"
    run = subprocess.Popen([sys.executable, "-m", "scenarios.cli", "run", str(scenario), "--out", str(out)],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not (out / "checkpoint.safetensors").exists():  # written after each round: agents joined
            assert run.poll() is None and time.monotonic() < deadline, "the run did not finish a round"
            time.sleep(0.2)
        started = descendants(run.pid)
        folders = [p for p in Path("/tmp").glob(f"nmoe-killed-{channel}-*")
                   if (p / OWNER_FILE).read_text().split()[0] == str(run.pid)]
        assert len(started) >= 1 + 3 + 1 + (channel == "emulated") and len(folders) == 1, started
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    deadline = time.monotonic() + 10
    while (left := {pid for pid in started if running(pid)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"still running after the run was killed: {left}"
    assert folders[0].exists()  # nothing ran to remove it: the next start does
    with MosquittoBroker("next", make_accounts(["client-0"])) as _:
        assert not folders[0].exists()


def test_only_folders_of_dead_owners_are_swept(tmp_path: Path) -> None:
    mine = make_run_dir("sweep")
    dead = tmp_path / "nmoe-x-dead"
    dead.mkdir()
    child = subprocess.Popen(["true"])
    child.wait()
    (dead / OWNER_FILE).write_text(f"{child.pid} -\n")
    recycled = tmp_path / "nmoe-x-recycled"  # our PID, but another process's start time
    recycled.mkdir()
    (recycled / OWNER_FILE).write_text(f"{os.getpid()} 1\n")
    foreign = tmp_path / "nmoe-x-foreign"  # no owner file: not ours to judge
    foreign.mkdir()
    try:
        assert set(sweep_stale_run_dirs(tmp_path)) == {dead, recycled}
        assert foreign.exists() and mine.exists() and mine not in sweep_stale_run_dirs()
    finally:
        mine.joinpath(OWNER_FILE).unlink()
        mine.rmdir()


@needs_mosquitto
async def test_an_agent_gives_up_after_the_grace_period_when_the_coordinator_goes_offline(
        tmp_path: Path, mosquitto: MosquittoBroker) -> None:  # fmt: skip
    scn = toy_scenario(tmp_path, ["network.coordinator_grace_s=1.5"])
    fast = dict(reconnect_initial_s=0.05, reconnect_max_s=0.3, connect_timeout_s=5.0)
    coordinator = BusSession(BusConfig("t1", "coordinator", mosquitto.address_for("coordinator"), **fast))
    agent = ClientAgent(scn, scn.network, 0,
                        BusConfig("t1", "client-0", mosquitto.address_for("client-0"), **fast))  # fmt: skip
    await coordinator.__aenter__()
    task = asyncio.create_task(agent.run())
    await asyncio.sleep(1.0)
    assert not task.done()
    await coordinator.__aexit__(None, None, None)  # says offline, as its last will would
    gone_at = time.monotonic()
    with pytest.raises(CoordinatorGone, match=r"coordinator has been offline for 1.5s"):
        await asyncio.wait_for(task, 20)
    assert 1.5 <= time.monotonic() - gone_at < 5


def test_wait_exited_returns_once_the_child_has_exited_or_at_its_timeout() -> None:
    """``wait_exited`` (what a broker's and the agent host's stop wait on) comes back when the child
    has exited, leaving it to be reaped; at its timeout when it has not; at once for a reaped one."""
    from broker.lifetime import wait_exited

    quick = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    wait_exited(quick.pid, 60)
    assert os.waitid(os.P_PID, quick.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None  # exited, unreaped
    assert quick.wait(0) == 0
    wait_exited(quick.pid, 60)  # reaped: nothing to wait for (no error, no hang)

    slow = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        wait_exited(slow.pid, 0.2)
        assert slow.poll() is None  # the timeout, not an exit, ended the wait
    finally:
        slow.kill()
        slow.wait(10)
