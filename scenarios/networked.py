"""A networked run: broker, coordinator and client agents talking over MQTT.

``nmoe run SCENARIO`` starts a broker (mosquitto, else embedded amqtt, or uses ``--broker``), runs
the coordinator in this process and the N client agents as subprocesses (or as tasks, or waits for
agents started by hand on edge boards), and stops every process it started, by its own PID, on
success, on failure and on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import multiprocessing
import multiprocessing.process
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from rich.console import Console
from rich.progress import Progress

from agents.bus import BusConfig, BusSession
from agents.client import ClientAgent
from agents.codec import CHANNEL, COORDINATOR, client_index, client_name
from agents.coordinator import BusFleet, coordinate
from agents.protocol import Task
from agents.strategy import Strategy
from broker.auth import PASSWORD_ENV, Account, BrokerAddress, ChannelMode, make_accounts
from broker.server import Prefer, RunningBroker, launch_broker
from broker.wire import ReassemblyLimits
from nmoe.errors import ChannelError, NmoeError
from nmoe_models.partition import load_client_data

from .runner import ProgressObserver, make_progress, run_baselines, set_threads, stage1_classifier
from .scenario import Scenario
from .schema import to_dict

AgentsMode = Literal["subprocess", "inprocess", "external"]


class AgentsFailed(NmoeError):
    """Client agent processes exited before the run ended."""


def bus_config(scn: Scenario, run_id: str, agent_id: str, address: BrokerAddress) -> BusConfig:
    mode: ChannelMode = "emulated" if scn.channel.model == "emulated" else "direct"
    # the largest message is Stage 1's model: ResNet20 has ~0.3M float32 parameters per width^2
    model_bytes = int(4 * 0.3e6 * scn.model.width**2 * 1.25)
    default = ReassemblyLimits()
    limits = ReassemblyLimits(max_message_bytes=max(default.max_message_bytes, 2 * model_bytes),
                              max_pending_bytes=max(default.max_pending_bytes, 4 * model_bytes))
    return BusConfig(run_id, agent_id, address, channel_mode=mode, chunk_size=scn.network.chunk_size,
                     compression=scn.network.compression, limits=limits)


def write_scenario(scn: Scenario, path: Path) -> Path:
    """The resolved scenario (overrides applied), which subprocess agents load."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(scn), sort_keys=False))
    return path


