"""A sweep's summary, drawn from its run folders on disk: summary.csv, a table and line charts.

One row per (grid cell, method): the cell's grid values, the method, and for each metric its mean
over the seeds that finished and the half-width of its 95% confidence interval (Student's t,
n - 1 degrees of freedom; empty with a single seed). Failed runs are counted and their first error
line kept in the row, so a summary never hides a failure.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from .report import ORDER, _pyplot, save_figure
from .scenario import Scenario
from .schema import build
from .sweep import Run, Sweep, show

METRICS = ("accuracy", "f1_macro")
EXTRAS = ("fallback_rate", "bytes_per_sample", "payload_bytes_per_sample", "latency_p50_ms", "latency_p95_ms")
"""Inference figures reported where the method has them (NMoE's serverless routing)."""
LINES = {"nmoe": "NMoE", "nmoe_fedavg_gate": "NMoE (FedAvg-gate)", "centralized": "Centralized MoE",
         "fedce_personal": "FedCE classifier (personal heads)", "fedavg": "FedAvg classifier",
         "local": "Local classifier"}
"""Chart legends: one line per method whatever the cell (a row's label names its cell's Stage 1)."""
RUN_EXTRAS = ("epsilon", "answered_share", "time_to_target_s", "target_reached", "training_modeled_s", "air_mb",
              "compute_j", "radio_j", "energy_j", "host_lag_share", "wall_s")
"""Figures of the whole run: the DP budget spent (FedSC with privacy), the mean share of clients
answered per training round, the modeled seconds of training until NMoE first reached
``eval.target_accuracy`` (mean over the seeds that reached it) and the share of seeds that did,
the modeled seconds of the whole training, megabytes on the air (emulated channel), the energy of
the modeled devices (``devices:``), how far the host lagged behind their clock, and the wall time."""
CHARTED = ("fallback_rate", "latency_p95_ms", "bytes_per_sample", "payload_bytes_per_sample", "answered_share",
           "time_to_target_s", "target_reached", "air_mb", "energy_j")
"""Charted besides accuracy and macro-F1 when a sweep has them."""


def run_figures(results: Mapping[str, Any]) -> dict[str, float]:
    """Figures of one run that are not per method (see RUN_EXTRAS), where it has them."""
    out: dict[str, float] = {}
    training = [r for r in results.get("rounds", []) if r.get("op") in ("stage1_fit", "stage3_fit")]
    if training:
        out["answered_share"] = float(np.mean([len(r["answered"]) / max(1, len(r["answered"]) + len(r["failures"]))
                                               for r in training]))
    curve = results.get("curve") or {}
    if curve.get("target_accuracy") is not None:
        out["target_reached"] = float(bool(curve.get("reached")))
        if curve.get("time_to_target_s") is not None:  # a seed that never got there has no time to average
            out["time_to_target_s"] = float(curve["time_to_target_s"])
    if results.get("training_modeled_s") is not None:
        out["training_modeled_s"] = float(results["training_modeled_s"])
    channel = (results.get("traffic") or {}).get("channel") or {}
    if channel.get("totals"):
        out["air_mb"] = float(channel["totals"]["bytes"]) / 1e6
    devices = results.get("devices") or {}
    if devices:
        out |= {k: float(devices["totals"][k]) for k in ("compute_j", "radio_j", "energy_j")}
        out["host_lag_share"] = float(devices["host"]["lag_share"])
    return out


@dataclass
class Row:
    cell: str
    values: Mapping[str, Any]
    method: str
    label: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)


def ci95(values: Sequence[float]) -> float:
    """Half-width of the 95% confidence interval of the mean (t distribution); NaN for n < 2."""
    n = len(values)
    if n < 2:
        return math.nan
    from scipy.stats import t  # scikit-learn's own dependency

    return float(t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n))


