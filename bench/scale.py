"""How many agents one machine holds: join time, memory per agent and round time against N.

Each point is one ``nmoe run`` of a toy scenario (Fashion-MNIST, N clients x 20 samples, ResNet20,
one FedCE round, no Stage 2/3, no baselines), launched as a user launches it:

- ``--agents subprocess`` (the default): N agent processes forked from the run's agent host. While
  the run lives, every agent's PSS (``/proc/PID/smaps_rollup``: private pages plus its share of the
  pages it shares with the run, the host and the other agents) is sampled every 0.3 s; ``pss_mb`` is
  the median over agents of each one's highest PSS in the samples that saw all N alive (training
  included);
- ``--agents inprocess``: N agents as asyncio tasks of one process (forked by the agent host), each
  with its own bus session; ``pss_mb`` is that process' peak PSS over N (the run's own, coordinator
  included, is reported beside it). These runs stop after Stage 2 (``until: stage2``): Stage 3 opens
  with an all-to-all exchange of latents, N(N-1) requests, a million at N = 1000.

``join_s`` is from launching ``nmoe run`` until the last agent's hello reached the coordinator;
``round_s`` the Stage 1 round (one task out, N updates back); ``startup_s`` until round 0's task
went out. A PNG of join time and memory against N goes beside the table (``--chart``).

    python bench/scale.py [--quick] [--agents 10,30,100] [--inprocess 1000] [--repeat 3]

The last line printed is ``agents=N join_s=<s> pss_mb=<MB> round_s=<s>`` for the largest process
count (and, in full mode, the in-process figures on the same line).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
NMOE = [sys.executable, "-m", "scenarios.cli"]
TOY = """\
name: scale
seed: 0
clients: {clients}
data: {{name: fashion_mnist}}
partition: {{kind: iid, train_per_client: 20, test_per_client: 10}}
model: {{head_hidden: 32, gate_hidden: 16}}
stage1: {{method: fedce, rounds: 1, local_epochs: 1, batch_size: 20}}
stage2: {{epochs: 0}}
stage3: {{rounds: 0}}
baselines: []
until: stage2
network: {{join_timeout_s: {timeout}, round_timeout_s: {timeout}, stage2_timeout_s: {timeout},
          eval_timeout_s: {timeout}, min_clients: {clients}}}
