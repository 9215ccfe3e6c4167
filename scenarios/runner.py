"""Running a scenario: progress while it runs, outputs and a table when it ends."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from agents.inprocess import InProcessFleet
from agents.messages import Op, Stage
from agents.strategy import RoundRecord, RunSummary, Strategy
from nmoe.errors import ConfigError
from nmoe_models.baselines import (
    new_centralized,
    new_local_model,
    score_centralized,
    score_local,
    train_centralized,
    train_local,
)
from nmoe_models.config import FedCEConfig
from nmoe_models.learner import ClientLearner
from nmoe_models.partition import ClientData, load_client_data, load_union

from .cache import CachedStages, StageCache, cached_models
from .devices import devices_of
from .report import PerClient, build_results, print_summary, write_outputs
from .scenario import Scenario
from .schema import to_dict


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads or available_cpus())


def write_scenario(scn: Scenario, path: Path) -> Path:
    """The resolved scenario (overrides applied), which subprocess agents load."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(to_dict(scn), sort_keys=False))
    return path


def output_dir(scn: Scenario, out: str | None) -> Path:
    if out:
        return Path(out)
    return Path("runs") / scn.name / datetime.now().strftime("%Y%m%d-%H%M%S")


def make_progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)


@dataclass(frozen=True)
class Checkpoint:
    """The coordinator's latest checkpoint of a run folder (``checkpoint.safetensors``)."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]

    @classmethod
    def load(cls, run_dir: Path) -> Checkpoint:
        path = run_dir / "checkpoint.safetensors"
        if not path.is_file():
            raise ConfigError(f"--resume {run_dir}: no checkpoint.safetensors there (a run writes one after each "
                              f"round; this one stopped before its first)")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = dict(fh.metadata() or {})
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as err:
            raise ConfigError(f"--resume {run_dir}: checkpoint.safetensors is not readable ({err})") from err
        missing = {"stage", "round", "samples", "releases", "rounds"} - meta.keys()
        if missing:
            raise ConfigError(f"--resume {run_dir}: the checkpoint lacks {sorted(missing)} (written by an older nmoe?)")
        return cls(tensors, meta)


def resume_strategy(strategy: Strategy, checkpoint: Checkpoint | None, console: Console) -> None:
    if checkpoint is not None:
        where = strategy.resume(checkpoint.tensors, checkpoint.meta)
        console.print(f"resuming from the checkpoint after {checkpoint.meta['stage']} round "
                      f"{checkpoint.meta['round']}: going on at {where}")


ROUND_ENDS = frozenset({Op.STAGE1_FIT, Op.STAGE2_FIT, Op.STAGE3_FIT, Op.EVALUATE})  # a round's last step


class ProgressObserver:
    """Shows stages and rounds as they finish; keeps the coordinator's latest checkpoint on disk."""

    def __init__(self, progress: Progress, out_dir: Path | None, label: str = "") -> None:
        self.progress = progress
        self.out_dir = out_dir
        self.label = label
        self.tasks: dict[str, TaskID] = {}

    def on_stage(self, stage: str, rounds: int) -> None:
        self.tasks[stage] = self.progress.add_task(f"{self.label}{stage}", total=max(rounds, 1), info="")

    def on_round(self, record: RoundRecord) -> None:
        task = self.tasks.get(record.stage)
        if task is None:
            return
        info = f"{len(record.answered)} answered"
        if record.failures:
            info += f", [red]{len(record.failures)} failed[/red]"
        if record.loss == record.loss:  # not NaN
            info += f", loss {record.loss:.4f}"
        curve = record.op is Op.EVALUATE and record.stage != Stage.EVAL.value  # eval.every_round's, inside a round
        self.progress.update(task, advance=1 if record.op in ROUND_ENDS and not curve else 0, info=info)
        if not self.progress.console.is_terminal:  # a log file gets one line per step instead of bars
            self.progress.console.print(f"{self.label}{record.stage} round {record.round} {record.op.value}: {info} "
                                        f"({record.seconds:.1f}s)", markup=True, highlight=False)

    def on_checkpoint(self, stage: str, round_index: int, tensors: Mapping[str, torch.Tensor],
                      meta: Mapping[str, str]) -> None:
        if self.out_dir is None:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.out_dir / "checkpoint.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=dict(meta))
        tmp.replace(self.out_dir / "checkpoint.safetensors")  # atomic: never a half-written checkpoint