def _read(run: Run) -> tuple[dict[str, Any] | None, str]:
    """(results, error): the run's results.json, or why there is none ('' when not run yet)."""
    error_file = run.folder / "error.txt"
    if error_file.is_file():
        lines = [ln for ln in error_file.read_text().splitlines() if ln.strip()]
        return None, lines[-1] if lines else "failed"
    path = run.folder / "results.json"
    if not path.is_file():
        return None, ""
    try:
        return json.loads(path.read_text()), ""
    except json.JSONDecodeError as err:
        return None, f"results.json is not valid JSON ({err})"


def collect(sweep: Sweep) -> tuple[list[Row], int]:
    """Rows in the sweep's cell order, methods in the usual order; and the number of runs missing."""
    rows: dict[tuple[str, str], Row] = {}
    failures: dict[str, list[str]] = {}
    missing = 0
    for run in sweep.runs:
        results, error = _read(run)
        if results is None:
            if error:
                failures.setdefault(run.cell, []).append(f"seed {run.seed}: {error}")
                rows.setdefault((run.cell, ""), Row(run.cell, run.values, ""))
            else:
                missing += 1
            continue
        privacy = results.get("privacy") or {}
        for method, summary in results["methods"].items():
            row = rows.setdefault((run.cell, method), Row(run.cell, run.values, method, summary.get("label", method)))
            for key in METRICS + EXTRAS:
                if summary.get(key) is not None:
                    row.samples.setdefault(key, []).append(float(summary[key]))
            if privacy.get("epsilon") is not None and method.startswith("nmoe"):
                row.samples.setdefault("epsilon", []).append(float(privacy["epsilon"]))
            for key, value in run_figures(results).items():
                row.samples.setdefault(key, []).append(value)
            row.samples.setdefault("wall_s", []).append(float(results["wall_s"]))
    cells = list(dict.fromkeys(r.cell for r in sweep.runs))
    out = []
    for cell in cells:
        mine = [r for (c, _), r in rows.items() if c == cell and r.method]
        mine.sort(key=lambda r: ORDER.index(r.method) if r.method in ORDER else len(ORDER))
        if not mine and (cell, "") in rows:
            mine = [rows[(cell, "")]]  # every seed failed: one row that says so
        for r in mine:
            r.failed = failures.get(cell, [])
        out += mine
    return out, missing


def columns(sweep: Sweep, rows: Sequence[Row]) -> list[str]:
    present = {k for r in rows for k in r.samples}
    figures = [k for k in (*METRICS, *EXTRAS, *RUN_EXTRAS) if k in present or k in METRICS]
    return [*sweep.grid, "method", "label", "n_seeds", *[f"{k}_{s}" for k in figures for s in ("mean", "ci95")],
            "failed_seeds", "error"]


def _fmt(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6g}"


def as_records(sweep: Sweep, rows: Sequence[Row]) -> list[dict[str, str]]:
    cols = columns(sweep, rows)
    records = []
    for r in rows:
        rec: dict[str, str] = {k: show(v) for k, v in r.values.items()}
        rec |= {"method": r.method or "-", "label": r.label, "n_seeds": str(len(r.samples.get("accuracy", [])))}
        for col in cols:
            for stat in ("_mean", "_ci95"):
                if col.endswith(stat):
                    vals = r.samples.get(col[: -len(stat)], [])
                    value = (float(np.mean(vals)) if vals else math.nan) if stat == "_mean" else ci95(vals)
                    rec[col] = _fmt(value)
        rec |= {"failed_seeds": str(len(r.failed)), "error": "; ".join(r.failed)[:500]}
        records.append({c: rec.get(c, "") for c in cols})
    return records


def write_summary(sweep: Sweep, console: Console) -> list[Path]:
    """summary.csv, the terminal table and one chart per swept key, from the folders on disk."""
    rows, missing = collect(sweep)
    sweep.out.mkdir(parents=True, exist_ok=True)
    path = sweep.out / "summary.csv"
    records = as_records(sweep, rows)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns(sweep, rows))
        writer.writeheader()
        writer.writerows(records)
    print_table(console, sweep, records)
    if missing:
        console.print(f"[yellow]{missing} run(s) not run yet[/yellow]: `nmoe sweep` without --report runs them")
    charts = [plot_key(sweep, key, records) for key, values in sweep.grid.items() if len(values) > 1]
    if any(rec.get("energy_j_mean") for rec in records):
        charts.append(plot_energy(sweep, records))
    curves = plot_curves(sweep)
    training = plot_training(sweep, console)
    return [path, *charts, *(c for c in (curves, training) if c is not None)]


