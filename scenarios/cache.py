"""The stage cache: Stage 1's and Stage 2's results and the baselines' scores, reused across runs.

Each entry is keyed by a hash of exactly the settings it depends on (and ``CACHE_VERSION``, bumped
whenever what a stage computes changes), so a sweep over ``stage3.*``, ``eval.*``, ``channel.*``,
``network.*`` or ``partition.test_distribution`` trains Stage 1 once. Entries live in
``<root>/<stage>/<key>.safetensors`` beside ``<key>.json`` (the key's fields, the file's sha256 and
the stage's small results); one that is unreadable, does not match its sha256 or was made for other
settings is reported and recomputed, never used. Writes are atomic (a temporary file, renamed).

Stage 1 and 2 restore every client's full state, so they apply to in-process runs (the sweep's
default), where the learners are at hand; networked runs always compute.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from agents.inprocess import InProcessFleet
from agents.messages import Stage
from agents.strategy import RoundRecord, Strategy, records_from_data, records_to_data

from .schema import to_dict

log = logging.getLogger(__name__)

CACHE_VERSION = 3
"""Bump when what a cached stage computes changes (an old entry then no longer matches).
2: the centralized MoE keeps one optimizer for all its epochs; FedSC without an Rbar keeps the
full 1/2 ||R||^2 (issue 9's fidelity fixes)."""


def default_root() -> Path:
    """``$NMOE_CACHE``, else ``~/.cache/nmoe`` (like pip's cache: shared by runs and sweeps)."""
    env = os.environ.get("NMOE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "nmoe"


def _training_data(cfg: Mapping[str, Any]) -> dict[str, Any]:
    part = {k: v for k, v in cfg["partition"].items() if k not in ("test_per_client", "test_distribution")}
    return {"data": cfg["data"], "partition": part, "clients": cfg["clients"], "seed": cfg["seed"],
            "model": cfg["model"]}


def key_fields(stage: str, exp: Any) -> dict[str, Any]:
    """Exactly the settings ``stage``'s result depends on (as plain data)."""
    cfg = to_dict(exp)
    train = _training_data(cfg)
    stage1 = {**train, "stage1": cfg["stage1"], "aggregation": cfg["aggregation"],
              "privacy": cfg["privacy"] if cfg["stage1"]["method"] == "fedsc" else None}
    # the baselines train on Stage 1's budget (rounds x epochs, batch, optimizer, augmentation), not its method
    budget = {k: v for k, v in cfg["stage1"].items() if k not in ("method", "fedsc", "fedce")}
    fields: dict[str, dict[str, Any]] = {
        "stage1": stage1,
        "stage2": {**stage1, "stage2": cfg["stage2"]},
        # the baselines' trained models: scored again on the run's own test sets, so a sweep over
        # partition.test_distribution or eval.* does not train them again
        "local_models": {**train, "stage1": budget},
        "centralized_models": {**train, "stage1": budget,
                               "stage3": {k: cfg["stage3"][k] for k in ("train_top_k", "noise_std")}},
    }
    return {"stage": stage, "version": CACHE_VERSION, **fields[stage]}


def cache_key(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass
class StageCache:
    """Entries under ``root``; ``report`` says, per stage, what was loaded or computed and the key."""

    root: Path
    report: dict[str, dict[str, str]] = field(default_factory=dict)

    def _paths(self, stage: str, key: str) -> tuple[Path, Path]:
        folder = self.root / stage
        return folder / f"{key}.safetensors", folder / f"{key}.json"

    def load(self, stage: str, exp: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        fields = key_fields(stage, exp)
        key = cache_key(fields)
        tensors_path, meta_path = self._paths(stage, key)
        self.report[stage] = {"status": "computed", "key": key}
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if not isinstance(meta, dict) or meta.get("fields") != json.loads(json.dumps(fields, default=str)):
                raise ValueError("it was made for other settings")
            if meta.get("sha256") != _sha256(tensors_path):
                raise ValueError("its tensors do not match their sha256")
            tensors = load_file(str(tensors_path))
        except (OSError, ValueError, SafetensorError) as err:
            log.warning("stage cache: ignoring the %s entry %s (%s); recomputing", stage, key, err)
            self.report[stage] = {"status": "recomputed", "key": key, "why": str(err)[:200]}
            return None
        self.report[stage] = {"status": "loaded", "key": key}
        return tensors, meta["results"]

    def save(self, stage: str, exp: Any, tensors: Mapping[str, torch.Tensor], results: Mapping[str, Any]) -> None:
        fields = key_fields(stage, exp)
        key = cache_key(fields)
        tensors_path, meta_path = self._paths(stage, key)
        tensors_path.parent.mkdir(parents=True, exist_ok=True)
        flat = {k: v.detach().contiguous() for k, v in tensors.items()}
        _atomic_write(tensors_path, lambda tmp: save_file(flat, tmp))
        meta = {"fields": fields, "sha256": _sha256(tensors_path), "results": results}
        _atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, default=str)))


class CachedStages:
    """The ``StageStore`` of an in-process run: restores or saves Stage 1 and Stage 2 of the
    strategy and of every learner of ``fleet``."""

    def __init__(self, cache: StageCache, fleet: InProcessFleet) -> None:
        self.cache = cache
        self.fleet = fleet

    def restore(self, stage: Stage, strategy: Strategy) -> bool:
        name = stage.value
        hit = self.cache.load(name, strategy.exp)
        if hit is None:
            return False
        tensors, results = hit
        learners = self.fleet.learners
        if stage is Stage.STAGE1:
            strategy.global_stage1 = _prefixed(tensors, "global.")
            strategy.corrs = {int(j): t for j, t in _prefixed(tensors, "corr.").items()}
            strategy.samples = {int(i): n for i, n in results["samples"].items()}
            strategy.releases = {int(i): n for i, n in results["releases"].items()}
            strategy.summary.privacy = dict(results["privacy"])
            for i, learner in learners.items():
                learner.stage1.load_state_dict(_prefixed(tensors, f"client{i}."))
        elif stage is Stage.STAGE2:
            for i, learner in learners.items():
                learner.load_stage1(strategy.global_stage1)
                learner.restore_stage2(_prefixed(tensors, f"client{i}."))
            if results["classifier"]:
                strategy.summary.methods["fedavg"] = {
                    i: {"accuracy": s.accuracy, "f1_macro": s.f1_macro}
                    for i, s in ((i, learners[i].classifier_scores()) for i in sorted(learners))}
        else:
            raise ValueError(f"no cache for {name}")
        strategy.stage = stage
        strategy.summary.rounds.extend(records_from_data(results["rounds"]))
        return True

    def save(self, stage: Stage, strategy: Strategy, records: list[RoundRecord]) -> None:
        learners = self.fleet.learners
        if stage is Stage.STAGE1:
            tensors = {f"global.{k}": v for k, v in strategy.global_stage1.items()}
            tensors |= {f"corr.{j}": r for j, r in strategy.corrs.items()}
            for i, learner in learners.items():
                tensors |= {f"client{i}.{k}": v for k, v in learner.stage1.state_dict().items()}
            results: dict[str, Any] = {"samples": strategy.samples, "releases": strategy.releases,
                                       "privacy": strategy.summary.privacy}
        else:
            tensors = {f"client{i}.{k}": v for i, learner in learners.items()
                       for k, v in learner.expert.state_dict().items()}
            results = {"classifier": "fedavg" in strategy.summary.methods}
        results["rounds"] = records_to_data(records)
        self.cache.save(stage.value, strategy.exp, tensors, results)


def _prefixed(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def cached_models(cache: StageCache | None, name: str, exp: Any, models: Mapping[str, torch.nn.Module],
                  train: Any) -> None:
    """Fill ``models`` (freshly initialized, by name) from the cache's ``name`` entry, else ``train()``
    them (which trains them in place) and keep their states there."""
    hit = cache.load(name, exp) if cache is not None else None
    if hit is not None:
        for key, model in models.items():
            model.load_state_dict(_prefixed(hit[0], f"{key}."))
        return
    train()
    if cache is not None:
        tensors = {f"{key}.{k}": v for key, model in models.items() for k, v in model.state_dict().items()}
        cache.save(name, exp, tensors, {"rounds": []})
