"""What a run leaves behind: results.json, metrics.csv, PNG charts, and the table at the end."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from agents.messages import Op
from agents.strategy import CurvePoint, RoundRecord, RunSummary

from .scenario import Scenario
from .schema import to_dict

PerClient = Mapping[int, Mapping[str, float]]
ORDER = ("centralized", "nmoe", "nmoe_fedavg_gate", "fedce_personal", "fedavg", "local")


def method_labels(scn: Scenario) -> dict[str, str]:
    fe = "FedSC" if scn.stage1.method == "fedsc" else "FedCE"
    gate = "FedGate" if scn.stage3.method == "fedgate" else "FedAvg-gate"
    return {
        "nmoe": f"{fe}-NMoE ({gate})",
        "nmoe_fedavg_gate": f"{fe}-NMoE (FedAvg-gate)",
        "fedce_personal": "FedCE classifier (personal heads)",
        "fedavg": "FedAvg classifier",
        "local": "Local classifier",
        "centralized": "Centralized MoE",
    }


def summarize(per_client: PerClient) -> dict[str, Any]:
    """Mean (and spread) over clients of every metric, with the per-client values."""
    clients = [per_client[i] for i in sorted(per_client)]  # one order whatever order answers came in
    keys = sorted({k for m in clients for k in m})
    out: dict[str, Any] = {}
    for k in keys:
        vals = np.array([m[k] for m in clients if k in m], dtype=float)
        out[k] = float(vals.mean())
        if k in ("accuracy", "f1_macro"):
            out[f"{k}_std"] = float(vals.std())
    out["per_client"] = {str(i): dict(m) for i, m in sorted(per_client.items())}
    return out


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "machine": platform.machine(),
    }


def build_results(scn: Scenario, mode: str, summary: RunSummary, baselines: Mapping[str, PerClient],
                  extra: Mapping[str, Any], wall_s: float) -> dict[str, Any]:
    labels = method_labels(scn)
    methods = {**summary.methods, **baselines}
    ordered = sorted(methods, key=lambda m: ORDER.index(m) if m in ORDER else len(ORDER))
    return {
        "scenario": scn.name,
        "mode": mode,
        "wall_s": wall_s,
        "methods": {m: {"label": labels.get(m, m), **summarize(methods[m])} for m in ordered},
        "stage_seconds": dict(summary.stage_seconds),
        "rounds": [
            {"stage": r.stage, "round": r.round, "op": r.op.value, "answered": [f"client-{i}" for i in r.answered],
             "failures": {f"client-{i}": why for i, why in sorted(r.failures.items())},
             "loss": r.loss if math.isfinite(r.loss) else None,
             "seconds": r.seconds, "modeled_s": r.modeled_s}
            for r in summary.rounds
        ],
        "training_modeled_s": summary.training_modeled_s(),
        **({"curve": build_curve(scn, mode, summary.curve)} if scn.eval.every_round else {}),
        "privacy": dict(summary.privacy),
        **extra,
        "environment": environment(),
        "config": to_dict(scn),
    }


def clock_basis(scn: Scenario, mode: str) -> str:
    """What the modeled clock of a run is made of, in words."""
    devices = scn.devices.enabled
    if mode == "inprocess":
        return ("the devices' modeled compute (FLOPs / throughput); no channel in process" if devices
                else "this host's compute seconds (no devices, no channel in process)")
    channel = "the channel's modeled transit" if scn.channel.model == "emulated" else "no channel model (direct)"
    work = ("the devices' modeled compute" if devices else "this host's compute seconds")
    return f"{channel} + {work}; a round with a silent client lasts its modeled deadline"


def time_to_target(points: Sequence[Mapping[str, Any]], target: float) -> float | None:
    """Modeled seconds of training until the first point whose accuracy is at or above ``target``
    (None: never reached)."""
    for p in points:
        if p["accuracy"] is not None and p["accuracy"] >= target:
            return float(p["modeled_s"])
    return None


def build_curve(scn: Scenario, mode: str, points: Sequence[CurvePoint]) -> dict[str, Any]:
    """results.json's ``curve``: NMoE's accuracy after each Stage 3 round against the modeled clock."""
    rows = []
    for p in points:
        acc = [m["accuracy"] for _, m in sorted(p.per_client.items()) if "accuracy" in m]
        # a point nobody answered has no accuracy (null), it does not count as reaching anything
        rows.append({"stage": p.stage, "round": p.round, "modeled_s": p.modeled_s, "clients": len(acc),
                     "accuracy": float(np.mean(acc)) if acc else None,
                     "f1_macro": float(np.mean([m["f1_macro"] for m in p.per_client.values() if "f1_macro" in m]))
                     if acc else None})
    target = scn.eval.target_accuracy
    out: dict[str, Any] = {"clock": clock_basis(scn, mode), "points": rows, "target_accuracy": target}
    if target is not None:
        reached = time_to_target(rows, target)
        out |= {"time_to_target_s": reached, "reached": reached is not None}
    return out


def finite(obj: Any) -> Any:
    """The same data with NaN and infinities as null: results.json stays strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def write_outputs(out_dir: Path, results: Mapping[str, Any], rounds: list[RoundRecord]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(finite(results), indent=2, allow_nan=False))
    with open(out_dir / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["stage", "round", "op", "answered", "failed", "failures", "mean_loss", "seconds", "modeled_s"])
        for r in rounds:
            failures = ";".join(f"client-{i}:{why}" for i, why in sorted(r.failures.items()))
            loss = "" if math.isnan(r.loss) else f"{r.loss:.6f}"
            w.writerow([r.stage, r.round, r.op.value, len(r.answered), len(r.failures), failures, loss,
                        f"{r.seconds:.3f}", "" if r.modeled_s is None else f"{r.modeled_s:.3f}"])
    paths = [out_dir / "results.json", out_dir / "metrics.csv", plot_methods(out_dir / "methods.png", results)]
    curve = plot_losses(out_dir / "training.png", rounds)
    if curve is not None:
        paths.append(curve)
    if results.get("curve", {}).get("points"):
        paths.append(plot_curve(out_dir / "learning_curve.png", results))
    return paths


