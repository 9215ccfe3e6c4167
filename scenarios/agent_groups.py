"""Client agents of a networked run, three ways behind one ``AgentGroup`` protocol: one child process
each, forked from the agent host or a preloaded fork server (the default); asyncio tasks of one
process (``inprocess``: a process of their own forked by the agent host, else the run's own loop;
``agent_tasks``); or agents started by hand on edge boards (``external``: nothing to start, their
command lines in a file)."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.process
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal, Protocol

from agents.codec import client_name
from broker.server import RunningBroker

from .agent_host import PRELOAD as HOST_PRELOAD
from .agent_host import AgentHost, agent_process
from .agent_tasks import GROUP, AgentTasks, group_spec
from .scenario import Scenario

AgentsMode = Literal["subprocess", "inprocess", "external"]


class AgentGroup(Protocol):
    async def start(self) -> None: ...

    def kill(self, agent: str) -> None:
        """Fault injection: end one agent without a goodbye (its last will says offline)."""
        ...

    def failed(self) -> dict[str, int]:
        """Agents that already ended with an error: id -> exit status."""
        ...

    def log_tail(self, agent: str, lines: int = 8) -> str: ...

    async def wait(self, timeout: float) -> None:
        """Wait (up to ``timeout``) for the agents to leave on their own after the shutdown."""
        ...

    async def stop(self) -> None:
        """End what still runs."""
        ...


class AgentProcesses:
    """Client agents as child processes; each logs to <out>/logs/<id>.log; stopped by their PIDs.

    They are forked from the run's agent host (``agent_host``: a copy of the run process, so no
    imports at all), or, where there is none (a run inside an event loop that was already going,
    not Linux), from a multiprocessing fork server that has imported torch and the agent code once
    (torch alone costs a second or two of CPU per process; ten agents on two cores would spend over
    15 s just importing). Each agent runs exactly ``nmoe agent --id ... --scenario ...``.
    """

    PRELOAD = ["torch", *HOST_PRELOAD, "scenarios.agent_host"]

    def __init__(self, scenario_file: Path, run_id: str, broker: RunningBroker, ids: list[str], log_dir: Path,
                 host: AgentHost | None = None) -> None:
        self.scenario_file = scenario_file
        self.run_id = run_id
        self.broker = broker
        self.ids = ids
        self.log_dir = log_dir
        self.host = host
        self.procs: dict[str, multiprocessing.process.BaseProcess] = {}

    def _argv(self, agent: str) -> tuple[list[str], str]:
        addr = self.broker.address_for(agent)
        return (["--id", agent, "--scenario", str(self.scenario_file), "--run-id", self.run_id,
                 "--broker", addr.url()], addr.password or "")

    async def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.host is not None:
            for agent in self.ids:
                argv, password = self._argv(agent)
                self.host.spawn(agent, argv, password, str(self.log_dir / f"{agent}.log"))
            # as with the fork server: JOIN's clock starts once the processes exist
            while not self.host.started(self.ids):
                await asyncio.sleep(0.02)
            return
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(self.PRELOAD)
        for agent in self.ids:
            argv, password = self._argv(agent)
            proc = ctx.Process(target=agent_process, name=agent,
                               args=(argv, password, str(self.log_dir / f"{agent}.log")))
            await asyncio.to_thread(proc.start)  # the first start launches the fork server
            self.procs[agent] = proc

    def _alive(self, agent: str) -> bool:
        if self.host is not None:
            return self.host.alive(agent) or agent not in self.host.pids and agent not in self.host.exits
        return self.procs[agent].is_alive()

    def kill(self, agent: str) -> None:
        """SIGKILL one agent (fault injection): no clean goodbye, its last will says offline."""
        if self.host is not None:
            self.host.signal(agent, signal.SIGKILL)
        elif self.procs[agent].is_alive():
            self.procs[agent].kill()

    def failed(self) -> dict[str, int]:
        """Agents that already exited with an error: id -> exit status."""
        if self.host is not None:
            self.host.poll()
            return {a: c for a, c in self.host.exits.items() if c != 0}
        return {a: p.exitcode for a, p in self.procs.items() if p.exitcode not in (None, 0)}

    def log_tail(self, agent: str, lines: int = 8) -> str:
        return self.log_tail_of(self.log_dir / f"{agent}.log", lines)

    @staticmethod
    def log_tail_of(path: Path, lines: int) -> str:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def _until_exited(self, agents: list[str], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(self._alive(a) for a in agents) and loop.time() < deadline:
            await asyncio.sleep(0.1)

    async def wait(self, timeout: float) -> None:
        await self._until_exited(self.ids, timeout)

    async def stop(self) -> None:
        """Terminate what still runs (SIGTERM, then SIGKILL after 5 s), by PID."""
        if self.host is not None:
            self.host.poll()
            alive = [a for a in self.ids if self.host.alive(a)]
            for a in alive:
                self.host.signal(a, signal.SIGTERM)
            await self._until_exited(alive, 5.0)
            for a in alive:
                self.host.signal(a, signal.SIGKILL)
            await asyncio.to_thread(self.host.close)
            return
        alive_procs = [p for p in self.procs.values() if p.is_alive()]
        for p in alive_procs:
            p.terminate()
        await self._until_exited([a for a, p in self.procs.items() if p in alive_procs], 5.0)
        for p in alive_procs:
            if p.is_alive():
                p.kill()
        for p in self.procs.values():
            await asyncio.to_thread(p.join, 5.0)
            p.close()


class AgentTaskProcess:
    """Client agents as asyncio tasks of one process of their own (``agent_tasks``), forked by the
    run's agent host; its log (every agent's) in <out>/logs/agents.log; stopped by its PID."""

    def __init__(self, host: AgentHost, scn: Scenario, run_id: str, broker: RunningBroker, scenario_file: Path,
                 log_dir: Path) -> None:
        self.host, self.log_dir = host, log_dir
        self.ids = [client_name(i) for i in range(scn.clients)]
        self.spec = group_spec(scenario_file, run_id, {a: broker.address_for(a) for a in self.ids},
                               log_dir / f"{GROUP}.log")

    async def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.host.spawn_group(self.spec)
        while not self.host.started([GROUP]):  # JOIN's clock starts once the process exists
            await asyncio.sleep(0.02)

    def kill(self, agent: str) -> None:
        """Fault injection: the agent's task is cancelled (its session closes; no goodbye)."""
        if self.host.alive(GROUP):
            self.host.tell_group(f"kill {agent}")

    def failed(self) -> dict[str, int]:
        self.host.poll()
        return {a: c for a, c in self.host.exits.items() if c not in (0, -signal.SIGKILL) or a == GROUP and c != 0}

    def log_tail(self, agent: str, lines: int = 8) -> str:
        """The last lines of the multi-agent process' log (one log for all its agents)."""
        return AgentProcesses.log_tail_of(self.log_dir / f"{GROUP}.log", lines)

    async def wait(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.host.alive(GROUP) and loop.time() < deadline:
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s, by PID; then the host is closed."""
        if self.host.alive(GROUP):
            self.host.signal(GROUP, signal.SIGTERM)
            await self.wait(5.0)
            self.host.signal(GROUP, signal.SIGKILL)
        await asyncio.to_thread(self.host.close)


class ExternalAgents:
    """Agents started by hand (edge boards): nothing to start or stop here; each board's command
    line, with its password, goes to a file only the owner can read."""

    def __init__(self, scn: Scenario, run_id: str, broker: RunningBroker, scenario_file: Path, out_dir: Path) -> None:
        self.instructions = external_instructions(scn, run_id, broker, scenario_file, out_dir)

    async def start(self) -> None:
        pass

    def kill(self, agent: str) -> None:
        raise NotImplementedError(f"cannot kill {agent}: it runs on another host")

    def failed(self) -> dict[str, int]:
        return {}

    def log_tail(self, agent: str, lines: int = 8) -> str:
        return ""

    async def wait(self, timeout: float) -> None:
        pass

    async def stop(self) -> None:
        pass


def external_instructions(scn: Scenario, run_id: str, broker: RunningBroker, scenario_file: Path,
                          out_dir: Path) -> Path:
    """Write each board's command line (with its password) to a file only the owner can read."""
    lines = ["# Start one agent per edge board (copy the scenario file there first)."]
    ca = ""
    if broker.ca_file is not None:  # the run's own CA: public, copied beside the scenario for the boards
        shutil.copyfile(broker.ca_file, out_dir / "ca.crt")
        lines.append("# The broker speaks TLS only: copy ca.crt there too (the agents trust only it).")
        ca = "?ca=ca.crt"
    for i in range(scn.clients):
        agent = client_name(i)
        addr = broker.address_for(agent)
        scheme = "mqtts" if addr.tls else "mqtt"
        lines.append(f"NMOE_BROKER_PASSWORD='{addr.password}' nmoe agent --id {agent} --run-id {run_id} "
                     f"--scenario {scenario_file.name} --broker '{scheme}://{agent}@<this-host>:{addr.port}{ca}'")
    path = out_dir / "agents.txt"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never readable by others, not even briefly
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


def make_group(mode: AgentsMode, scn: Scenario, run_id: str, broker: RunningBroker, scenario_file: Path,
               out_dir: Path, host: AgentHost | None = None) -> AgentGroup:
    if mode == "subprocess":
        return AgentProcesses(scenario_file, run_id, broker, [client_name(i) for i in range(scn.clients)],
                              out_dir / "logs", host)
    if mode == "inprocess" and host is not None:
        return AgentTaskProcess(host, scn, run_id, broker, scenario_file, out_dir / "logs")
    if mode == "inprocess":  # no host (a run inside a running event loop): tasks on the run's own loop
        return AgentTasks(scn, run_id, {client_name(i): broker.address_for(client_name(i))
                                        for i in range(scn.clients)})
    return ExternalAgents(scn, run_id, broker, scenario_file, out_dir)


@contextlib.asynccontextmanager
async def agents_running(group: AgentGroup) -> AsyncIterator[AgentGroup]:
    """Started on entry; on a clean exit they get a little time to leave after the shutdown; on
    failure, Ctrl-C or kill they are stopped at once. Stopped (by PID) whatever happens."""
    try:
        await group.start()
        yield group
    except BaseException:
        await group.stop()
        raise
    try:
        await group.wait(15.0)
    finally:
        await group.stop()