"""


@dataclass
class Point:
    mode: str
    agents: int
    join_s: float
    startup_s: float
    round_s: float
    pss_mb: float
    wall_s: float
    extra: dict[str, float] = field(default_factory=dict)


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def pss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Sampler(threading.Thread):
    """Polls the PSS of the run process and of every agent (the agent host's descendants)."""

    def __init__(self, pid: int, agents: int, period_s: float = 0.3) -> None:
        """``agents``: the agent processes to expect (1 for in-process agents: their one process)."""
        super().__init__(daemon=True)
        self.pid, self.agents, self.period_s = pid, agents, period_s
        self.seen = 0
        self.peak_median = 0.0  # the median over agents of each one's peak PSS (kB) while all were alive
        self.per_agent: dict[int, int] = {}  # agent pid -> its highest PSS (kB) in samples that saw every agent
        self.agents_peak = 0  # the highest sum of the agent host's children's PSS (kB): in-process, one process
        self.run_peak = 0
        self.server_peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            kids = _children()
            self.run_peak = max(self.run_peak, pss_kb(self.pid) or 0)
            for child in kids.get(self.pid, []):  # the agent host (or fork server): the python child with children
                if "python" not in _cmdline(child) or not kids.get(child):
                    continue
                self.server_peak = max(self.server_peak, pss_kb(child) or 0)
                # the agents: the host's descendants without children of their own (the host forks
                # a batch through spawners, which are the parents of their share)
                leaves, todo = [], list(kids.get(child, []))
                while todo:
                    pid = todo.pop()
                    if kids.get(pid):
                        todo.extend(kids[pid])
                    else:
                        leaves.append(pid)
                self.seen = max(self.seen, len(leaves))
                if len(leaves) < self.agents:  # reading 100 agents' PSS takes seconds on a loaded machine:
                    continue  # only once all are there (a lone early agent shares pages with fewer anyway)
                now = {agent: kb for agent in leaves if (kb := pss_kb(agent)) is not None}
                self.agents_peak = max(self.agents_peak, sum(now.values()))
                for agent, kb in now.items():  # each agent's peak while all were there
                    self.per_agent[agent] = max(self.per_agent.get(agent, 0), kb)
                if len(self.per_agent) >= self.agents:
                    self.peak_median = statistics.median(self.per_agent.values())
            self.stop.wait(self.period_s)


class Failed(Exception):
    """A run that did not finish; the point is reported as failed, the other points still run."""


def one_run(mode: str, n: int, tmp: Path) -> Point:
    scenario = tmp / f"scale-{mode}-{n}.yaml"
    # a round of N serialized trainings (in process: ~0.15 s of CPU each) must fit its deadline
    scenario.write_text(TOY.format(clients=n, timeout=max(300, n)))
    out = tmp / f"out-{mode}-{n}-{time.monotonic_ns()}"
    cmd = [*NMOE, "run", str(scenario), "--agents", mode, "--out", str(out)]
    launched = time.time()
    with open(tmp / "run.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        sampler = Sampler(proc.pid, n if mode == "subprocess" else 1)
        sampler.start()
        code = proc.wait()
        sampler.stop.set()
        sampler.join()
    wall = time.time() - launched
    if code != 0:
        lines = [ln for ln in (tmp / "run.log").read_text(errors="replace").splitlines() if ln.strip()]
        raise Failed(lines[-1][-300:] if lines else f"exit status {code}")
    results = json.loads((out / "results.json").read_text())
    tl = results["traffic"]["timeline"]
    with open(out / "metrics.csv") as fh:
        rounds = [float(r["seconds"]) for r in csv.DictReader(fh) if r["op"] == "stage1_fit"]
    if mode == "subprocess":
        # nan, not a failed point: the run's own figures (join, round) stand; on a loaded machine a
        # pass over 100 agents' smaps can take longer than the window in which all of them live
        pss = sampler.peak_median / 1024 if sampler.peak_median else math.nan
        if not sampler.peak_median:
            print(f"subprocess x{n}: no PSS sample saw all {n} agents (at most {sampler.seen}); pss_mb=nan",
                  file=sys.stderr)
    else:
        if sampler.agents_peak == 0:
            raise Failed("never saw the multi-agent process (no agent host?)")
        pss = sampler.agents_peak / 1024 / n
    return Point(mode, n, tl["all_joined_at"] - launched, tl["first_task_at"] - launched,
                 statistics.mean(rounds), pss, wall,
                 {"run_pss_mb": sampler.run_peak / 1024, "host_pss_mb": sampler.server_peak / 1024,
                  "max_data_s": tl["max_data_s"]})


def median_point(points: list[Point]) -> Point:
    def med(f: str) -> float:
        return statistics.median(getattr(p, f) for p in points)

    return Point(points[0].mode, points[0].agents, med("join_s"), med("startup_s"), med("round_s"), med("pss_mb"),
                 med("wall_s"), {k: statistics.median(p.extra[k] for p in points) for k in points[0].extra})


def chart(points: list[Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, marker in (("subprocess", "o"), ("inprocess", "s")):
        pts = sorted((p for p in points if p.mode == mode), key=lambda p: p.agents)
        if not pts:
            continue
        xs = [p.agents for p in pts]
        a.plot(xs, [p.join_s for p in pts], marker=marker, label=f"{mode}: all joined")
        a.plot(xs, [p.round_s for p in pts], marker=marker, linestyle="--", label=f"{mode}: one round")
        b.plot(xs, [p.pss_mb for p in pts], marker=marker, label=mode)
    a.set(xlabel="agents", ylabel="seconds", title="join and round time", xscale="log")
    b.set(xlabel="agents", ylabel="PSS per agent (MB)", title="memory per agent", xscale="log")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args: argparse.Namespace) -> None:
    console = Console(width=max(Console().width, 150))  # a wide table; never truncate figures
    plan = [("subprocess", n) for n in args.agents] + [("inprocess", n) for n in args.inprocess]
    table = Table(title=f"toy scenario (Fashion-MNIST, 20 samples per client, 1 FedCE round), {os.cpu_count()} CPUs, "
                        f"median of {args.repeat}")
    for col in ("agents", "N", "join s", "round 0 sent s", "round s", "PSS/agent MB", "run PSS MB",
                "host MB", "slowest data s", "wall s"):
        table.add_column(col, justify="right")
    medians: list[Point] = []
    failed: list[tuple[str, int]] = []
    with tempfile.TemporaryDirectory(prefix="nmoe-scale-") as tmp:
        for mode, n in plan:
            tries = []
            for k in range(args.repeat):
                try:
                    p = one_run(mode, n, Path(tmp))
                except Failed as err:
                    console.print(f"{mode} x{n} (try {k + 1}): [red]failed[/red]: {err}", highlight=False)
                    failed.append((mode, n))
                    break
                console.print(f"{mode} x{n} (try {k + 1}): join_s={p.join_s:.2f} round_s={p.round_s:.2f} "
                              f"pss_mb={p.pss_mb:.1f}", highlight=False)
                tries.append(p)
            if not tries or (mode, n) in failed:
                table.add_row(mode, str(n), *(["failed"] + [""] * 8), style="red")
                continue
            m = median_point(tries)
            medians.append(m)
            table.add_row(m.mode, str(m.agents), f"{m.join_s:.2f}", f"{m.startup_s:.2f}", f"{m.round_s:.2f}",
                          f"{m.pss_mb:.1f}", f"{m.extra['run_pss_mb']:.0f}", f"{m.extra['host_pss_mb']:.0f}",
                          f"{m.extra['max_data_s']:.2f}", f"{m.wall_s:.1f}")
    console.print(table)
    if args.chart:
        chart(medians, Path(args.chart))
        console.print(f"chart: {args.chart}")
    line = []
    procs = [p for p in medians if p.mode == "subprocess"]
    if procs:
        p = max(procs, key=lambda p: p.agents)
        line.append(f"agents={p.agents} join_s={p.join_s:.2f} pss_mb={p.pss_mb:.1f} round_s={p.round_s:.2f}")
    for mode, n in failed:
        line.append(f"{'inprocess_' if mode == 'inprocess' else ''}failed_at={n}")
    tasks = [p for p in medians if p.mode == "inprocess"]
    if tasks:
        p = max(tasks, key=lambda p: p.agents)
        line.append(f"inprocess_agents={p.agents} inprocess_join_s={p.join_s:.2f} "
                    f"inprocess_pss_mb={p.pss_mb:.2f} inprocess_round_s={p.round_s:.2f}")
    print(" ".join(line))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="30 agent processes, once (< 60 s)")
    parser.add_argument("--agents", type=lambda s: [int(x) for x in s.split(",") if x], default=None,
                        help="agent process counts (default 10,30,100; quick: 30)")
    parser.add_argument("--inprocess", type=lambda s: [int(x) for x in s.split(",") if x], default=None,
                        help="in-process agent counts (default 10,100,300,1000; quick: none)")
    parser.add_argument("--repeat", type=int, default=None, help="runs per point (default 3; quick: 1)")
    parser.add_argument("--chart", default=None, help="write a PNG of join time and memory against N here")
    ns = parser.parse_args()
    ns.agents = ns.agents if ns.agents is not None else ([30] if ns.quick else [10, 30, 100])
    ns.inprocess = ns.inprocess if ns.inprocess is not None else ([] if ns.quick else [10, 100, 300, 1000])
    ns.repeat = ns.repeat or (1 if ns.quick else 3)
    main(ns)
