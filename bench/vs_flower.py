"""nmoe's networked Stage 1 against Flower's simulation engine, the same workload, one after the other.

Workload (both sides): 10 clients x 1000 Fashion-MNIST samples (the paper's non-IID(0.2) partition),
ResNet20 + the 4-layer MLP head (nmoe's FedCE classifier), one local epoch of batch 64, FedAvg
weighted by samples, 3 rounds. Each client's local step is the very same
``nmoe_models.learner.ClientLearner.stage1_fit`` on the same data, so the two differ only in how the
rounds are run:

- nmoe: ``nmoe run paper_fedce_noniid`` networked (mosquitto, the coordinator, 10 agent processes),
  Stage 2/3 and baselines off; round times from its metrics.csv;
- Flower: ``flwr.simulation.run_simulation`` (Ray backend, one CPU per client actor) with FedAvg;
  round times from the strategy's configure_fit .. aggregate_fit.

Flower is an optional extra (``pip install -e '.[bench]'``), not a runtime dependency. Its pins may
not fit the project's environment; ``--flower-python`` runs the Flower half with another
interpreter (a venv holding flwr[simulation] that can import this checkout and torch).

    python bench/vs_flower.py [--quick] [--flower-python PATH]

The last line printed is ``round_ratio_vs_flower=<nmoe / flower mean round> wall_ratio_vs_flower=<...>``
(below 1: nmoe is faster).
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

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = "paper_fedce_noniid"


def nmoe_settings(args: argparse.Namespace) -> list[str]:
    sets = [f"clients={args.clients}", f"partition.train_per_client={args.samples}", "partition.test_per_client=100",
            "stage1.method=fedce", f"stage1.rounds={args.rounds}", "stage1.local_epochs=1",
            f"stage1.batch_size={args.batch}", "stage2.epochs=0", "stage3.rounds=0", "baselines=[]",
            "network.min_clients=1", "network.join_timeout_s=300", "network.round_timeout_s=900"]
    return sets


def run_nmoe(args: argparse.Namespace, out: Path) -> dict[str, object]:
    cmd = [sys.executable, "-m", "scenarios.cli", "run", SCENARIO, "--out", str(out)]
    for s in nmoe_settings(args):
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"nmoe run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(out / "metrics.csv") as fh:
        rounds = [float(r["seconds"]) for r in csv.DictReader(fh) if r["op"] == "stage1_fit"]
    return {"wall_s": wall, "rounds_s": rounds}


# ------------------------------------------------------------------ the Flower half (its own process)

def flower_main(spec: dict[str, object]) -> None:
    """Runs in the Flower interpreter: prints one JSON line with wall and round seconds."""
    import logging

    import flwr
    import numpy as np
    import torch
    from flwr.client import ClientApp, NumPyClient
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerAppComponents, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import run_simulation

    from nmoe_models.learner import ClientLearner
    from nmoe_models.partition import load_client_data
    from scenarios.scenario import load_scenario

    logging.getLogger("flwr").setLevel(logging.WARNING)
    exp = load_scenario(SCENARIO, list(spec["settings"]))  # type: ignore[arg-type]
    clients = int(spec["clients"])  # type: ignore[arg-type]

    def keys_of(learner: ClientLearner) -> list[str]:
        return sorted(learner.stage1_state())

    class Client(NumPyClient):
        def __init__(self, cid: int) -> None:
            torch.set_num_threads(1)
            self.learner = ClientLearner(exp, load_client_data(exp, cid))
            self.keys = keys_of(self.learner)

        def get_parameters(self, config):  # noqa: ANN001, ANN201
            state = self.learner.stage1_state()
            return [state[k].numpy() for k in self.keys]

        def fit(self, parameters, config):  # noqa: ANN001, ANN201
            self.learner.load_stage1({k: torch.from_numpy(np.asarray(v)) for k, v in zip(self.keys, parameters,
                                                                                         strict=True)})
            result = self.learner.stage1_fit(int(config["round"]))
            return [result.state[k].numpy() for k in self.keys], result.samples, {"loss": result.loss}

    def client_fn(context: Context):  # noqa: ANN202
        return Client(int(context.node_config["partition-id"])).to_client()

    marks: dict[int, list[float]] = {}

    class Timed(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
            marks[server_round] = [time.perf_counter()]
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001, ANN201
            out = super().aggregate_fit(server_round, results, failures)
            marks[server_round].append(time.perf_counter())
            if failures:
                raise RuntimeError(f"round {server_round}: {len(failures)} Flower client(s) failed: {failures[:1]}")
            return out

    torch.set_num_threads(1)
    init = ClientLearner(exp, load_client_data(exp, 0))
    start = init.stage1_state()
    initial = ndarrays_to_parameters([start[k].numpy() for k in keys_of(init)])

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = Timed(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=clients,
                         min_available_clients=clients, initial_parameters=initial,
                         on_fit_config_fn=lambda r: {"round": r - 1})
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=int(spec["rounds"])))  # type: ignore[arg-type]

    t0 = time.perf_counter()
    run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
                   num_supernodes=clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": int(spec["cpus"]), "include_dashboard": False}})
    wall = time.perf_counter() - t0
    rounds = [marks[r][1] - marks[r][0] for r in sorted(marks) if len(marks[r]) == 2]
    if len(rounds) != int(spec["rounds"]):  # type: ignore[arg-type]
        raise SystemExit(f"Flower finished {len(rounds)} of {spec['rounds']} rounds")
    print(json.dumps({"wall_s": wall, "rounds_s": rounds, "flwr": flwr.__version__}))


def run_flower(args: argparse.Namespace) -> dict[str, object]:
    import os

    spec = {"settings": nmoe_settings(args), "clients": args.clients, "rounds": args.rounds,
            "cpus": os.cpu_count() or 1}
    cmd = [args.flower_python, str(Path(__file__).resolve()), "--flower-worker", json.dumps(spec)]
    env = os.environ | {"PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"the Flower run failed ({proc.returncode}); is flwr[simulation] installed for "
                         f"{args.flower_python}? (pip install -e '.[bench]', or --flower-python)\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 120))
    with tempfile.TemporaryDirectory(prefix="nmoe-vs-flower-") as tmp:
        ours = run_nmoe(args, Path(tmp) / "nmoe")
        theirs = run_flower(args)
    a, b = ours["rounds_s"], theirs["rounds_s"]
    assert isinstance(a, list) and isinstance(b, list)
    table = Table(title=f"FedCE Stage 1: {args.clients} clients x {args.samples} Fashion-MNIST, ResNet20 + MLP head, "
                        f"1 local epoch, batch {args.batch} (Flower {theirs.get('flwr')}, Ray simulation)")
    for col in ("round", "nmoe networked s", "Flower simulation s", "ratio"):
        table.add_column(col, justify="right")
    for r, (x, y) in enumerate(zip(a, b, strict=True)):
        table.add_row(str(r), f"{x:.2f}", f"{y:.2f}", f"{x / y:.3f}")
    round_ratio = (sum(a) / len(a)) / (sum(b) / len(b))
    wall_ratio = float(ours["wall_s"]) / float(theirs["wall_s"])  # type: ignore[arg-type]
    table.add_row("mean", f"{sum(a) / len(a):.2f}", f"{sum(b) / len(b):.2f}", f"{round_ratio:.3f}", style="bold")
    table.add_row("wall (launch to exit)", f"{ours['wall_s']:.1f}", f"{theirs['wall_s']:.1f}", f"{wall_ratio:.3f}")
    console.print(table)
    print(f"round_ratio_vs_flower={round_ratio:.3f} wall_ratio_vs_flower={wall_ratio:.3f}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--flower-worker":
        sys.path.insert(0, str(ROOT))
        flower_main(json.loads(sys.argv[2]))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 clients x 100 samples, 2 rounds")
    parser.add_argument("--clients", type=int, default=None, help="default 10")
    parser.add_argument("--samples", type=int, default=None, help="training samples per client (default 1000)")
    parser.add_argument("--rounds", type=int, default=None, help="default 3")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--flower-python", default=sys.executable,
                        help="the interpreter for the Flower half (default: this one)")
    ns = parser.parse_args()
    ns.clients = ns.clients or (4 if ns.quick else 10)
    ns.rounds = ns.rounds or (2 if ns.quick else 3)
    ns.samples = ns.samples or (100 if ns.quick else 1000)
    main(ns)
