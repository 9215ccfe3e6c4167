"""The agent host: a copy of the run process, made by ``fork()`` before the run starts anything,
that forks client agents on request.

A run process has imported torch and the agent code by the time it starts, so a copy of it needs
no imports at all: agents forked from it start in milliseconds and share every page of those
libraries with the run and with each other (copy-on-write). multiprocessing's fork server, the
other way (``agent_groups.AgentProcesses`` without a host), is a fresh interpreter that imports
torch again: seconds of CPU before the first agent, more on a loaded machine.

It is forked while the run is still single-threaded but for the BLAS pool numpy starts (which
handles fork itself, as in multiprocessing's fork server), before asyncio, the broker or any torch
computation; it stays single-threaded. Requests (agent id, argv, password, log file) and answers
(``started``/``exited`` with PID and exit status) travel as JSON lines over two pipes, so the
passwords never appear on a command line. The host and every agent ask for SIGTERM when their
parent dies (``PR_SET_PDEATHSIG``): a SIGKILLed run takes them along. Linux only (``fork``,
``prctl``); elsewhere the fork server is used.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import multiprocessing
import os
import select
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from broker.auth import PASSWORD_ENV
from broker.lifetime import die_with_parent, wait_exited

log = logging.getLogger(__name__)
# What an agent imports that a run may not have yet; imported once here, shared by every agent.
# An import left to the agents costs each of them (30-80 ms apiece for these at start-up, ten
# agents on two cores); tests/test_agent_host.py checks that a forked agent imports nothing.
# Not torch._dynamo: training's optimizers never import it (nmoe_models.train.eager).
PRELOAD = ("agents.client", "scenarios.edge", "scenarios.devices",  # devices: rich.table
           "logging.handlers", "torch._subclasses.schema_check_mode",
           "encodings.idna",  # the first connect's host name
           "numpy.ma")  # numpy's masked arrays, on an agent's first evaluation
MAX_LINE = 1 << 20  # a request or an answer (1000 agents' group request: ~120 KB); anything longer is a bug


def _leave_the_fork_server() -> None:
    """Die with the run, even a SIGKILLed one (Linux).

    multiprocessing hands every forked child the write end of the fork server's "alive" pipe, so
    the fork server lives as long as any child does; and the children, told to die with their
    parent (the fork server), lived on: a SIGKILLed run left both behind. Closing that end here
    leaves the run the only holder: when it dies the fork server exits, and then each agent gets
    SIGTERM (the PR_SET_PDEATHSIG asked for below).
    """
    from multiprocessing import forkserver

    die_with_parent(signal.SIGTERM)
    server: Any = forkserver._forkserver  # the fork server's state in this child (private)
    fd = server._forkserver_alive_fd
    if fd is not None:
        os.close(fd)
        server._forkserver_alive_fd = None


def agent_process(argv: list[str], password: str, log_path: str) -> None:
    """Body of one agent process: `nmoe agent ARGV` with its output in its own log file."""
    # Every object inherited from the fork server (torch, the agent code: most of its 400 MB) into
    # the permanent generation: the cyclic GC would otherwise write to each one's header on its
    # next full collection and copy nearly every shared page into this process (+85 MB measured).
    gc.freeze()
    if multiprocessing.parent_process() is not None:  # forked by multiprocessing's fork server
        _leave_the_fork_server()
    else:  # forked by the run's agent host
        die_with_parent(signal.SIGTERM)
    from .edge import main, redirect_output

    redirect_output(log_path)
    os.environ[PASSWORD_ENV] = password  # this process only; never on a command line

    sys.exit(main(argv))


SPAWNERS = 4
"""Processes that fork a batch of agents side by side (the host and three copies of it). A fork
copies the page tables of the ~420 MB of anonymous memory torch and the agent code hold: 30-40 ms
of kernel time each on an idle core, 0.1-0.2 s on a loaded one, and 100 of them in one process
were the slow path of a join (issue 12). Split over processes they use both cores."""
MIN_SPLIT = 8  # a batch smaller than this is forked by the host alone


def _fork_agent(req: dict[str, Any], requests: int, control: int, out: Any) -> int:
    """Fork one agent (or the multi-agent process); returns its PID (in the parent)."""
    pid = os.fork()
    if pid:
        return pid
    os.close(requests)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # `nmoe agent` installs its own
    code = 1
    try:
        if req.get("group"):  # every agent as a task of this one process
            die_with_parent(signal.SIGTERM)
            from .agent_tasks import group_process

            code = group_process(req, control, out.fileno())
            raise SystemExit(code)
        out.close()
        os.close(control)
        agent_process(req["argv"], req["password"], req["log"])
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    finally:
        logging.shutdown()
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _reap(children: dict[int, str], say: Any, block: bool = False) -> None:
    """Report the exit of every child that ended (all of them, waiting, with ``block``)."""
    while children:
        pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        if pid == 0:
            return
        name, code = children.pop(pid), os.waitstatus_to_exitcode(status)
        if name:
            say(exited=name, code=code)
        elif code:  # a spawner ("") reports its own agents; its failure is on stderr
            print(f"agent host: a spawner exited with status {code}", file=sys.stderr)


def _spawn_batch(batch: list[dict[str, Any]], requests: int, control: int, out: Any, say: Any,
                 children: dict[int, str]) -> None:
    """Fork ``batch``'s agents, split over up to SPAWNERS processes (copies of the host, each the
    parent of its share: the agents die with it, and it with the host); each says ``started`` and
    ``exited`` for its own agents on the shared answer pipe (a line is one write below PIPE_BUF, so
    lines never interleave)."""
    parts = SPAWNERS if len(batch) >= MIN_SPLIT else 1
    shares = [batch[k::parts] for k in range(parts)]
    for share in shares[1:]:
        pid = os.fork()
        if pid == 0:  # a spawner
            die_with_parent(signal.SIGTERM)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            code = 0
            try:
                mine: dict[int, str] = {}
                for req in share:
                    agent = _fork_agent(req, requests, control, out)
                    mine[agent] = req["id"]
                    say(started=req["id"], pid=agent)
                _reap(mine, say, block=True)
            except BaseException:  # noqa: BLE001 - its last word goes to stderr; nothing else can hear it
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        children[pid] = ""
    for req in shares[0]:
        pid = _fork_agent(req, requests, control, out)
        children[pid] = req["id"]
        say(started=req["id"], pid=pid)


def _serve(requests: int, answers: int, control: int) -> None:
    """The host's loop: fork the agents (or the multi-agent process) each batch of requests asks
    for, report each start and exit, until the run closes the request pipe and every agent has
    ended."""
    die_with_parent(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # die quietly with the run (not the run's KeyboardInterrupt)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the run's to handle; it stops us by PID
    children: dict[int, str] = {}  # pid -> agent id ("" for a spawner)
    buffer = b""
    open_ = True
    out = os.fdopen(answers, "wb", buffering=0)

    def say(**event: Any) -> None:
        out.write(json.dumps(event).encode() + b"\n")

    while open_ or children:
        ready, _, _ = select.select([requests] if open_ else [], [], [], 0.1)
        if ready:
            chunk = os.read(requests, 65536)
            if not chunk:
                open_ = False
            buffer += chunk
            if len(buffer) > MAX_LINE:
                raise RuntimeError("agent host: request line over 1 MiB")
            batch: list[dict[str, Any]] = []
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                req = json.loads(line)
                if not req.get("group"):  # what every agent of the run would do alike, once, here
                    from .edge import warm

                    warm(req["argv"])
                batch.append(req)
            if batch:
                _spawn_batch(batch, requests, control, out, say, children)
        _reap(children, say)


_RUN_ENDS: set[int] = set()
"""The run's ends of the pipes to the agent host. A child forked from the run later (a baseline
worker) closes its copies first: holding the request pipe open, it kept the host waiting for an
EOF that never came, and the run's ``close()`` waited its whole timeout (5 s) for the host."""


