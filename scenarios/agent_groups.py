"""Client agents of a networked run, three ways behind one ``AgentGroup`` protocol: child processes
forked from a preloaded fork server (the default), asyncio tasks in this process (tests), or agents
started by hand on edge boards (``external``: nothing to start, their command lines in a file)."""

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

from agents.client import ClientAgent
from agents.codec import client_name
from broker.server import RunningBroker

from .agent_host import AgentHost, agent_process
from .bus_sizing import bus_config
from .devices import agent_extras
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

    PRELOAD = ["torch", "torch._dynamo", "sklearn.metrics", "agents.client", "scenarios.edge", "scenarios.agent_host"]

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
        try:
            text = (self.log_dir / f"{agent}.log").read_text(errors="replace")
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


class AgentTasks:
    """Client agents as asyncio tasks in this process (tests, debugging)."""

    def __init__(self, scn: Scenario, run_id: str, broker: RunningBroker) -> None:
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.scn, self.run_id, self.broker = scn, run_id, broker

    async def start(self) -> None:
        for i in range(self.scn.clients):
            name = client_name(i)
            cfg = bus_config(self.scn, self.run_id, name, self.broker.address_for(name))
            x = agent_extras(self.scn, i)
            agent = ClientAgent(self.scn, self.scn.network, i, cfg, self.scn.channel.time_scale, x.device, x.radio,
                                x.predictor)
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
    if mode == "inprocess":
        return AgentTasks(scn, run_id, broker)
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
