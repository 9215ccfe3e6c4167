"""`nmoe sweep FILE`: a grid of scenario settings x seeds, each an ordinary run folder, resumable.

A sweep file names a base scenario, a ``grid`` of ``key.path: [values]``, optional fixed ``set``
overrides and ``seeds``. Every grid cell x seed becomes a run folder ``<out>/<cell>/seed-<s>/``
holding what ``nmoe run --inprocess`` writes (results.json first of all) plus ``cell.json``. The
whole file is validated before any work; running it again skips the runs whose results.json is
complete and was produced by the same settings, and retries the others (a failed run leaves
``error.txt``; it never stops the others). The summary is drawn from the folders on disk
(``scenarios.sweep_report``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import multiprocessing
import re
import time
import traceback
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from nmoe.errors import ConfigError, NmoeError, check

from .scenario import Scenario, read_yaml, resolve_path
from .schema import apply_overrides, build, set_path, to_dict

SWEEP_KEYS = ("base", "name", "description", "grid", "set", "seeds")
# how a run was executed or labelled, not what it computed: a sweep file renamed (or run under
# another name, one seed at a time) still finds its finished runs
UNCOMPARED = ("threads", "name", "description")


@dataclass(frozen=True)
class Run:
    """One grid cell with one seed: a complete scenario and the folder it runs in."""

    cell: str
    """The cell's folder name (its grid values, made safe for a file name)."""
    values: Mapping[str, Any]
    """Grid key path -> value of this cell."""
    seed: int
    data: Mapping[str, Any]
    """The scenario as raw YAML data, base + set + cell values + seed (what a worker loads)."""
    folder: Path


@dataclass(frozen=True)
class Sweep:
    name: str
    description: str
    base: Path
    grid: Mapping[str, Sequence[Any]]
    seeds: tuple[int, ...]
    runs: tuple[Run, ...]
    out: Path


@dataclass(frozen=True)
class Outcome:
    run: Run
    ok: bool
    seconds: float
    error: str = ""


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'stage1': {'rounds': 2}} -> {'stage1.rounds': 2}: `set:` may be written either way."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out |= flatten(value, f"{path}.")
        else:
            out[path] = value
    return out


def show(value: Any) -> str:
    """A grid value as folder names, summary.csv, the table and the charts show it."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def cell_name(values: Mapping[str, Any]) -> str:
    """A readable, file-safe folder name for a cell: 'partition.tau=0.5,stage1.method=fedsc'."""
    label = ",".join(f"{k}={show(v)}" for k, v in values.items())
    safe = re.sub(r"[^A-Za-z0-9._=,+-]", "_", label)
    if safe == label and len(safe) <= 120:
        return safe
    digest = hashlib.blake2b(label.encode(), digest_size=4).hexdigest()
    return f"{safe[:110]}-{digest}"


def _base_path(spec: Any, sweep_file: Path) -> Path:
    check(isinstance(spec, str) and bool(spec), "base", "must name a scenario: a shipped name or a YAML path")
    beside = sweep_file.parent / spec
    return beside if beside.is_file() else resolve_path(spec)


def load_sweep(path: str | Path, out: str | None = None, overrides: Sequence[str] = (), threads: int = 0) -> Sweep:
    """Read and validate a sweep file: every cell x seed must load as a valid scenario.

    ``overrides`` (``key.path=value``, from --set) apply to every run; ``threads`` (torch threads
    per job) replaces the base scenario's unless the sweep's grid, ``set`` or --set names it.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"sweep file not found: {file}")
    raw = read_yaml(file)
    try:
        return _parse(file, raw, out, overrides, threads)
    except ConfigError as err:
        raise ConfigError(f"{file}: {err}") from err


def _parse(file: Path, raw: dict[str, Any], out: str | None, overrides: Sequence[str], threads: int) -> Sweep:
    unknown = [k for k in raw if k not in SWEEP_KEYS]
    check(not unknown, str(unknown[0]) if unknown else "", f"unknown key; allowed keys: {', '.join(SWEEP_KEYS)}")
    check("base" in raw, "base", "missing: name the base scenario (a shipped name or a YAML path)")
    base = _base_path(raw["base"], file)
    name = raw.get("name", file.stem)
    check(isinstance(name, str) and bool(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name)), "name",
          f"must be 1-64 letters, digits, '_' or '-' (got {name!r})")
    grid = raw.get("grid")
    check(isinstance(grid, dict) and bool(grid), "grid",
          "empty or missing: give at least one `key.path: [values]`, e.g. partition.tau: [0.9, 0.5]")
    assert isinstance(grid, dict)
    for key, values in grid.items():
        check(isinstance(values, list) and bool(values), f"grid.{key}", f"must be a non-empty list (got {values!r})")
        check(len({show(v) for v in values}) == len(values), f"grid.{key}",
              f"has duplicates (values that read the same, like 1 and '1', would share a folder): {values!r}")
    fixed = raw.get("set") or {}
    check(isinstance(fixed, dict), "set", f"must be a mapping of key.path: value (got {fixed!r})")
    base_data = read_yaml(base)
    for key, value in flatten(fixed).items():
        set_path(base_data, key, value, f"set.{key}")
    base_data = apply_overrides(base_data, list(overrides))  # --set, exactly as `nmoe run` reads it
    seeds = raw.get("seeds", [base_data.get("seed", 0)])
    check(isinstance(seeds, list) and bool(seeds) and all(type(s) is int and s >= 0 for s in seeds), "seeds",
          f"must be a non-empty list of integers >= 0 (got {seeds!r})")
    check(len(set(seeds)) == len(seeds), "seeds", "has duplicates")
    # the base's own threads would oversubscribe the cores with several jobs; the sweep's own stand
    explicit_threads = "threads" in grid or "threads" in flatten(fixed) or any(
        o.split("=", 1)[0].strip() == "threads" for o in overrides)
    base_data["name"] = name
    folder = Path(out) if out else Path("sweeps") / name
    runs = []
    # seed by seed: a sweep cut short has run every cell once before any cell's second seed
    for seed, combo in ((s, c) for s in seeds for c in itertools.product(*grid.values())):
        values = dict(zip(grid, combo, strict=True))
        cell = cell_name(values)
        data = json.loads(json.dumps(base_data))  # a deep copy of plain YAML data
        for key, value in values.items():
            set_path(data, key, value, f"grid.{key}")
        data["seed"] = seed
        if threads and not explicit_threads:
            data["threads"] = threads
        try:
            build(Scenario, data)
        except ConfigError as err:
            raise ConfigError(f"grid cell {cell}, seed {seed}: {err}") from err
        runs.append(Run(cell, values, seed, data, folder / cell / f"seed-{seed}"))
    return Sweep(name, str(raw.get("description", "")), base, grid, tuple(seeds), tuple(runs), folder)