def load_all(scn: Scenario, progress: Progress) -> dict[int, ClientData]:
    task = progress.add_task("loading client data", total=scn.clients, info="")
    datas = {}
    for i in range(scn.clients):
        datas[i] = load_client_data(scn, i)
        progress.advance(task)
    return datas


def run_baselines(scn: Scenario, datas: Mapping[int, ClientData], progress: Progress,
                  classifier: PerClient | None, cache: StageCache | None = None) -> dict[str, PerClient]:
    """The reference methods, always trained in this process (none of them is federated but FedAvg);
    their trained models (the FedAvg baseline's Stage 1 and 2) come from ``cache`` when it has them
    for these settings, and are scored on this run's test sets."""
    out: dict[str, PerClient] = {}
    if "local" in scn.baselines:
        out["local"] = _local(scn, datas, progress, cache)
    if "fedavg" in scn.baselines and classifier is None:
        out["fedavg"] = _fedavg(scn, datas, progress, cache)
    if "centralized" in scn.baselines:
        out["centralized"] = _centralized(scn, datas, progress, cache)
    return out


def stage1_is_fedavg(scn: Scenario) -> bool:
    """Whether this run's Stage 1 classifier is the FedAvg baseline (FedCE sharing the whole model),
    so that the baseline needs no training of its own."""
    return scn.stage1.method == "fedce" and scn.stage1.fedce.share == "all"


def stage1_classifier(scn: Scenario, summary: RunSummary) -> PerClient | None:
    """The Stage 1 classifier's scores when they are the FedAvg baseline's (FedCE sharing the
    whole model). FedCE with ``stage1.fedce.share: extractor`` ends with personal heads: its
    scores move to ``fedce_personal`` and the FedAvg baseline, when asked for, is trained apart."""
    scores = summary.methods.get("fedavg")
    if scores is None or stage1_is_fedavg(scn):
        return scores
    summary.methods["fedce_personal"] = summary.methods.pop("fedavg")
    return None


def _local(scn: Scenario, datas: Mapping[int, ClientData], progress: Progress,
           cache: StageCache | None) -> PerClient:
    models = {f"client{i}": new_local_model(scn, d) for i, d in datas.items()}

    def train() -> None:
        task = progress.add_task("baseline: local classifiers", total=scn.clients, info="")
        for i, data in datas.items():
            models[f"client{i}"].load_state_dict(train_local(scn, data).state_dict())
            progress.advance(task)

    cached_models(cache, "local_models", scn, models, train)
    local = {}
    for i, data in datas.items():
        s = score_local(scn, models[f"client{i}"], data)
        local[i] = {"accuracy": s.accuracy, "f1_macro": s.f1_macro}
    return local


def fedavg_scenario(scn: Scenario) -> Scenario:
    """The FedAvg baseline's own scenario: whole-model FedCE with the run's budget (so its Stage 1
    is the very one, cached or not, of a FedCE run of the same settings)."""
    return dataclasses.replace(scn, stage1=dataclasses.replace(scn.stage1, method="fedce", fedce=FedCEConfig()))


