"""Federated rounds through mosquitto against the in-process pipeline, side by side in one run.

Paper-sized Stage 1 rounds (10 clients x 1000 Fashion-MNIST samples, ResNet20, FedCE, one local
epoch) are run twice on this machine: ``nmoe run --inprocess`` and ``nmoe run`` (networked:
mosquitto, the coordinator, 10 client agent processes), each as its own command, as a user runs
them. Both run only Stage 1 here (Stage 2 and 3 are switched off, no baselines). Reported:

- round_ratio: mean networked Stage 1 round time / mean in-process round time (goal <= 1.05);
- startup_s: from launching ``nmoe run`` to the coordinator sending round 0's task, minus the
  slowest agent's data preparation (loading its partition, building its models) (issue 12's goal:
  <= 3 s for 10 agents);
- fixed_s (each mode): the command's wall time, from launch to exit, minus the sum of its Stage 1
  round times: everything a run costs that is not learning (imports, broker, joining, evaluation,
  reporting, shutting down). Issue 12's goal: <= 6 s networked for the 3-round job.

    python bench/round_overhead.py [--quick] [--rounds R] [--clients N] [--samples S]

The last line printed is ``round_ratio=<x> startup_s=<y> fixed_s=<networked> fixed_inprocess_s=<z>``.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
NMOE = [sys.executable, "-m", "scenarios.cli"]


def settings(args: argparse.Namespace) -> list[str]:
    sets = [
        f"clients={args.clients}", "partition.kind=iid", f"partition.train_per_client={args.samples}",
        "partition.test_per_client=100", "stage1.method=fedce", f"stage1.rounds={args.rounds}",
        "stage1.local_epochs=1", "stage1.batch_size=32", "stage2.epochs=0", "stage3.rounds=0", "baselines=[]",
        "network.min_clients=1", "network.join_timeout_s=300", "network.round_timeout_s=900",
    ]
    return [x for s in sets for x in ("--set", s)]


def run(mode: str, args: argparse.Namespace, out: Path) -> tuple[float, float, dict]:
    # --no-cache: an in-process run would otherwise load Stage 1 from an earlier run's stage cache
    # (and report that run's round times)
    cmd = [*NMOE, "run", "paper_fedce_noniid", *settings(args), "--no-cache", "--out", str(out)]
    if mode == "inprocess":
        cmd.append("--inprocess")
    launched = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - launched
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return launched, wall, json.loads((out / "results.json").read_text())


def round_seconds(out: Path) -> list[float]:
    with open(out / "metrics.csv") as fh:
        return [float(r["seconds"]) for r in csv.DictReader(fh) if r["op"] == "stage1_fit"]


def main(args: argparse.Namespace) -> None:
    console = Console()
    with tempfile.TemporaryDirectory(prefix="nmoe-bench-") as tmp:
        _, wall_local, _ = run("inprocess", args, Path(tmp) / "inprocess")
        launched, wall_remote, net = run("networked", args, Path(tmp) / "networked")
        local, remote = round_seconds(Path(tmp) / "inprocess"), round_seconds(Path(tmp) / "networked")
    tl = net["traffic"]["timeline"]
    startup = tl["first_task_at"] - launched - tl["max_data_s"]
    ratio = (sum(remote) / len(remote)) / (sum(local) / len(local))
    table = Table(title=f"Stage 1 rounds: {args.clients} clients x {args.samples} Fashion-MNIST samples, ResNet20, "
                        f"1 local epoch ({net['environment']['cpus']} CPUs)")
    table.add_column("round")
    table.add_column("in-process s", justify="right")
    table.add_column("networked s", justify="right")
    table.add_column("ratio", justify="right")
    for r, (a, b) in enumerate(zip(local, remote, strict=True)):
        table.add_row(str(r), f"{a:.2f}", f"{b:.2f}", f"{b / a:.3f}")
    table.add_row("mean", f"{sum(local) / len(local):.2f}", f"{sum(remote) / len(remote):.2f}", f"{ratio:.3f}",
                  style="bold")
    console.print(table)
    start = Table(title="networked start-up (seconds after launching `nmoe run`)")
    for col in ("broker ready", "all joined", "round 0 sent", "slowest data prep", "start-up (goal <= 3)"):
        start.add_column(col, justify="right")
    start.add_row(f"{tl['broker_ready_at'] - launched:.2f}", f"{tl['all_joined_at'] - launched:.2f}",
                  f"{tl['first_task_at'] - launched:.2f}", f"{tl['max_data_s']:.2f}", f"{startup:.2f}")
    console.print(start)
    fixed_local, fixed_remote = wall_local - sum(local), wall_remote - sum(remote)
    fixed = Table(title="fixed cost: command wall time minus Stage 1 round time (seconds)")
    for col in ("mode", "wall", "rounds", "fixed"):
        fixed.add_column(col, justify="right")
    fixed.add_row("in-process", f"{wall_local:.2f}", f"{sum(local):.2f}", f"{fixed_local:.2f}")
    fixed.add_row("networked", f"{wall_remote:.2f}", f"{sum(remote):.2f}", f"{fixed_remote:.2f}", style="bold")
    console.print(fixed)
    print(f"round_ratio={ratio:.3f} startup_s={startup:.2f} fixed_s={fixed_remote:.2f} "
          f"fixed_inprocess_s={fixed_local:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 clients x 150 samples, 2 rounds (< 60 s)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--samples", type=int, default=None, help="training samples per client")
    ns = parser.parse_args()
    ns.rounds = ns.rounds or (2 if ns.quick else 3)
    ns.samples = ns.samples or (150 if ns.quick else 1000)
    main(ns)