def finished(run: Run) -> bool:
    """results.json is there, complete, and was computed from this very scenario (threads aside)."""
    path = run.folder / "results.json"
    if not path.is_file():
        return False
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False  # a run killed while writing it: run again
    if not isinstance(saved, dict):
        return False
    expected = comparable(to_dict(build(Scenario, run.data)))
    defaults = comparable(to_dict(build(Scenario, {"name": "defaults"})))
    return with_new_defaults(comparable(saved.get("config")), defaults) == expected


def comparable(config: Any) -> Any:
    if not isinstance(config, dict):
        return config
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in UNCOMPARED}, sort_keys=True))


def with_new_defaults(saved: Any, defaults: Any) -> Any:
    """``saved`` with every field it lacks taken from ``defaults``: a setting added to the schema after a
    run was made cannot have changed that run, as long as its default keeps the earlier behaviour (the
    rule for new fields). A run made with a value other than the default still differs."""
    if not isinstance(saved, dict) or not isinstance(defaults, dict):
        return saved
    return {**defaults, **{k: with_new_defaults(v, defaults.get(k)) for k, v in saved.items()}}


def execute(run: Run, networked: bool = False, cache_root: str | None = None) -> Outcome:
    """Run one cell x seed into its folder. Whatever the run raises is recorded there as data
    (error.txt with the traceback) and returned, so that one failed run never stops the sweep."""
    from .runner import run_inprocess

    run.folder.mkdir(parents=True, exist_ok=True)
    (run.folder / "error.txt").unlink(missing_ok=True)
    (run.folder / "cell.json").write_text(json.dumps({"cell": run.cell, "values": run.values, "seed": run.seed},
                                                     indent=2))
    started = time.perf_counter()
    with open(run.folder / "log.txt", "w") as log:
        console = Console(file=log, width=120)
        try:
            scn = build(Scenario, run.data)
            if networked:
                from .networked import run_networked_scenario

                run_networked_scenario(scn, run.folder, console, "subprocess")
            else:
                from .cache import StageCache

                run_inprocess(scn, run.folder, console, StageCache(Path(cache_root)) if cache_root else None)
        except Exception as err:  # noqa: BLE001 - recorded in error.txt and the summary, never dropped
            (run.folder / "error.txt").write_text(traceback.format_exc())
            (run.folder / "results.json").unlink(missing_ok=True)
            return Outcome(run, False, time.perf_counter() - started, f"{type(err).__name__}: {err}")
    return Outcome(run, True, time.perf_counter() - started)


def run_sweep(sweep: Sweep, console: Console, jobs: int = 1, networked: bool = False,
              cache_root: str | None = None) -> list[Outcome]:
    """Run every unfinished run (``jobs`` at a time, in worker processes when more than one); in-process
    runs share the stage cache under ``cache_root`` (None: no cache)."""
    todo = [r for r in sweep.runs if not finished(r)]
    done = len(sweep.runs) - len(todo)
    if done:
        console.print(f"skipping {done} finished run(s) of {len(sweep.runs)} (results.json present, same settings)")
    retry = sum((r.folder / "error.txt").is_file() for r in todo)
    if retry:
        console.print(f"retrying {retry} run(s) that failed before")
    outcomes: list[Outcome] = []
    if not todo:
        return outcomes
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(f"sweep {sweep.name}", total=len(todo), info="")

        def finish(outcome: Outcome) -> None:
            outcomes.append(outcome)
            r = outcome.run
            state = "ok" if outcome.ok else f"[red]failed: {outcome.error[:80]}[/red]"
            progress.update(bar, advance=1, info=f"{r.cell} seed {r.seed}: {state}")
            if not console.is_terminal:
                console.print(f"{r.cell} seed {r.seed}: {state} ({outcome.seconds:.1f}s)", highlight=False)

        if jobs <= 1:
            for r in todo:
                finish(execute(r, networked, cache_root))
        else:
            ctx = multiprocessing.get_context("spawn")  # no forked torch thread pools
            with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
                futures: list[Future[Outcome]] = [pool.submit(execute, r, networked, cache_root) for r in todo]
                try:
                    for future in as_completed(futures):
                        finish(future.result())
                except BrokenProcessPool as err:
                    raise NmoeError("a sweep worker process died (out of memory?); the runs that finished are "
                                    "kept: run the sweep again to resume") from err
    return outcomes