def child_main(body: Callable[[], None]) -> NoReturn:
    """The whole life of a child forked from the run: ``body``, then ``os._exit`` (never the run's
    own cleanup, which a forked copy must not run twice); exit status 1, with the traceback on
    stderr, if it raised, since nothing else can hear a child's last word. First it closes its
    copies of the run's ends of the host's pipes (:data:`_RUN_ENDS`), which are not its own."""
    code = 0
    try:
        for fd in list(_RUN_ENDS):
            with contextlib.suppress(OSError):
                os.close(fd)
        _RUN_ENDS.clear()
        body()
    except BaseException:  # noqa: BLE001 - see the docstring
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def can_fork_host() -> bool:
    """Linux, no thread of ours yet (a fork copies only the calling thread; a lock another thread
    held would stay locked forever in the copy), and not switched off (``NMOE_AGENT_HOST=0``: the
    fork server instead, for side-by-side measurements)."""
    return sys.platform == "linux" and threading.active_count() == 1 and os.environ.get("NMOE_AGENT_HOST") != "0"


@dataclass
class AgentHost:
    """The run's side: ask for agents, learn their PIDs and exit statuses."""

    pid: int
    requests: Any
    answers: int
    control: Any
    pids: dict[str, int] = field(default_factory=dict)
    exits: dict[str, int] = field(default_factory=dict)
    _buffer: bytes = b""
    closed: bool = False

    @classmethod
    def fork_for(cls, mode: str) -> AgentHost | None:
        """A host for agents run as ``mode`` (``subprocess``: one process each, ``inprocess``: one
        process of tasks), forked now; None where agents are not forked from this run (``spawn``,
        an external fleet) or no host can be forked here (:func:`can_fork_host`)."""
        return cls.fork() if mode in ("subprocess", "inprocess") and can_fork_host() else None

    @classmethod
    def fork(cls) -> AgentHost:
        if not can_fork_host():
            raise RuntimeError("the agent host must be forked before the run starts any thread")
        req_r, req_w = os.pipe()
        ans_r, ans_w = os.pipe()
        ctl_r, ctl_w = os.pipe()  # the run -> the multi-agent process (kill lines), through the host
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(req_w)
            os.close(ans_r)
            os.close(ctl_w)

            def serve() -> None:
                for module in PRELOAD:  # what the run has not imported yet
                    importlib.import_module(module)
                gc.freeze()  # inherited objects out of the GC's reach: their pages stay shared
                _serve(req_r, ans_w, ctl_r)

            child_main(serve)
        os.close(req_r)
        os.close(ans_w)
        os.close(ctl_r)
        os.set_blocking(ans_r, False)
        _RUN_ENDS.update((req_w, ans_r, ctl_w))
        return cls(pid, os.fdopen(req_w, "wb", buffering=0), ans_r, os.fdopen(ctl_w, "wb", buffering=0))

    def spawn(self, agent: str, argv: list[str], password: str, log_path: str) -> None:
        self.requests.write(json.dumps({"id": agent, "argv": argv, "password": password, "log": log_path}).encode()
                            + b"\n")

    def spawn_group(self, spec: dict[str, Any]) -> None:
        """Fork the multi-agent process (``agent_tasks.group_process``); it is known as ``spec["id"]``,
        and each of its agents' ends comes back as an ``exited`` answer of its own."""
        self.requests.write(json.dumps(spec).encode() + b"\n")

    def tell_group(self, line: str) -> None:
        """One control line (``kill <agent>``) to the multi-agent process."""
        self.control.write(line.encode() + b"\n")

    def poll(self) -> None:
        """Read what the host said so far (non-blocking)."""
        while True:
            try:
                chunk = os.read(self.answers, 65536)
            except BlockingIOError:
                return
            if not chunk:
                return
            self._buffer += chunk
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                event = json.loads(line)
                if "started" in event:
                    self.pids[event["started"]] = int(event["pid"])
                else:
                    self.exits[event["exited"]] = int(event["code"])

    def started(self, agents: list[str]) -> bool:
        """Whether every one of ``agents`` has been forked; raises when the host is gone."""
        self.poll()
        if all(a in self.pids for a in agents):
            return True
        if os.waitpid(self.pid, os.WNOHANG)[0]:
            self.closed = True
            raise RuntimeError("the agent host ended before starting every agent (its error is on stderr)")
        return False

    def alive(self, agent: str) -> bool:
        self.poll()
        return agent in self.pids and agent not in self.exits

    def signal(self, agent: str, sig: int) -> None:
        if self.alive(agent):
            with contextlib.suppress(ProcessLookupError):  # it ended after the poll
                os.kill(self.pids[agent], sig)

    def close(self, timeout: float = 5.0) -> None:
        """No more agents: the host exits once the last one has; reaped here (SIGKILL after ``timeout``)."""
        if self.closed:
            return
        self.closed = True
        _RUN_ENDS.discard(self.answers)
        for pipe in (self.requests, self.control):
            with contextlib.suppress(ValueError):  # already closed
                _RUN_ENDS.discard(pipe.fileno())
        with contextlib.suppress(OSError):
            self.requests.close()
        with contextlib.suppress(OSError):
            self.control.close()
        deadline = _now() + timeout
        wait_exited(self.pid, timeout)  # returns as the host exits; the loop below then reaps it at once
        while _now() < deadline:
            pid, _ = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            select.select([], [], [], 0.05)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        self.poll()
        os.close(self.answers)


def _now() -> float:
    import time

    return time.monotonic()
