"""``nmoe report FOLDER``: one self-contained report.html (no network needed to open it) for a run
folder (the dashboard's views, static) or a sweep folder (its summary table and charts)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from nmoe.errors import ConfigError

from ..sweep_report import CHARTED, METRICS
from .page import render
from .view import clean, view_from_run

REPORT = "report.html"
SWEEP_METRICS = (*METRICS, *CHARTED)
"""The sweep's own charts (``sweep_report``), as bar charts of the cells."""


def sweep_view(folder: Path) -> dict[str, Any]:
    """A sweep's summary.csv as the page's ``sweep`` view: the table, and per metric one grouped bar
    chart (x: grid cell, one bar per method, the mean over seeds)."""
    with open(folder / "summary.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        rows = list(reader)
    if "method" not in columns:
        raise ConfigError(f"{folder / 'summary.csv'}: no 'method' column (not a sweep summary?)")
    grid = columns[: columns.index("method")]
    def cell_of(r: dict[str, str]) -> str:
        return " · ".join(r[k] for k in grid) or "all"

    cells: list[str] = []
    for r in rows:
        cell = cell_of(r)
        if cell not in cells:
            cells.append(cell)
    charts: dict[str, Any] = {}
    for metric in SWEEP_METRICS:
        column = f"{metric}_mean"
        if column not in columns or not any(float(r[column] or 0) for r in rows):
            continue  # never measured, or zero everywhere (bytes of a run without a network)
        methods: dict[str, list[float | None]] = {}
        for r in rows:
            cell = cell_of(r)
            series = methods.setdefault(r["method"], [None] * len(cells))
            series[cells.index(cell)] = float(r[column]) if r[column] else None
        charts[metric] = {"cells": cells, "methods": methods, "axis": " · ".join(grid)}
    seeds = sum(int(r.get("n_seeds") or 0) + int(r.get("failed_seeds") or 0)
                for r in {", ".join(r[k] for k in grid): r for r in rows}.values())
    sweep_file = folder / "sweep.yaml"
    def shown(column: str, value: str) -> str:
        if value and column.endswith(("_mean", "_ci95")):
            return f"{float(value):.4g}"
        return value

    return {"sweep": {"name": folder.name, "columns": columns,
                      "rows": [[shown(c, r[c]) for c in columns] for r in rows],
                      "charts": charts, "runs": seeds, "description": f"{len(cells)} cell(s)" +
                      (f", from {sweep_file.name}" if sweep_file.is_file() else "")}}


def write_report(folder: Path) -> Path:
    """Write ``folder``/report.html for a run folder or a sweep folder; returns its path."""
    if not folder.is_dir():
        raise ConfigError(f"report: {folder} is not a folder")
    if (folder / "summary.csv").is_file():
        view = sweep_view(folder)
    elif (folder / "results.json").is_file() or (folder / "live.json").is_file():
        try:
            view = view_from_run(folder)
        except (ValueError, KeyError, TypeError) as err:  # json.JSONDecodeError is a ValueError
            raise ConfigError(f"report: {folder}: results.json is not a run's results ({err})") from err
    else:
        raise ConfigError(f"report: {folder} has neither results.json (a run) nor summary.csv (a sweep)")
    path = folder / REPORT
    path.write_text(render(clean(view), live=False), encoding="utf-8")
    return path