def _die_with_parent() -> None:
    """Linux: get SIGTERM when the fork server dies (it does when the run's process dies, even by
    SIGKILL), so no agent outlives its run. Elsewhere the run's own cleanup is all there is."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def agent_process(argv: list[str], password: str, log_path: str) -> None:
    """Body of one agent process: `nmoe agent ARGV` with its output in its own log file."""
    _die_with_parent()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ[PASSWORD_ENV] = password  # this process only; never on a command line
    from .cli import main

    sys.exit(main(argv))


class AgentProcesses:
    """Client agents as child processes; each logs to <out>/logs/<id>.log; stopped by their PIDs.

    They are forked from a multiprocessing fork server that has imported torch and the agent code
    once (torch alone costs a second or two of CPU per process; ten agents on two cores would spend
    over 15 s just importing). Each agent runs exactly ``nmoe agent --id ... --scenario ...``.
    """

    PRELOAD = ["torch", "torch._dynamo", "sklearn.metrics", "agents.client", "scenarios.cli", "scenarios.networked"]

    def __init__(self, scenario_file: Path, run_id: str, broker: RunningBroker, ids: list[str], log_dir: Path) -> None:
        self.scenario_file = scenario_file
        self.run_id = run_id
        self.broker = broker
        self.ids = ids
        self.log_dir = log_dir
        self.procs: dict[str, multiprocessing.process.BaseProcess] = {}

    async def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(self.PRELOAD)
        for agent in self.ids:
            addr = self.broker.address_for(agent)
            scheme = "mqtts" if addr.tls else "mqtt"
            argv = ["agent", "--id", agent, "--scenario", str(self.scenario_file), "--run-id", self.run_id,
                    "--broker", f"{scheme}://{agent}@{addr.host}:{addr.port}"]
            proc = ctx.Process(target=agent_process, name=agent,
                               args=(argv, addr.password or "", str(self.log_dir / f"{agent}.log")))
            await asyncio.to_thread(proc.start)  # the first start launches the fork server
            self.procs[agent] = proc

    def kill(self, agent: str) -> None:
        """SIGKILL one agent (fault injection): no clean goodbye, its last will says offline."""
        proc = self.procs[agent]
        if proc.is_alive():
            proc.kill()

    def failed(self) -> dict[str, int]:
        """Agents that already exited with an error: id -> exit status."""
        return {a: p.exitcode for a, p in self.procs.items() if p.exitcode not in (None, 0)}

    def log_tail(self, agent: str, lines: int = 8) -> str:
        try:
            text = (self.log_dir / f"{agent}.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def _until_exited(self, procs: list[multiprocessing.process.BaseProcess], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(p.is_alive() for p in procs) and loop.time() < deadline:
            await asyncio.sleep(0.1)

    async def wait(self, timeout: float) -> None:
        await self._until_exited(list(self.procs.values()), timeout)

    async def stop(self) -> None:
        """Terminate what still runs (SIGTERM, then SIGKILL after 5 s), by PID."""
        alive = [p for p in self.procs.values() if p.is_alive()]
        for p in alive:
            p.terminate()
        await self._until_exited(alive, 5.0)
        for p in alive:
            if p.is_alive():
                p.kill()
        for p in self.procs.values():
            await asyncio.to_thread(p.join, 5.0)
            p.close()


class AgentTasks:
    """Client agents as asyncio tasks in this process (tests, debugging)."""

    def __init__(self, scn: Scenario, run_id: str, broker: RunningBroker) -> None:
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.scn, self.run_id, self.broker = scn, run_id, broker

    async def start(self) -> None:
        for i in range(self.scn.clients):
            name = client_name(i)
            cfg = bus_config(self.scn, self.run_id, name, self.broker.address_for(name))
            agent = ClientAgent(self.scn, self.scn.network, i, cfg, self.scn.channel.time_scale)
            self.tasks[name] = asyncio.create_task(agent.run(), name=name)

    def kill(self, agent: str) -> None:
        self.tasks[agent].cancel()

    def failed(self) -> dict[str, int]:
        return {a: 1 for a, t in self.tasks.items() if t.done() and not t.cancelled() and t.exception() is not None}

    def log_tail(self, agent: str, lines: int = 8) -> str:
        task = self.tasks[agent]
        return repr(task.exception()) if task.done() and not task.cancelled() else ""

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self.tasks.values(), return_exceptions=True), timeout)

    async def stop(self) -> None:
        for t in self.tasks.values():
            t.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


def external_instructions(scn: Scenario, run_id: str, broker: RunningBroker, scenario_file: Path,
                          out_dir: Path) -> Path:
    """Write each board's command line (with its password) to a file only the owner can read."""
    lines = ["# Start one agent per edge board (copy the scenario file there first)."]
    for i in range(scn.clients):
        agent = client_name(i)
        addr = broker.address_for(agent)
        lines.append(f"NMOE_BROKER_PASSWORD='{addr.password}' nmoe agent --id {agent} --run-id {run_id} "
                     f"--scenario {scenario_file.name} --broker mqtt://{agent}@<this-host>:{addr.port}")
    path = out_dir / "agents.txt"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


@contextlib.asynccontextmanager
async def agents_running(mode: AgentsMode, scn: Scenario, run_id: str, broker: RunningBroker, scenario_file: Path,
                         out_dir: Path) -> AsyncIterator[AgentProcesses | AgentTasks | None]:
    group: AgentProcesses | AgentTasks | None = None
    if mode == "subprocess":
        group = AgentProcesses(scenario_file, run_id, broker, [client_name(i) for i in range(scn.clients)],
                               out_dir / "logs")
    elif mode == "inprocess":
        group = AgentTasks(scn, run_id, broker)
    if group is None:
        yield None
        return
    try:
        await group.start()
        yield group
    except BaseException:  # failure, Ctrl-C or kill: stop them now
        await group.stop()
        raise
    try:
        await group.wait(15.0)  # after the coordinator's shutdown they leave on their own
    finally:
        await group.stop()


async def _watch(fleet: BusFleet, group: AgentProcesses | AgentTasks | None, channel: ChannelProcess | None,
                 progress: Progress, started: float) -> None:
    """Keep the 'bus' line of the display current; fail fast when agents die before JOIN is over,
    or when the channel emulator dies (every message would be lost from then on)."""
    task = progress.add_task("bus", total=None, info="")
    while True:
        if channel is not None:
            channel.check()
        online = len([a for a in fleet.bus.online() if client_index(a) is not None])
        s = fleet.bus.stats
        moved = (sum(s.sent_bytes.values()) + sum(s.received_bytes.values())) / 1e6
        progress.update(task, info=f"{online}/{len(fleet.clients)} clients online, "
                                   f"{moved:.1f} MB through the coordinator, {time.perf_counter() - started:.0f}s")
        if group is not None and not fleet.join_over and (failed := group.failed()):
            first = next(iter(failed))
            raise AgentsFailed(f"{len(failed)} agent(s) exited with an error before joining ({', '.join(failed)}); "
                               f"the last lines of {first}'s log:\n{group.log_tail(first)}")
        await asyncio.sleep(0.5)