TRAINED = {"stage1": "Stage 1", "stage3:fedgate": "Stage 3, FedGate", "stage3:fedavg": "Stage 3, FedAvg-gate"}
"""The stages whose rounds a training-loss chart follows (Stage 2's experts train in one round)."""
STAGE1 = {"fedce": "FedCE (cross-entropy)", "fedsc": "FedSC (spectral contrastive loss)"}


def training_losses(run: Run) -> dict[str, list[tuple[int, float]]]:
    """A finished run's training loss after each round of each stage, from its metrics.csv (the
    mean over the clients that answered): {stage: [(round, loss), ...]}; {} for a run not finished.
    A metrics.csv that cannot be read raises ValueError naming it."""
    path = run.folder / "metrics.csv"
    if not (run.folder / "results.json").is_file() or not path.is_file():
        return {}
    out: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            if row.get("stage") in TRAINED and (row.get("op") or "").endswith("_fit") and row.get("mean_loss"):
                try:
                    out.setdefault(row["stage"], []).append((int(row["round"]), float(row["mean_loss"])))
                except (TypeError, ValueError) as err:
                    raise ValueError(f"{path}, line {line}: not a round and a loss ({err})") from None
    return out


def plot_training(sweep: Sweep, console: Console) -> Path | None:
    """chart_training.png: each stage's training loss against its round, one line per cell (the mean
    over its seeds, the band their min-max), so a reader sees whether a method had converged at the
    sweep's budget. Stage 1 gets a panel per loss (FedCE's cross-entropy and FedSC's spectral
    contrastive loss are not on one scale). None when no finished run trained more than one round."""
    stages = list(TRAINED)
    panels: dict[tuple[int, str], dict[str, list[dict[int, float]]]] = {}  # (order, title) -> cell -> per seed
    unreadable = []
    for run in sweep.runs:
        try:
            losses = training_losses(run)
        except (OSError, ValueError) as err:
            unreadable.append(str(err))
            continue
        if not losses:
            continue
        method = build(Scenario, run.data).stage1.method  # the run's own settings, defaults filled in
        label = ", ".join(f"{k.rsplit('.', 1)[-1]}={tick_label(v, 24)}" for k, v in run.values.items()) or run.cell
        for stage, points in losses.items():
            title = TRAINED[stage]
            if stage == "stage1":
                title += f", {STAGE1.get(method, method)}"
            panels.setdefault((stages.index(stage), title), {}).setdefault(label, []).append(dict(points))
    if unreadable:
        console.print(f"[yellow]chart_training.png leaves out {len(unreadable)} run(s)[/yellow]: " + unreadable[0])
    drawn = {title: lines for (_, title), lines in sorted(panels.items())
             if any(len(seed) > 1 for seeds in lines.values() for seed in seeds)}  # fmt: skip
    if not drawn:
        return None
    plt = _pyplot()
    cells = list(dict.fromkeys(label for lines in drawn.values() for label in lines))
    colors = {label: f"C{i % 10}" for i, label in enumerate(cells)}
    fig, axes = plt.subplots(1, len(drawn), figsize=(5.2 * len(drawn), 4.2), squeeze=False)
    for ax, (title, lines) in zip(axes[0], drawn.items(), strict=True):
        for label, seeds in lines.items():
            rounds = sorted({r for seed in seeds for r in seed})
            at = [[seed[r] for seed in seeds if r in seed] for r in rounds]
            mean = [float(np.mean(v)) for v in at]
            ax.plot(rounds, mean, marker="o", ms=3, lw=1.3, color=colors[label],
                    label=f"{label} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})")
            if len(seeds) > 1:
                ax.fill_between(rounds, [min(v) for v in at], [max(v) for v in at], color=colors[label], alpha=0.12,
                                lw=0)  # fmt: skip
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel("training loss (mean over clients)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5)
    fig.suptitle(f"sweep {sweep.name}: training loss per round (line: mean over seeds; band: min-max)", fontsize=10)
    return save_figure(fig, sweep.out / "chart_training.png")


def plot_curves(sweep: Sweep) -> Path | None:
    """Every run's learning curve (``eval.every_round``): NMoE's accuracy against the modeled clock,
    one color per cell, one line per seed, with the target; None when no run has a curve."""
    curves: dict[str, list[tuple[list[float], list[float]]]] = {}
    target = None
    for run in sweep.runs:
        results, _ = _read(run)
        curve = (results or {}).get("curve")
        if not curve:
            continue
        target = curve.get("target_accuracy", target)
        pts = [p for p in curve["points"] if p["accuracy"] is not None]
        label = ", ".join(tick_label(v, 40) for v in run.values.values()) or run.cell
        curves.setdefault(label, []).append(([p["modeled_s"] for p in pts], [p["accuracy"] for p in pts]))
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for i, (label, lines) in enumerate(curves.items()):
        for j, (xs, ys) in enumerate(lines):
            ax.plot(xs, ys, marker="o", ms=3, lw=1.2, alpha=0.8, color=f"C{i % 10}",
                    label=f"{label} ({len(lines)} seed{'s' if len(lines) > 1 else ''})" if j == 0 else None)
    if target is not None:
        ax.axhline(target, color="k", ls="--", lw=0.8, label=f"target {target:g}")
    ax.set_xlabel("modeled training time (s): Stage 1, 2 and 3 rounds so far")
    ax.set_ylabel("NMoE accuracy after each Stage 3 round")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"sweep {sweep.name}: learning curves on the modeled clock", fontsize=10)
    return save_figure(fig, sweep.out / "chart_curves.png")


