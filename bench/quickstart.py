"""The quickstart's wall time, with the baselines trained beside the federated stages or after them.

``nmoe run scenarios/quickstart.yaml`` (``make demo``'s run: FedCE + FedGate over a modeled Wi-Fi,
against every baseline) as a user runs it, each time with an empty stage cache (a first run), in
alternating order: ``beside`` (the default: forked workers, one per baseline, train them while the
federated stages run, scenarios/baseline_worker.py) and ``after`` (``NMOE_PARALLEL_BASELINES=0``:
the baselines train in the run's process once the federated stages are done). The workers train
with one torch thread, the run afterwards with the scenario's (two here), so their scores agree
only up to that (printed); at equal thread counts they are identical (tests/test_baseline_worker.py).

    python bench/quickstart.py [--quick] [--repeat R] [--agents subprocess|inprocess] [--set K=V ...]

``--quick`` shrinks the quickstart (2 Stage 1 rounds, 150 samples per client) to stay under 60 s;
``--set stage1.method=fedsc`` measures the FedSC quickstart. The last line printed is
``quickstart_s=<beside, median> after_s=<median> ratio=<beside/after>`` (issue 12's goal:
quickstart_s <= 45 on this 2-core machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["stage1.rounds=2", "partition.train_per_client=150", "partition.test_per_client=150", "stage2.epochs=5",
         "stage3.rounds=2", "stage3.local_epochs=2"]


def run(mode: str, args: argparse.Namespace, tmp: Path, k: int) -> tuple[float, dict]:
    out, cache = tmp / f"{mode}-{k}", tmp / f"cache-{mode}-{k}"
    sets = [x for s in [*(QUICK if args.quick else []), *args.set] for x in ("--set", s)]
    env = {**os.environ, "NMOE_CACHE": str(cache), "NMOE_PARALLEL_BASELINES": "1" if mode == "beside" else "0"}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "scenarios.cli", "run", "quickstart", *sets, "--agents", args.agents,
                           "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, json.loads((out / "results.json").read_text())


def main(args: argparse.Namespace) -> None:
    console = Console()
    walls: dict[str, list[float]] = {"beside": [], "after": []}
    table = Table(title="quickstart wall time, empty stage cache (seconds)")
    for col in ("run", "baselines", "wall", "federated stages", "baselines after them", "load"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory(prefix="nmoe-bench-") as tmp:
        for k in range(args.repeat):
            order = ("beside", "after") if k % 2 == 0 else ("after", "beside")
            results = {}
            for mode in order:
                wall, res = run(mode, args, Path(tmp), k)
                walls[mode].append(wall)
                results[mode] = res
                stages = res["stage_seconds"]
                federated = sum(v for s, v in stages.items() if s != "baselines")
                table.add_row(str(k), mode, f"{wall:.1f}", f"{federated:.1f}", f"{stages.get('baselines', 0):.1f}",
                              f"{os.getloadavg()[0]:.1f}")
            for name in ("local", "fedavg", "centralized"):  # one torch thread beside, the scenario's after
                accs = [statistics.mean(c["accuracy"] for c in results[m]["methods"][name]["per_client"].values())
                        for m in ("beside", "after")]
                console.print(f"run {k}: {name} baseline accuracy {accs[0]:.4f} beside, {accs[1]:.4f} after")
    console.print(table)
    beside, after = statistics.median(walls["beside"]), statistics.median(walls["after"])
    print(f"quickstart_s={beside:.1f} after_s={after:.1f} ratio={beside / after:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a shrunken quickstart, once each way (< 60 s)")
    parser.add_argument("--repeat", type=int, default=None, help="runs each way (default 1 quick, 3 full)")
    parser.add_argument("--agents", default="subprocess", choices=["subprocess", "inprocess"],
                        help="how the run starts its agents (default: a process each, as make demo does)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                        help="override a quickstart field in every run, e.g. stage1.method=fedsc")
    ns = parser.parse_args()
    ns.repeat = ns.repeat or (1 if ns.quick else 3)
    main(ns)