class ChannelProcess:
    """The wireless channel emulator between the agents, as its own process (it relays every byte
    twice through the broker: on two cores it must not share the coordinator's interpreter)."""

    def __init__(self, scn: Scenario, run_id: str, broker: RunningBroker, clients: list[str], out_dir: Path) -> None:
        self.config = out_dir / "channel.json"
        self.config.write_text(json.dumps(dataclasses.asdict(scn.channel)))
        self.stats_file = out_dir / "channel_stats.json"
        self.log_path = out_dir / "logs" / "channel.log"
        self.addr = broker.address_for(CHANNEL)
        scheme = "mqtts" if self.addr.tls else "mqtt"
        self.cmd = [sys.executable, "-m", "broker.channel.emulator", "--run-id", run_id,
                    "--broker", f"{scheme}://{CHANNEL}@{self.addr.host}:{self.addr.port}",
                    "--agents", ",".join([COORDINATOR, *clients]), "--wired", COORDINATOR,
                    "--config", str(self.config), "--seed", str(scn.seed), "--stats", str(self.stats_file)]
        self.proc: asyncio.subprocess.Process | None = None
        self.stats: dict[str, Any] = {}  # per-link figures, once it has stopped

    async def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=log,
                env={**os.environ, PASSWORD_ENV: self.addr.password or ""})
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), 30.0)
        except asyncio.TimeoutError:
            line = b""
        if line.strip() != b"ready":
            raise ChannelError(f"the channel emulator did not start; see {self.log_path}")

    def check(self) -> None:
        if self.proc is not None and self.proc.returncode is not None:
            raise ChannelError(f"the channel emulator exited ({self.proc.returncode}) in the middle of the run; "
                               f"see {self.log_path}")

    async def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            proc.terminate()  # it writes its stats and exits
            try:
                await asyncio.wait_for(proc.wait(), 10.0)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
        if self.stats_file.exists():
            self.stats.update(json.loads(self.stats_file.read_text()))


@contextlib.asynccontextmanager
async def channel_running(scn: Scenario, run_id: str, broker: RunningBroker, clients: list[str],
                          out_dir: Path) -> AsyncIterator[ChannelProcess | None]:
    """The emulator when the scenario asks for one; stopped (by PID) whatever happens."""
    if scn.channel.model != "emulated":
        yield None
        return
    channel = ChannelProcess(scn, run_id, broker, clients, out_dir)
    try:
        await channel.start()
        yield channel
    finally:
        await channel.stop()


def _kill(group: AgentProcesses | AgentTasks, agent: str, event: Callable[[str], None]) -> None:
    event(f"fault injection: killing {agent}")
    group.kill(agent)