def plot_energy(sweep: Sweep, records: Sequence[Mapping[str, str]]) -> Path:
    """NMoE's accuracy against the joules its clients spent (compute + radio), one point per cell."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    xs = []
    for rec in records:
        if rec["method"] != "nmoe" or not rec.get("energy_j_mean") or not rec.get("accuracy_mean"):
            continue
        x, y = float(rec["energy_j_mean"]), float(rec["accuracy_mean"])
        xs.append(x)
        ax.scatter([x], [y], s=30, label=", ".join(str(rec[k]) for k in sweep.grid)[:70])
    if xs and max(xs) > 10 * min(xs):
        ax.set_xscale("log")
    else:
        ax.set_xlim(0, 1.15 * max(xs, default=1.0))
    ax.set_xlabel("energy of all clients, J (compute + radio, modeled)")
    ax.set_ylabel("NMoE accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"sweep {sweep.name}: accuracy vs energy ({', '.join(k.rsplit('.', 1)[-1] for k in sweep.grid)})",
                 fontsize=10)
    return save_figure(fig, sweep.out / "chart_energy.png")


def print_table(console: Console, sweep: Sweep, records: Sequence[Mapping[str, str]]) -> None:
    table = Table(title=f"sweep {sweep.name}: mean ± 95% CI over seeds")
    for key in sweep.grid:
        table.add_column(key)
    timed = any(rec.get("target_reached_mean") for rec in records)
    for name in ("method", "n", "accuracy", "macro-F1", *(("to target (modeled s)",) if timed else ()), "failed"):
        table.add_column(name, justify="left" if name == "method" else "right")

    def pm(rec: Mapping[str, str], k: str) -> str:
        mean, ci = rec[f"{k}_mean"], rec[f"{k}_ci95"]
        return "-" if not mean else f"{float(mean):.4f}" + (f" ± {float(ci):.4f}" if ci else "")

    def to_target(rec: Mapping[str, str]) -> tuple[str, ...]:
        if not timed:
            return ()
        if rec["method"] != "nmoe" or not rec.get("target_reached_mean"):
            return ("",)
        share = float(rec["target_reached_mean"])
        return (("not reached" if share == 0 else pm(rec, "time_to_target_s"))
                + (f" ({100 * share:.0f}% of seeds)" if 0 < share < 1 else ""),)

    for rec in records:
        failed = rec["failed_seeds"]
        table.add_row(*[rec[k] for k in sweep.grid], rec["label"] or rec["method"], rec["n_seeds"], pm(rec, "accuracy"),
                      pm(rec, "f1_macro"), *to_target(rec), f"[red]{failed}[/red]" if failed != "0" else "0")
    console.print(table)


def tick_label(value: Any, width: int = 28) -> str:
    """A short axis label for a swept value: a list by its length, a mapping as key=value pairs."""
    if isinstance(value, (list, tuple)):
        text = f"{len(value)} item{'' if len(value) == 1 else 's'}"
    elif isinstance(value, Mapping) and len(value) == 1:  # {preset: laptop}: the value says it
        text = f"{next(iter(value))}: {tick_label(next(iter(value.values())), width)}"
    elif isinstance(value, Mapping):
        text = ", ".join(f"{k}={tick_label(v, width)}" for k, v in value.items()) or "{}"
    else:
        text = show(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def plot_key(sweep: Sweep, key: str, records: Sequence[Mapping[str, str]]) -> Path:
    """Metrics against one swept key: a line per method (and per value of the other keys)."""
    plt = _pyplot()
    metrics = [*METRICS] + [k for k in CHARTED if any(float(r.get(f"{k}_mean") or 0) > 0 for r in records)]
    xs = [show(v) for v in sweep.grid[key]]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in sweep.grid[key])
    position = {x: (float(x) if numeric else float(i)) for i, x in enumerate(xs)}
    others = [k for k in sweep.grid if k != key]

    def line_name(rec: Mapping[str, str]) -> str:
        name = LINES.get(rec["method"], rec["method"])
        if others:
            name += " (" + ", ".join(f"{k.rsplit('.', 1)[-1]}={rec[k]}" for k in others) + ")"
        return name

    colors = {n: f"C{i % 10}" for i, n in enumerate(dict.fromkeys(line_name(r) for r in records))}
    ncols = min(4, len(metrics))
    nrows = -(-len(metrics) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.0 * nrows), squeeze=False)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        lines: dict[str, list[tuple[float, float, float]]] = {}
        for rec in records:
            if not rec.get(f"{metric}_mean"):
                continue
            if metric in RUN_EXTRAS and rec["method"] != "nmoe":
                continue  # a figure of the whole run: the same for every method of the cell, drawn once
            ci = rec[f"{metric}_ci95"]
            point = (position[rec[key]], float(rec[f"{metric}_mean"]), float(ci or 0.0))
            lines.setdefault(line_name(rec), []).append(point)
        for name, pts in lines.items():
            pts.sort()
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", ms=4,
                        capsize=3, label=name, color=colors[name])  # one color per line in every panel
        if not numeric:
            ax.set_xticks([position[x] for x in xs], [tick_label(v, 22) for v in sweep.grid[key]], fontsize=7,
                          rotation=20, ha="right")
        if metric in METRICS:
            ax.set_ylim(0, 1.02)  # a 2-seed t interval can be wider than the whole scale
        else:  # from 0: a flat curve must look flat, not like noise magnified to fill the axes
            top = max((abs(line[1]) + line[2] for pts in lines.values() for line in pts), default=1.0)
            ax.set_ylim(0, 1.1 * top if top > 0 else 1.0)
            ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(2, max(1, len(labels))), fontsize=8, frameon=False)
    fig.suptitle(f"sweep {sweep.name}: mean over seeds, error bars 95% CI")
    legend_rows = -(-len(labels) // 2)
    return save_figure(fig, sweep.out / f"chart_{key}.png",
                       rect=(0, min(0.4, 0.035 * legend_rows / nrows + 0.02), 1, 1))
