"""What the stage cache saves: one sweep over Stage 3 and evaluation settings only, run with the
cache (from an empty one) and with ``--no-cache``, side by side in one run, as a user runs them
(``nmoe sweep FILE``, each its own command).

Three sweeps of the same file, one after the other: ``--no-cache``; with an empty cache (the first
cell computes Stage 1 and 2, the others load them); and again into a new folder with the cache that
run left (every cell loads them: the case of a Stage 3 / evaluation sweep after a sweep such as Fig. 3
that trained the same Stage 1).

Reported: ``cache_ratio`` = wall time of the sweep from an empty cache / wall time of the
``--no-cache`` sweep (goal < 0.15; its floor is about 1/cells, so the full mode has 12 cells),
``warm_ratio`` = the same with the cache already holding Stage 1 and 2, and how many runs computed
Stage 1.

    python bench/sweep_cache.py            # Fashion-MNIST, 10 clients x 500, 12 cells (an hour on 2 cores)
    python bench/sweep_cache.py --quick    # synthetic data, 4 cells (about a minute on an idle machine)

The last line printed is
``cells=<n> nocache_s=<x> cold_s=<y> warm_s=<z> stage1_computed=<a> warm_ratio=<w> cache_ratio=<r>``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

QUICK = """
name: cachebench
seed: 0
clients: 3
threads: 2
data: {name: synthetic, synthetic_train: 3000}
partition: {kind: noniid, tau: 0.5, train_per_client: 150, test_per_client: 30}
model: {head_hidden: 16, gate_hidden: 8}
stage1: {method: fedce, rounds: 3, local_epochs: 1, batch_size: 32}
stage2: {epochs: 2}
stage3: {rounds: 1, local_epochs: 1}
"""
FULL = """
name: cachebench
seed: 0
clients: 10
threads: 2
data: {name: fashion_mnist}
partition: {kind: noniid, tau: 0.5, train_per_client: 500, test_per_client: 200}
stage1: {method: fedce, rounds: 3, local_epochs: 1, batch_size: 64}
stage2: {epochs: 5}
stage3: {rounds: 2, local_epochs: 1}
baselines: [local]
"""


def sweep_file(folder: Path, quick: bool) -> Path:
    (folder / "base.yaml").write_text(QUICK if quick else FULL)
    grid = ("{eval.top_k: [1, 2], eval.combine: [probs, logits]}" if quick
            else "{eval.top_k: [1, 2, 3], stage3.rounds: [1, 2], eval.combine: [probs, logits]}")
    path = folder / "sweep.yaml"
    path.write_text(f"base: base.yaml\ngrid: {grid}\nseeds: [0]\n")
    return path


def run(path: Path, out: Path, cache: Path | None) -> float:
    env = {**os.environ, "NMOE_CACHE": str(cache or out / "unused-cache")}
    cmd = [sys.executable, "-m", "scenarios.cli", "sweep", str(path), "--out", str(out)]
    if cache is None:
        cmd.append("--no-cache")
    clock = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - clock


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="synthetic data, under a minute")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = sweep_file(folder, args.quick)
        nocache_s = run(path, folder / "nocache", None)
        cold_s = run(path, folder / "cold", folder / "cache")
        warm_s = run(path, folder / "warm", folder / "cache")
        computed = {}
        for name in ("cold", "warm"):
            stages = [json.loads(p.read_text())["cache"]["stages"] for p in (folder / name).rglob("results.json")]
            computed[name] = sum(s["stage1"]["status"] == "computed" for s in stages)
        cells = len(stages)
        print(f"no cache: {nocache_s:.1f}s; from an empty cache: {cold_s:.1f}s ({computed['cold']} of {cells} runs "
              f"computed Stage 1); with the cache filled: {warm_s:.1f}s ({computed['warm']} computed it)")
        print(f"cells={cells} nocache_s={nocache_s:.1f} cold_s={cold_s:.1f} warm_s={warm_s:.1f} "
              f"stage1_computed={computed['cold']} warm_ratio={warm_s / nocache_s:.3f} "
              f"cache_ratio={cold_s / nocache_s:.3f}")


if __name__ == "__main__":
    main()
