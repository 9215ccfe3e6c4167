"""The view of a run going on, kept current from what the coordinator already knows.

``LiveRun`` is told of stages and rounds as the strategy finishes them (it is a strategy
``Observer``; ``Observers`` fans one strategy out to several), of tasks as the fleet sends them and
of the fleet's events; every ``poll_s`` it reads the rest (who is online, the open step's answers,
the coordinator's traffic counters, the channel emulator's per-link stats, the privacy spent) and,
when anything changed, bumps ``version``, wakes the waiters (the dashboard's event streams) and
writes ``live.json`` into the run folder (so ``nmoe dashboard RUN_DIR`` can attach to a run
started without ``--dashboard``). Reading is all it does: the run never waits on it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from agents.codec import client_name
from agents.coordinator import BusFleet
from agents.messages import Task
from agents.strategy import Observer, RoundRecord, Strategy
from nmoe_models.privacy import epsilon

from .view import MAX_EVENTS, NMOE_METHOD, channel_links, clean, link_and_device, methods_view, routing

log = logging.getLogger(__name__)


class Observers:
    """Several strategy observers as one (the progress display, the live view)."""

    def __init__(self, *observers: Observer) -> None:
        self.observers = observers

    def on_stage(self, stage: str, rounds: int) -> None:
        for o in self.observers:
            o.on_stage(stage, rounds)

    def on_round(self, record: RoundRecord) -> None:
        for o in self.observers:
            o.on_round(record)

    def on_checkpoint(self, stage: str, round_index: int, tensors: Mapping[str, torch.Tensor],
                      meta: Mapping[str, str]) -> None:
        for o in self.observers:
            o.on_checkpoint(stage, round_index, tensors, meta)


class LiveRun:
    """See the module docstring. ``config`` is the resolved scenario as ``to_dict`` gives it."""

    def __init__(self, config: Mapping[str, Any], mode: str, out_dir: Path | None,
                 channel_stats: Callable[[], Mapping[str, Any] | None] = lambda: None) -> None:
        self.config = config
        self.clients = [client_name(i) for i in range(int(config["clients"]))]
        channel = config.get("channel") or {}
        self.modeled = channel.get("model") == "emulated"
        self.time_scale = float(channel.get("time_scale") or 1.0) if self.modeled else 1.0
        self.out_dir = out_dir
        self.channel_stats = channel_stats
        self.version = 0
        self._changed = asyncio.Event()  # set (and replaced) at every change
        self.status = "running"
        self.stage = ""
        self.rounds: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.last: dict[str, str] = {}
        self.failures: dict[str, int] = dict.fromkeys(self.clients, 0)
        self.sent_at: dict[tuple[str, int], float] = {}  # (op, round) -> time.monotonic() the task went out
        self._epsilon: tuple[int, float] | None = None
        self._view: dict[str, Any] = {}
        self._text = ""
        self.header = {"name": config.get("name"), "mode": mode, "clients": len(self.clients),
                       "channel": {k: channel.get(k) for k in ("model", "preset", "time_scale")}}
        self.update()  # a view from the start: the page has something to draw before the first poll

    # -- told by the strategy and the fleet ----------------------------------------------------------
    def on_stage(self, stage: str, rounds: int) -> None:
        self.stage = stage
        self.event(f"{stage}: {rounds} round(s)")

    def on_round(self, record: RoundRecord) -> None:
        where = f"{record.stage} round {record.round} ({record.op.value})"
        for i in record.answered:
            self.last[client_name(i)] = f"answered {where}"
        for i, why in record.failures.items():
            self.last[client_name(i)] = f"{why} in {where}"
            self.failures[client_name(i)] = self.failures.get(client_name(i), 0) + 1
            self.event(f"{client_name(i)}: {why} in {where}")
        self.rounds.append({"stage": record.stage, "round": record.round, "op": record.op.value,
                            "answered": len(record.answered), "failed": len(record.failures),
                            "failures": {client_name(i): why for i, why in record.failures.items()},
                            "loss": record.loss, "seconds": record.seconds})

    def on_checkpoint(self, stage: str, round_index: int, tensors: Mapping[str, torch.Tensor],
                      meta: Mapping[str, str]) -> None:
        pass

    def on_task(self, task: Task) -> None:
        self.sent_at.setdefault((task.op.value, task.round), time.monotonic())

    def event(self, text: str) -> None:
        self.events.append({"t": time.time(), "text": text})
        del self.events[:-MAX_EVENTS]

    def finish(self, ok: bool) -> None:
        self.status = "done" if ok else "failed"

    # -- read every poll_s ---------------------------------------------------------------------------
    def view(self, fleet: BusFleet | None = None, strategy: Strategy | None = None) -> dict[str, Any]:
        """The view now (``fleet`` and ``strategy`` when there are, for what only they know)."""
        status = fleet.bus.status() if fleet is not None else {}
        joined = {client_name(i) for i in fleet.members.joined} if fleet is not None else set()
        fleet_view = {}
        for name in self.clients:
            link, device = link_and_device(self.config, name)
            state = status.get(name)
            fleet_view[name] = {"online": None if state is None else state == "online", "link": link,
                                "device": device, "joined": name in joined,
                                "last": self.last.get(name, ""), "failures": self.failures.get(name, 0)}
        open_round = self._open_round(fleet)
        if open_round is not None:  # answers to the step in progress count as soon as they arrive
            where = f"{open_round['stage']} round {open_round['round']} ({open_round['op']})"
            for name in open_round["answered"]:
                fleet_view[name]["last"] = f"answered {where}"
        view: dict[str, Any] = {
            "run": {**self.header, "status": self.status, "stage": self.stage},
            "fleet": fleet_view,
            "round": open_round,
            "rounds": self.rounds,
            "events": self.events,
        }
        if fleet is not None:
            s = fleet.bus.stats
            kinds = sorted(set(s.sent_messages) | set(s.received_messages))
            per_kind = {k: {"messages": s.sent_messages[k] + s.received_messages[k],
                            "bytes": s.sent_bytes[k] + s.received_bytes[k]} for k in kinds}
            view["traffic"] = {"per_kind": per_kind, "scope": "through the coordinator (sent and received)",
                               "links": channel_links(self.channel_stats()), "rejected": dict(s.rejected)}
        if strategy is not None:
            methods = strategy.summary.methods
            view["methods"] = methods_view({m: _mean(per) for m, per in methods.items()})
            if NMOE_METHOD in methods:
                view["inference"] = routing({str(i): m for i, m in methods[NMOE_METHOD].items()}, len(self.clients))
            view["privacy"] = self._privacy(strategy)
        return clean(view)

    def _open_round(self, fleet: BusFleet | None) -> dict[str, Any] | None:
        if fleet is None or not fleet.book.open:
            return None
        collector = next(reversed(fleet.book.open.values()))
        step = collector.step
        sent = self.sent_at.get((step.op.value, step.round))
        elapsed = (time.monotonic() - sent) / self.time_scale if sent is not None else 0.0
        return {"stage": self.stage if step.op.stage.value in self.stage else step.op.stage.value,
                "op": step.op.value, "round": step.round, "targets": sorted(client_name(i) for i in collector.targets),
                "answered": sorted(client_name(i) for i in collector.replies),
                "failures": {client_name(i): why for i, why in collector.failures.items()},
                "deadline_s": fleet.deadline(step.op) / fleet.time_scale, "elapsed_s": elapsed,
                "modeled": self.modeled}

    def _privacy(self, strategy: Strategy) -> dict[str, Any]:
        exp = strategy.exp
        if exp.stage1.method != "fedsc" or not exp.privacy.enabled or not strategy.releases:
            return {}
        worst = max(strategy.releases.values())
        if self._epsilon is None or self._epsilon[0] != worst:  # the accountant is worth caching
            self._epsilon = (worst, epsilon(exp.privacy.noise_multiplier, worst, exp.privacy.delta))
        return {"epsilon": self._epsilon[1], "delta": exp.privacy.delta, "releases": worst,
                "noise_multiplier": exp.privacy.noise_multiplier}

    def update(self, fleet: BusFleet | None = None, strategy: Strategy | None = None) -> bool:
        """Recompute the view; True (and waiters woken, live.json written) when it changed."""
        view = self.view(fleet, strategy)
        text = json.dumps(view, sort_keys=True, allow_nan=False)
        if text == self._text:
            return False
        self._view, self._text = view, text
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()
        if self.out_dir is not None:
            write_atomic(self.out_dir / "live.json", text)
        return True

    async def wait_change(self, version: int, timeout: float) -> None:
        if version != self.version:
            return
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except asyncio.TimeoutError:
            return

    def current(self) -> tuple[int, dict[str, Any]]:
        return self.version, {**self._view, "run": {**self._view.get("run", {}), "updated_at": time.time()}}

    async def follow(self, fleet: BusFleet, strategy: Strategy, poll_s: float = 1.0) -> None:
        """Keep the view current until cancelled; a failure to read costs one poll, never the run."""
        while True:
            try:
                self.update(fleet, strategy)
            except (OSError, ValueError, KeyError, RuntimeError) as err:
                log.warning("the live view could not be updated: %s", err, exc_info=True)
            await asyncio.sleep(poll_s)

    async def close(self, fleet: BusFleet | None, strategy: Strategy | None, ok: bool) -> None:
        """The last view of the run, and a wake-up for every waiter."""
        self.finish(ok)
        try:
            self.update(fleet, strategy)
        except OSError as err:  # the run's own outputs matter more than the view's file
            log.warning("the live view could not be written: %s", err)


def _mean(per_client: Mapping[int, Mapping[str, float]]) -> dict[str, Any]:
    keys = ("accuracy", "f1_macro", "fallback_rate", "local_share")
    out: dict[str, Any] = {}
    for k in keys:
        vals = [m[k] for m in per_client.values() if k in m and math.isfinite(m[k])]
        if vals:
            out[k] = sum(vals) / len(vals)
    return out


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