def warm_pyplot() -> threading.Thread:
    """Import pyplot in a thread of its own while a networked run waits on its agents, instead of
    after the last round (0.3-0.5 s of its fixed cost). Start it after the run's last ``fork()``
    (a fork copies only the calling thread) and after start-up (the import holds the GIL for most
    of its 0.5 s: the networked run starts it once its agents have joined); a failed import is
    raised again where a chart needs it."""
    thread = threading.Thread(target=_pyplot, name="warm-pyplot", daemon=True)
    thread.start()
    return thread


def save_figure(fig: Any, path: Path, **layout: Any) -> Path:
    """Lay out, write (PNG, 110 dpi) and close a figure; returns its path."""
    fig.tight_layout(**layout)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _pyplot() -> Any:
    """matplotlib, imported when a chart is drawn (it adds half a second to every start-up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_methods(path: Path, results: Mapping[str, Any]) -> Path:
    plt = _pyplot()
    methods = results["methods"]
    names = [methods[m]["label"] for m in methods]
    acc = [methods[m]["accuracy"] for m in methods]
    f1 = [methods[m]["f1_macro"] for m in methods]
    acc_err = [methods[m].get("accuracy_std", 0.0) for m in methods]
    f1_err = [methods[m].get("f1_macro_std", 0.0) for m in methods]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(names)), 4.2))
    ax.bar(x - 0.2, acc, 0.4, yerr=acc_err, capsize=3, label="accuracy", color="#3b75af")
    ax.bar(x + 0.2, f1, 0.4, yerr=f1_err, capsize=3, label="macro-F1", color="#ef8636")
    for xi, (a, f) in enumerate(zip(acc, f1, strict=True)):
        ax.text(xi - 0.2, a + 0.01, f"{a:.3f}", ha="center", va="bottom", fontsize=8)
        ax.text(xi + 0.2, f + 0.01, f"{f:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, names, rotation=15, ha="right")
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("mean over clients")
    ax.set_title(f"{results['scenario']}: methods compared (error bars: spread over clients)")
    ax.legend(loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_losses(path: Path, rounds: list[RoundRecord]) -> Path | None:
    series: dict[str, list[tuple[int, float]]] = {}
    for r in rounds:
        if r.op in (Op.STAGE1_FIT, Op.STAGE3_FIT) and not math.isnan(r.loss):
            series.setdefault(r.stage, []).append((r.round, r.loss))
    if not series:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(4.5 * len(series), 3.4), squeeze=False)
    for ax, (stage, pts) in zip(axes[0], series.items(), strict=True):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3)
        ax.set_title(f"{stage}: mean local loss")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_curve(path: Path, results: Mapping[str, Any]) -> Path:
    """NMoE's accuracy (mean over clients) against the modeled clock, with the target if any."""
    curve = results["curve"]
    pts = [p for p in curve["points"] if p["accuracy"] is not None]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    ax.plot([p["modeled_s"] for p in pts], [p["accuracy"] for p in pts], marker="o", ms=4, label="NMoE accuracy")
    for p in pts:
        ax.annotate(f"r{p['round']}", (p["modeled_s"], p["accuracy"]), textcoords="offset points", xytext=(3, 4),
                    fontsize=7)
    target = curve.get("target_accuracy")
    if target is not None:
        ax.axhline(target, color="C3", ls="--", lw=1, label=f"target {target:g}")
        if curve.get("time_to_target_s") is not None:
            ax.axvline(curve["time_to_target_s"], color="C3", ls=":", lw=1,
                       label=f"reached at {curve['time_to_target_s']:.1f} s")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.set_xlabel("modeled training time (s)")
    ax.set_ylabel("accuracy, mean over clients")
    ax.set_title(f"{results['scenario']}: accuracy after each Stage 3 round", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def print_curve(console: Console, curve: Mapping[str, Any]) -> None:
    table = Table(title="learning curve: NMoE after each Stage 3 round, on the modeled clock")
    table.add_column("after")
    table.add_column("modeled s", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("clients", justify="right")
    for p in curve["points"]:
        acc = "-" if p["accuracy"] is None else f"{p['accuracy']:.4f}"
        table.add_row(f"{p['stage']} round {p['round']}", f"{p['modeled_s']:.1f}", acc, str(p["clients"]))
    console.print(table)
    console.print(f"clock: {curve['clock']}", highlight=False)
    target = curve.get("target_accuracy")
    if target is not None:
        reached = curve.get("time_to_target_s")
        console.print(f"time to accuracy {target:g}: "
                      + (f"[bold]{reached:.1f} modeled s[/bold]" if reached is not None
                         else "[yellow]not reached[/yellow] (null in results.json)"))


def print_summary(console: Console, results: Mapping[str, Any]) -> None:
    table = Table(title=f"{results['scenario']} ({results['mode']}): mean over clients")
    table.add_column("method")
    table.add_column("accuracy", justify="right")
    table.add_column("macro-F1", justify="right")
    table.add_column("fallback", justify="right")
    table.add_column("local share", justify="right")
    for m, r in results["methods"].items():
        fb = f"{r['fallback_rate']:.3f}" if "fallback_rate" in r else "-"
        ls = f"{r['local_share']:.2f}" if "local_share" in r else "-"
        table.add_row(r["label"], f"{r['accuracy']:.4f} ± {r['accuracy_std']:.3f}",
                      f"{r['f1_macro']:.4f} ± {r['f1_macro_std']:.3f}", fb, ls, style="bold" if m == "nmoe" else None)
    console.print(table)
    times = Table(title="time per stage")
    times.add_column("stage")
    times.add_column("seconds", justify="right")
    for stage, seconds in results["stage_seconds"].items():
        times.add_row(stage, f"{seconds:.1f}")
    times.add_row("total", f"{results['wall_s']:.1f}", style="bold")
    console.print(times)
    if results.get("curve"):
        print_curve(console, results["curve"])
    if results.get("privacy"):
        p = results["privacy"]
        console.print(f"FedSC correlation matrices: ({p['epsilon']:.2f}, {p['delta']:g})-DP over "
                      f"{int(p['releases'])} releases (noise multiplier {p['noise_multiplier']:g})")