async def run_networked(scn: Scenario, out_dir: Path, console: Console, mode: AgentsMode = "subprocess",
                        broker_url: str | None = None, listen: str = "127.0.0.1",
                        broker_kind: Prefer = "auto") -> tuple[Any, dict[str, Any]]:
    """Run the method over the bus; returns the Strategy's outcome and the traffic report."""
    run_id = scn.name
    ids = [client_name(i) for i in range(scn.clients)]
    accounts: list[Account] = make_accounts(ids)
    external = BrokerAddress.parse(broker_url) if broker_url else None
    if external is not None:  # an external broker knows its own accounts: everyone uses the URL's
        accounts = [Account(a.username, external.password or "", a.role) for a in accounts]
    scenario_file = write_scenario(scn, out_dir / "scenario.yaml")
    channel_mode: ChannelMode = "emulated" if scn.channel.model == "emulated" else "direct"
    started = time.perf_counter()
    timeline = {"started_at": time.time()}
    async with launch_broker(run_id, accounts, channel_mode=channel_mode, prefer=broker_kind, external=external,
                             host=listen) as broker:
        timeline["broker_ready_at"] = time.time()
        console.print(f"broker: {broker.kind} on {broker.host}:{broker.port}; agents: {mode}")
        if mode == "external":
            path = external_instructions(scn, run_id, broker, scenario_file, out_dir)
            console.print(f"waiting for {scn.clients} agents; their command lines (with passwords) are in {path}")
        coord = broker.address_for(COORDINATOR)
        if external is not None:
            coord = external
        async with channel_running(scn, run_id, broker, ids, out_dir) as channel, \
                BusSession(bus_config(scn, run_id, COORDINATOR, coord), watch_status=True) as bus:
            with make_progress(console) as progress:
                observer = ProgressObserver(progress, out_dir)

                def event(text: str) -> None:
                    progress.console.print(f"[yellow]{text}[/yellow]")

                injected: list[dict[str, Any]] = []
                timers: list[asyncio.TimerHandle] = []
                holder: dict[str, AgentProcesses | AgentTasks | None] = {}

                def inject(task: Task) -> None:
                    group_now = holder.get("group")
                    for fault in scn.network.faults:
                        if fault.op == task.op.value and fault.round == task.round and group_now is not None:
                            timers.append(asyncio.get_running_loop().call_later(
                                fault.after_s * scn.channel.time_scale, _kill, group_now, fault.client, event))
                            injected.append(to_dict(fault))

                async with BusFleet(bus, scn.clients, scn.network, scn.channel.time_scale, event, inject) as fleet, \
                        agents_running(mode, scn, run_id, broker, scenario_file, out_dir) as group:
                    holder["group"] = group
                    watcher = asyncio.create_task(_watch(fleet, group, channel, progress, started))
                    strategy = Strategy(scn, observer, scn.network.min_clients)
                    work = asyncio.create_task(coordinate(strategy, fleet))
                    try:
                        done, _ = await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
                        for t in (work, watcher):
                            t.cancel()
                        await asyncio.gather(work, watcher, return_exceptions=True)
                        for t in done:
                            t.result()  # re-raise a failure of either
                    finally:
                        for timer in timers:
                            timer.cancel()
                        # agents started by hand never hear of a failure otherwise
                        await fleet.shutdown(timeout=10.0 if work.done() and not work.cancelled()
                                             and work.exception() is None else 2.0)
            traffic = {
                "broker": broker.kind,
                "agents": mode,
                "coordinator": bus.stats.as_dict(),
                "clients": {client_name(i): s for i, s in sorted(fleet.client_stats.items())},
                "late_answers": len(fleet.late),
                "timeline": {**timeline, **fleet.timeline,
                             "max_data_s": max(fleet.data_seconds.values(), default=0.0)},
                "faults_injected": injected,
                "channel": channel.stats if channel is not None else None,  # filled in when it stops, below
                "joined": sorted(client_name(i) for i in fleet.joined),
            }
    return strategy.outcome, traffic


def run_networked_scenario(scn: Scenario, out_dir: Path, console: Console, mode: AgentsMode = "subprocess",
                           broker_url: str | None = None, listen: str = "127.0.0.1",
                           broker_kind: Prefer = "auto") -> dict[str, Any]:
    from .report import build_results, print_summary, write_outputs

    set_threads(scn.threads)
    started = time.perf_counter()
    # the baselines train here on every client's data: check it is here before hours of training
    datas = {i: load_client_data(scn, i) for i in range(scn.clients)} if scn.baselines else {}
    outcome, traffic = asyncio.run(run_networked(scn, out_dir, console, mode, broker_url, listen, broker_kind))
    with make_progress(console) as progress:
        clock = time.perf_counter()
        classifier = stage1_classifier(scn, outcome)
        baselines = run_baselines(scn, datas, progress, classifier) if scn.baselines else {}
        outcome.stage_seconds["baselines"] = time.perf_counter() - clock
    results = build_results(scn, "networked", outcome, baselines, {"traffic": summarize_traffic(traffic)},
                            time.perf_counter() - started)
    paths = write_outputs(out_dir, results, outcome.rounds)
    print_summary(console, results)
    console.print("outputs: " + ", ".join(str(p) for p in paths))
    return results


def summarize_traffic(traffic: dict[str, Any]) -> dict[str, Any]:
    """Bytes and messages per kind over every agent (each message counted once, by its sender)."""
    per_kind: dict[str, dict[str, int]] = {}

    def add(kind: str, field: str, value: int) -> None:
        per_kind.setdefault(kind, {"messages": 0, "bytes": 0})[field] += int(value)

    coord = traffic["coordinator"]
    for kind, n in coord["sent_messages"].items():
        add(kind, "messages", n)
    for kind, n in coord["sent_bytes"].items():
        add(kind, "bytes", n)
    for stats in traffic["clients"].values():
        for key, value in stats.items():
            if key.startswith("sent_messages."):
                add(key.split(".", 1)[1], "messages", value)
            elif key.startswith("sent_bytes."):
                add(key.split(".", 1)[1], "bytes", value)
    rejected: dict[str, int] = dict(coord["rejected"])
    for stats in traffic["clients"].values():
        for key, value in stats.items():
            if key.startswith("rejected."):
                reason = key.split(".", 1)[1]
                rejected[reason] = rejected.get(reason, 0) + int(value)
    return {**traffic, "per_kind": per_kind, "rejected": rejected}