def _fedavg(scn: Scenario, datas: Mapping[int, ClientData], progress: Progress,
            cache: StageCache | None) -> PerClient:
    """Whole-model FedCE's Stage 1 and its classifier's scores: from the stage cache when a FedCE run
    of the same settings (or an earlier FedAvg baseline) left them there."""
    fedce = fedavg_scenario(scn)
    learners = {i: ClientLearner(fedce, d) for i, d in datas.items()}
    strategy = Strategy(fedce, ProgressObserver(progress, None, "baseline: FedAvg classifier "))
    fleet = InProcessFleet(learners)
    own = StageCache(cache.root) if cache is not None else None  # its own report: the run's stages are others
    summary = asyncio.run(strategy.run(fleet, CachedStages(own, fleet) if own is not None else None,
                                       until=Stage.STAGE2))
    if cache is not None and own is not None:
        cache.report |= {f"fedavg.{stage}": entry for stage, entry in own.report.items()}
    return summary.methods["fedavg"]


def _centralized(scn: Scenario, datas: Mapping[int, ClientData], progress: Progress,
                 cache: StageCache | None) -> PerClient:
    union = load_union(scn)
    model = new_centralized(scn, union.image_shape[0], union.num_classes)

    def train() -> None:
        epochs = max(1, scn.stage1.rounds * scn.stage1.local_epochs)
        task = progress.add_task("baseline: centralized MoE", total=epochs, info="epochs")
        trained, _ = train_centralized(scn, union, lambda done, total: progress.update(task, completed=done))
        model.load_state_dict(trained.state_dict())

    cached_models(cache, "centralized_models", scn, {"moe": model}, train)
    scores = score_centralized(scn, model, datas)
    return {i: {"accuracy": s.accuracy, "f1_macro": s.f1_macro} for i, s in scores.items()}


def run_inprocess(scn: Scenario, out_dir: Path, console: Console, cache: StageCache | None = None,
                  resume: Checkpoint | None = None) -> dict[str, Any]:
    """The whole method and its baselines in this process; Stage 1, Stage 2 and the baselines come
    from ``cache`` when it holds them for these settings (results.json says what was loaded)."""
    set_threads(scn.threads)
    started = time.perf_counter()
    write_scenario(scn, out_dir / "scenario.yaml")  # the resolved settings, for --resume
    if scn.devices.enabled:  # the device model lives in the client agents (agents/compute.py)
        console.print("[yellow]devices: modeled in networked runs only; this in-process run computes at this "
                      "host's speed and reports no energy"
                      + (" (the learning curve's clock counts the devices' modeled compute)" if scn.eval.every_round
                         else "") + "[/yellow]")
    with make_progress(console) as progress:
        datas = load_all(scn, progress)
        learners = {i: ClientLearner(scn, d) for i, d in datas.items()}
        strategy = Strategy(scn, ProgressObserver(progress, out_dir))
        resume_strategy(strategy, resume, progress.console)
        # the curve's modeled clock: the devices' compute for the FLOPs run (counting them costs a little)
        fleet = InProcessFleet(learners, (devices_of(scn) or {}) if scn.eval.every_round else None)
        store = CachedStages(cache, fleet) if cache is not None and resume is None else None
        summary = asyncio.run(strategy.run(fleet, store, until=Stage(scn.until)))
        clock = time.perf_counter()
        baselines = run_baselines(scn, datas, progress, stage1_classifier(scn, summary), cache)
        summary.stage_seconds["baselines"] = time.perf_counter() - clock
    extra = {"cache": {"root": str(cache.root), "stages": dict(cache.report)}} if cache is not None else {}
    results = build_results(scn, "inprocess", summary, baselines, extra, time.perf_counter() - started)
    for stage, entry in (cache.report if cache is not None else {}).items():
        if entry["status"] != "computed":
            console.print(f"{stage}: {entry['status']} from the stage cache ({entry['key']})"
                          + (f": {entry['why']}" if "why" in entry else ""), highlight=False)
    paths = write_outputs(out_dir, results, summary.rounds)
    print_summary(console, results)
    console.print("outputs: " + ", ".join(str(p) for p in paths))
    return results

