"""Many client agents as asyncio tasks of one process (``nmoe run --agents inprocess``).

Each agent keeps its own bus session: its own MQTT connection, logged in under its own account, so
the broker's ACL proves who sent what exactly as with one process per agent (a multiplexed session
would log in under one account allowed to write as every client, and the ACL could no longer tell
them apart). What the agents share is the CPU: their heavy work (loading the partition, building
the models, training, evaluating) goes through one :class:`SerialWorker`, one call at a time in one
worker thread, so the event loop always has the GIL often enough to read the sockets and answer
the broker's acknowledgements of every other agent while one of them trains. Run concurrently
(asyncio's default executor, six threads on two cores) trainings fought over the GIL and the loop
starved: QoS 1 publishes timed out at 100 agents.

Where they run:

- in a process of their own (``group_process``), forked by the run's agent host
  (``agent_host``): the coordinator's loop then serves coordination only, and the agents share
  every page of torch and the agent code with the run. The run talks to it through the host's
  pipes: a ``kill <agent>`` line (fault injection) on the control pipe, ``exited`` answers (JSON
  lines) for each agent that ends;
- on the run's own event loop (:class:`AgentTasks`), where no host can be forked (a run started
  inside a running event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from agents.client import ClientAgent
from agents.codec import client_index
from broker.auth import BrokerAddress
from broker.server import ensure_open_files
from nmoe.errors import ConfigError

from .bus_sizing import bus_config
from .devices import agent_extras
from .scenario import Scenario

log = logging.getLogger(__name__)
T = TypeVar("T")
GROUP = "agents"
"""The name the agent host knows the multi-agent process by (its log: ``logs/agents.log``)."""
FDS_PER_AGENT = 4
"""Open files one agent's session takes (its socket, paho's wake-up socket pair) with room to spare."""


class SerialWorker:
    """The agents' blocking work, one call at a time (FIFO), in one worker thread."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nmoe-agents")
        self.calls = 0

    async def __call__(self, fn: Callable[[], T]) -> T:
        async with self._lock:  # a cancelled agent leaves the queue; a queued executor job would not
            self.calls += 1
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class AgentTasks:
    """Client agents as asyncio tasks on the running loop, one bus session each, sharing one
    :class:`SerialWorker`. ``on_exit(agent, code)`` hears of each agent that ends (0: it left after
    the shutdown; 1: it failed; -9: it was killed)."""

    def __init__(self, scn: Scenario, run_id: str, addresses: Mapping[str, BrokerAddress],
                 on_exit: Callable[[str, int], None] | None = None) -> None:
        self.scn, self.run_id, self.addresses = scn, run_id, dict(addresses)
        self.on_exit = on_exit
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.worker: SerialWorker | None = None

    async def start(self) -> None:
        n = len(self.addresses)
        ensure_open_files(n * FDS_PER_AGENT + 256, f"{n} agents in one process")
        self.worker = SerialWorker()
        for name, address in self.addresses.items():
            i = client_index(name)
            assert i is not None, name
            x = agent_extras(self.scn, i)
            agent = ClientAgent(self.scn, self.scn.network, i, bus_config(self.scn, self.run_id, name, address),
                                self.scn.channel.time_scale, x.device, x.radio, x.predictor, blocking=self.worker)
            task = asyncio.create_task(agent.run(), name=name)
            task.add_done_callback(self._ended)
            self.tasks[name] = task

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            code = -signal.SIGKILL
        elif (err := task.exception()) is not None:
            code = 1
            log.error("%s failed", task.get_name(), exc_info=err)
        else:
            code = 0
        if self.on_exit is not None:
            self.on_exit(task.get_name(), code)

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
        if self.worker is not None:
            self.worker.close()


def group_spec(scenario_file: Path, run_id: str, addresses: Mapping[str, BrokerAddress], log_path: Path
               ) -> dict[str, Any]:
    """The request the agent host forks the multi-agent process from (passwords included: it
    travels over a pipe, never on a command line)."""
    return {"id": GROUP, "group": True, "scenario": str(scenario_file), "run_id": run_id, "log": str(log_path),
            "agents": {name: {"url": a.url(), "password": a.password or ""} for name, a in addresses.items()}}


def group_process(spec: Mapping[str, Any], control: int, answers: int) -> int:
    """Body of the multi-agent process (forked by the agent host): every agent of ``spec`` as a
    task, until each has left; its log in ``spec["log"]``. ``control`` carries ``kill <agent>``
    lines from the run; each agent's end goes to ``answers`` as ``{"exited": id, "code": c}``."""
    import torch

    from .edge import redirect_output
    from .scenario import load_scenario

    gc.freeze()  # see agent_host.agent_process: inherited objects' pages stay shared
    redirect_output(str(spec["log"]))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    scn = load_scenario(str(spec["scenario"]))
    torch.set_num_threads(scn.network.agent_threads)
    addresses = {}
    for name, entry in spec["agents"].items():
        parsed = BrokerAddress.parse(entry["url"])
        addresses[name] = BrokerAddress(parsed.host, parsed.port, parsed.username, entry["password"] or None,
                                        parsed.tls, parsed.ca_file)

    def say(agent: str, code: int) -> None:
        os.write(answers, json.dumps({"exited": agent, "code": code}).encode() + b"\n")  # < PIPE_BUF: atomic

    async def main() -> None:
        group = AgentTasks(scn, str(spec["run_id"]), addresses, on_exit=say)
        loop = asyncio.get_running_loop()
        buffer = bytearray()

        def on_control() -> None:
            chunk = os.read(control, 4096)
            if not chunk:  # the run is gone
                loop.remove_reader(control)
                return
            buffer.extend(chunk)
            if len(buffer) > 1 << 16:
                raise RuntimeError("agents: control line over 64 KiB")
            while b"\n" in buffer:
                line, _, rest = bytes(buffer).partition(b"\n")
                buffer[:] = rest
                verb, _, agent = line.decode().partition(" ")
                if verb == "kill" and agent in group.tasks:
                    log.info("killing %s (fault injection)", agent)
                    group.kill(agent)
                else:
                    log.error("agents: ignoring control line %r", line[:80])

        loop.add_reader(control, on_control)
        try:
            await group.start()
            await asyncio.gather(*group.tasks.values(), return_exceptions=True)
        finally:
            loop.remove_reader(control)
            await group.stop()

    try:
        asyncio.run(main())
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
