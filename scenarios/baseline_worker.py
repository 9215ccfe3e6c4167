"""The baselines of a networked run, trained in processes of their own beside the federated stages.

A networked run's baselines (local classifiers, the FedAvg classifier, the centralized MoE) are
pure computation that needs nothing from the bus. So the run forks one worker per baseline
(:func:`groups`) before it starts anything else, at a lower priority (``nice`` + :data:`NICE`), so
that they take only what the federated stages leave: a core where the agents run elsewhere or in
one process, the gaps between rounds where agent processes fill the cores. When the federated
stages are done the run gives the workers its own priority back (where allowed: root, or
RLIMIT_NICE) and waits for their scores (:func:`collect`); they finish side by side, one torch
thread each.

Each worker is a ``fork()`` of the run made while the run is still single-threaded (as the agent
host is), so it imports nothing and shares the run's pages. It loads its own copy of each
client's data (memory-mapped), trains with the run's stage cache (what it stores is there for
later runs, as before) and sends one JSON line back over a pipe: the scores per baseline and
client, the cache's report, its compute seconds, or the error that stopped it. It dies with the
run (``PR_SET_PDEATHSIG``) and is reaped by PID. ``NMOE_PARALLEL_BASELINES=0`` trains the
baselines after the federated stages in the run's own process instead (for side-by-side
measurement: ``bench/quickstart.py``).

The worker trains with one torch thread (:data:`THREADS`). Same code, seeds and thread count give
the same scores in either process (``tests/test_baseline_worker.py``, at ``threads: 1``); a
scenario with more threads gets, from the worker, the scores of one thread (torch's reductions
split differently over threads, so the last bits, and after training the scores, move a little).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import select
import signal
import sys
import time
from typing import Any

from rich.progress import Progress

from broker.lifetime import die_with_parent
from nmoe.errors import NmoeError
from nmoe_models.config import Baseline

from .agent_host import can_fork_host, child_main
from .cache import StageCache
from .scenario import Scenario

NICE = 10
"""How much lower the worker's priority is than the run's (and its agents')."""
THREADS = 1
"""torch threads in the worker. It shares the cores with the agents: with two, one of them waits
at every parallel region for a thread the scheduler gave to an agent (measured: the quickstart's
baselines 7x slower beside the federated stages with 2 threads, on par with 1)."""
MAX_ANSWER = 16 << 20
"""The worker's answer: scores per client and baseline; anything near this is a bug."""
ENV = "NMOE_PARALLEL_BASELINES"

PerClient = dict[int, dict[str, float]]


class BaselineError(NmoeError):
    """The baseline worker failed; its message says why."""


def wanted(scn: Scenario) -> tuple[Baseline, ...]:
    """The baselines to train beside the federated stages: the FedAvg baseline is left out when
    FedCE shares the whole model (its Stage 1 classifier *is* the FedAvg baseline, scored in
    Stage 2), as ``runner.stage1_classifier`` decides after the run."""
    from .runner import stage1_is_fedavg

    return tuple(b for b in scn.baselines
                 if b in ("local", "centralized") or (b == "fedavg" and not stage1_is_fedavg(scn)))


def enabled(scn: Scenario) -> bool:
    """Whether to train the baselines in workers beside the federated stages: yes wherever a run
    can fork them (``NMOE_PARALLEL_BASELINES=1`` or ``0`` decides instead). Niced, the workers take
    what the agents leave (a core, where the agents run elsewhere or in one process; the gaps
    between rounds, where agent processes fill the cores); afterwards they train side by side with
    one thread each, which beats the run training them one after another with every thread
    (measured, bench/quickstart.py: a single worker did not, as it left the other core idle)."""
    if not wanted(scn) or not can_fork_host():
        return False
    forced = os.environ.get(ENV)
    return forced != "0"


def groups(scn: Scenario) -> list[tuple[Baseline, ...]]:
    """One worker per baseline. Niced, they share what the federated stages leave; once those are
    done, they train side by side on every core, one torch thread each, where a single worker
    would leave all but one core idle and the run alone would train them one after another."""
    return [(b,) for b in wanted(scn)]


def collect(workers: list[BaselineWorker], progress: Progress | None = None) -> tuple[dict[str, PerClient], float]:
    """Every worker's scores, merged, and the seconds this run waited for the last of them after
    the federated stages. They all get the run's priority back first. The first failure stops the
    others and is raised (:class:`BaselineError`, with that worker's message)."""
    started = time.perf_counter()
    for w in workers:
        w.unnice()
    scores: dict[str, PerClient] = {}
    try:
        for w in workers:
            got, _ = w.result(progress)
            scores |= got
    finally:
        for w in workers:
            w.close()
    return scores, time.perf_counter() - started


def _train(scn: Scenario, cache: StageCache | None, baselines: tuple[Baseline, ...]) -> dict[str, Any]:
    from nmoe_models.partition import load_client_data

    from .runner import run_baselines, set_threads

    set_threads(THREADS)
    started = time.process_time()
    datas = {i: load_client_data(scn, i) for i in range(scn.clients)}
    sub = dataclasses.replace(scn, baselines=baselines)
    with Progress(disable=True) as progress:
        scores = run_baselines(sub, datas, progress, None, cache)
    return {"scores": {name: {str(i): s for i, s in per.items()} for name, per in scores.items()},
            "cache": dict(cache.report) if cache is not None else {},
            "cpu_s": time.process_time() - started}


@dataclasses.dataclass
class BaselineWorker:
    """The run's side: the worker's PID and the read end of its answer pipe."""

    pid: int
    answers: int
    started: float
    baselines: tuple[Baseline, ...]
    cache: StageCache | None = None
    exit_status: int | None = None
    _done: bool = False

    @classmethod
    def fork(cls, scn: Scenario, cache: StageCache | None,
             baselines: tuple[Baseline, ...] | None = None) -> BaselineWorker:
        """Start a worker for ``baselines`` (default: every one :func:`wanted`); call while the run
        is single-threaded (``can_fork_host()``)."""
        baselines = wanted(scn) if baselines is None else baselines
        if not can_fork_host():
            raise RuntimeError("the baseline worker must be forked before the run starts any thread")
        read, write = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(read)

            def work() -> None:
                die_with_parent(signal.SIGTERM)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)  # die quietly with the run
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the run's; it stops us by PID
                os.nice(NICE)
                try:
                    answer: dict[str, Any] = {"ok": _train(scn, cache, baselines)}
                except Exception as err:  # noqa: BLE001 - sent to the run, which raises it there
                    answer = {"error": f"{type(err).__name__}: {err}"}
                with os.fdopen(write, "wb") as out:
                    out.write(json.dumps(answer).encode() + b"\n")

            child_main(work)
        os.close(write)
        return cls(pid, read, time.perf_counter(), baselines, cache)

    def result(self, progress: Progress | None = None) -> tuple[dict[str, PerClient], float]:
        """Wait for the worker's scores (a spinner on ``progress`` meanwhile); returns them and the
        seconds this run waited for them after the federated stages. Raises :class:`BaselineError`
        with the worker's own message when it failed."""
        waited = time.perf_counter()
        self.unnice()
        task = progress.add_task(f"baseline: {', '.join(self.baselines)} (trained beside)", total=None, info="")\
            if progress is not None else None
        buffer = b""
        try:
            while True:
                ready, _, _ = select.select([self.answers], [], [], 0.2)
                if not ready:
                    continue
                chunk = os.read(self.answers, 1 << 16)
                if not chunk:
                    break
                buffer += chunk
                if len(buffer) > MAX_ANSWER:
                    raise BaselineError(f"baseline worker: answer over {MAX_ANSWER} bytes")
        finally:
            self.close(stop=not buffer.endswith(b"\n"))
            if progress is not None and task is not None:
                progress.update(task, total=1, completed=1)
        status = self.exit_status
        if not buffer:
            raise BaselineError(f"the baseline worker (PID {self.pid}) ended without an answer (exit status "
                                f"{status}); its traceback, if any, is above")
        answer = json.loads(buffer)
        if "error" in answer:
            raise BaselineError(f"training the baselines failed: {answer['error']}")
        ok = answer["ok"]
        if self.cache is not None:
            self.cache.report.update(ok["cache"])
        scores = {name: {int(i): s for i, s in per.items()} for name, per in ok["scores"].items()}
        return scores, time.perf_counter() - waited

    def unnice(self) -> None:
        """The federated stages are done: the worker, if still training, gets this run's priority
        back (allowed to root, or up to RLIMIT_NICE; otherwise it finishes at its lower one)."""
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        try:  # Linux's nice is per thread: torch's pool threads too
            threads = [int(t) for t in os.listdir(f"/proc/{self.pid}/task")]
        except OSError:
            threads = [self.pid]
        for tid in threads:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.setpriority(os.PRIO_PROCESS, tid, ours)

    def close(self, stop: bool = True) -> None:
        """Reap the worker; with ``stop``, first end it if it still runs (the run failed or was
        interrupted). Without, wait for it: it has answered and is exiting."""
        if self._done:
            return
        self._done = True
        with contextlib.suppress(OSError):
            os.close(self.answers)
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            if stop:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGTERM)
            _, status = os.waitpid(self.pid, 0)
        self.exit_status = os.waitstatus_to_exitcode(status)
