"""What the dashboard shows, as one plain JSON-ready dict (the *view*), built the same way for a run
going on (``scenarios.dashboard.live``) and for a finished one (``view_from_run``).

The view's keys (the page's JavaScript reads exactly these; a key may be missing or empty):

- ``run``: name, mode, clients, status (``running``/``done``/``failed``), channel (model, preset,
  time_scale), updated_at (unix seconds);
- ``fleet``: client id -> online (bool or null), link, device, last (its last answer or failure in
  words), failures (count);
- ``round``: the step in progress: stage, op, round, targets, answered, failures, deadline_s and
  elapsed_s (modeled seconds when the channel is emulated: ``modeled`` says which);
- ``rounds``: every finished step (stage, round, op, answered, failed, loss, seconds);
- ``methods``: method -> label, accuracy, accuracy_std, f1_macro (when evaluated);
- ``traffic``: per_kind (kind -> messages, bytes), scope (whose traffic per_kind counts), links
  ("src->dst" -> delivered, bytes, latency_p50_s, latency_p95_s, dropped), rejected (reason -> n);
- ``inference``: clients, experts, matrix (rows: requesting client, columns: expert, routed share),
  per_client (local_share, fallback_rate, latency_p50_ms, latency_p95_ms, accuracy);
- ``privacy``: epsilon, delta, releases, noise_multiplier (FedSC with DP);
- ``events``: the latest notable events (t: unix seconds, text).

Nothing secret is ever put in it: no URL, password, token or config section beyond the ones named.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

MAX_EVENTS = 200
NMOE_METHOD = "nmoe"


def link_and_device(config: Mapping[str, Any], client: str) -> tuple[str | None, str | None]:
    """A client's link preset and device profile from the resolved scenario (as ``to_dict`` gives it).

    Read leniently: fields that later versions add (a per-client ``device``, a scenario-wide
    ``devices`` map or ``device``) are shown when present and ignored when not."""
    channel = config.get("channel") or {}
    link: Any
    if channel.get("model") != "emulated":
        link = "direct"
    else:
        own = (channel.get("clients") or {}).get(client) or {}
        link = own.get("preset") or channel.get("preset")
    device = None
    for source in ((channel.get("clients") or {}).get(client) or {}, (config.get("devices") or {}).get(client)
                   or {}, channel, config):
        if isinstance(source, Mapping) and isinstance(source.get("device"), str):
            device = source["device"]
            break
    return (str(link) if link is not None else None), device


def clean(obj: Any) -> Any:
    """NaN and infinities as null (the view is strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def routing(per_client: Mapping[str, Mapping[str, float]], clients: int) -> dict[str, Any]:
    """The routing matrix and per-client inference figures from the NMoE evaluation's metrics
    (``routed.<j>`` keys, see ``agents.protocol.routing_shares``)."""
    rows = sorted(per_client, key=int)
    experts = list(range(clients))
    matrix = [[float(per_client[i].get(f"routed.{j}", 0.0)) for j in experts] for i in rows]
    keys = ("accuracy", "local_share", "fallback_rate", "latency_p50_ms", "latency_p95_ms", "bytes_per_sample")
    return {
        "clients": [f"client-{i}" for i in rows],
        "experts": [f"client-{j}" for j in experts],
        "matrix": matrix,
        "has_matrix": any(k.startswith("routed.") for m in per_client.values() for k in m),
        "per_client": {f"client-{i}": {k: per_client[i][k] for k in keys if k in per_client[i]} for i in rows},
    }


def methods_view(methods: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    keys = ("label", "accuracy", "accuracy_std", "f1_macro", "f1_macro_std", "fallback_rate", "local_share")
    return {m: {k: r[k] for k in keys if k in r} for m, r in methods.items()}


def round_rows(rounds: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{"stage": r["stage"], "round": r["round"], "op": r["op"], "answered": len(r["answered"]),
             "failed": len(r["failures"]), "failures": dict(r["failures"]), "loss": r.get("loss"),
             "seconds": r.get("seconds")} for r in rounds]


def fleet_from_rounds(config: Mapping[str, Any], clients: int, rounds: Iterable[Mapping[str, Any]],
                      joined: Iterable[str] | None = None) -> dict[str, dict[str, Any]]:
    """Each client's last answer (or failure) and failure count, from the round records."""
    fleet: dict[str, dict[str, Any]] = {}
    for i in range(clients):
        name = f"client-{i}"
        link, device = link_and_device(config, name)
        fleet[name] = {"online": None, "link": link, "device": device, "last": "", "failures": 0}
    for r in rounds:
        where = f"{r['stage']} round {r['round']} ({r['op']})"
        for name in r["answered"]:
            if name in fleet:
                fleet[name]["last"] = f"answered {where}"
        for name, why in r["failures"].items():
            if name in fleet:
                fleet[name]["last"] = f"{why} in {where}"
                fleet[name]["failures"] += 1
    if joined is not None:
        for name in fleet:
            fleet[name]["joined"] = name in set(joined)
    return fleet


def channel_links(channel_stats: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    if not channel_stats:
        return {}
    keep = ("delivered", "bytes", "latency_p50_s", "latency_p95_s", "dropped", "retransmissions")
    return {name: {k: s.get(k) for k in keep} for name, s in sorted((channel_stats.get("links") or {}).items())}


def view_from_results(results: Mapping[str, Any], channel_stats: Mapping[str, Any] | None = None,
                      events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The view of a finished run, from its results.json (and the channel's per-link stats)."""
    config = results.get("config") or {}
    clients = int(config.get("clients") or 0)
    channel = config.get("channel") or {}
    traffic = results.get("traffic") or {}
    rounds = round_rows(results.get("rounds") or [])
    methods = results.get("methods") or {}
    nmoe = methods.get(NMOE_METHOD) or {}
    rejected = dict(traffic.get("rejected") or {})
    return clean({
        "run": {"name": results.get("scenario"), "mode": results.get("mode"), "clients": clients, "status": "done",
                "wall_s": results.get("wall_s"),
                "channel": {k: channel.get(k) for k in ("model", "preset", "time_scale")}},
        "fleet": fleet_from_rounds(config, clients, results.get("rounds") or [], traffic.get("joined")),
        "round": None,
        "rounds": rounds,
        "methods": methods_view(methods),
        "traffic": {"per_kind": traffic.get("per_kind") or {}, "scope": "every agent (as each sender counted)",
                    "links": channel_links(channel_stats or traffic.get("channel")), "rejected": rejected},
        "inference": routing(nmoe.get("per_client") or {}, clients),
        "privacy": results.get("privacy") or {},
        "events": (events or [])[-MAX_EVENTS:],
    })


def view_from_run(run_dir: Path) -> dict[str, Any]:
    """The view of a run folder: its results.json when it finished, else the live view it keeps
    (``live.json``) while it runs."""
    results_file, live_file = run_dir / "results.json", run_dir / "live.json"
    events: list[dict[str, Any]] = []
    if live_file.is_file():
        live = json.loads(live_file.read_text())
        if not results_file.is_file():
            return dict(live)
        events = list(live.get("events") or [])
    results = json.loads(results_file.read_text())
    stats_file = run_dir / "channel_stats.json"
    stats = json.loads(stats_file.read_text()) if stats_file.is_file() else None
    return view_from_results(results, stats, events)
