"""A scenario's devices as the agents and the report need them: who runs on what, and what it cost.

``agent_extras`` is what a client agent gets besides the scenario (its device, its radio energy
model, the latency predictor of deadline-aware routing); ``device_report`` turns the usage the
clients sent with their replies into results.json's ``devices`` section; ``print_devices`` is the
run's energy table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from agents.codec import client_name
from agents.devices import Device, assign
from agents.energy import RADIO_OF_PRESET, RadioModel
from agents.messages import Usage
from agents.routing import LatencyPredictor, Peer
from broker.channel.presets import resolve_profile
from nmoe_models.data import dataset_info

from .scenario import Scenario

KEEPS_UP_SHARE = 0.05
"""The host keeps up when its lag behind the devices' clock is at most this share of their compute time."""


@dataclass(frozen=True)
class AgentExtras:
    device: Device | None
    radio: RadioModel | None
    predictor: LatencyPredictor | None


def devices_of(scn: Scenario) -> dict[int, Device] | None:
    return assign(scn.devices, scn.clients, scn.seed)


def radio_of(scn: Scenario, i: int) -> RadioModel | None:
    if scn.channel.model != "emulated":
        return None
    own = scn.channel.clients.get(client_name(i))
    preset = own.preset if own is not None and own.preset else scn.channel.preset
    return RadioModel(RADIO_OF_PRESET[preset], resolve_profile(scn.channel, client_name(i)))


def agent_extras(scn: Scenario, i: int) -> AgentExtras:
    devices = devices_of(scn)
    device = devices.get(i) if devices is not None else None
    predictor = None
    if scn.eval.routing == "deadline":
        emulated = scn.channel.model == "emulated"
        peers = {j: Peer(resolve_profile(scn.channel, client_name(j)) if emulated else None,
                         devices[j].profile if devices is not None and j in devices else None)
                 for j in range(scn.clients)}
        predictor = LatencyPredictor(i, peers, scn.model.latent_dim, scn.model.head_hidden,
                                     dataset_info(scn.data.name).classes, scn.network.inference_deadline_s)
    return AgentExtras(device, radio_of(scn, i) if device is not None else None, predictor)


def device_report(scn: Scenario, usage: Mapping[str, tuple[str, int, Mapping[int, Usage], Mapping[int, str]]],
                  ) -> dict[str, Any] | None:
    """results.json's ``devices`` section from the usage the clients reported, task by task.

    ``usage``: task id -> (op, round, client -> usage, client -> failure) in the order the tasks went
    out. The host keeps up when no task's compute returned later than the modeled clock allowed.
    """
    devices = devices_of(scn)
    if devices is None:
        return None
    ts = scn.channel.time_scale
    per_client: dict[str, dict[str, Any]] = {
        client_name(i): {"device": d.name, "train_gflops": d.profile.train_gflops,
                         "infer_gflops": d.profile.infer_gflops, "active_w": d.profile.active_w,
                         "idle_w": d.profile.idle_w, "tasks": 0, "in_time": 0, "too_slow": 0, "flops": 0.0,
                         "compute_s": 0.0, "host_s": 0.0, "lag_s": 0.0, "max_lag_s": 0.0, "compute_j": 0.0,
                         "radio_j": 0.0, "tx_bytes": 0, "rx_bytes": 0}
        for i, d in sorted(devices.items())}
    tasks = []
    for op, rnd, by_client, failures in usage.values():
        row: dict[str, Any] = {"op": op, "round": rnd, "clients": {}}
        for i, u in sorted(by_client.items()):
            name = client_name(i)
            c = per_client.get(name)
            if c is None:
                continue
            c["tasks"] += 1
            c["too_slow"] += int(u.too_slow)
            c["in_time"] += int(not u.too_slow and i not in failures)
            for k in ("flops", "compute_s", "host_s", "lag_s", "compute_j", "radio_j", "tx_bytes", "rx_bytes"):
                c[k] += getattr(u, k)
            c["max_lag_s"] = max(c["max_lag_s"], u.lag_s)
            row["clients"][name] = {"compute_s": round(u.compute_s, 4), "host_s": round(u.host_s, 4),
                                    "lag_s": round(u.lag_s, 4), "compute_j": round(u.compute_j, 4),
                                    "radio_j": round(u.radio_j, 4), "tx_bytes": u.tx_bytes, "rx_bytes": u.rx_bytes,
                                    "status": "too slow" if u.too_slow else failures.get(i, "answered")}
        tasks.append(row)
    for c in per_client.values():
        c["energy_j"] = c["compute_j"] + c["radio_j"]
        c["never_in_time"] = c["tasks"] > 0 and c["in_time"] == 0 and c["too_slow"] > 0
    lags = [(c["max_lag_s"], name) for name, c in per_client.items()]
    worst, who = max(lags, default=(0.0, ""))
    compute = sum(c["compute_s"] for c in per_client.values())
    lag = sum(c["lag_s"] for c in per_client.values())
    share = lag / compute if compute > 0 else 0.0
    host = {"time_scale": ts, "keeps_up": share <= KEEPS_UP_SHARE, "max_lag_s": worst, "worst_client": who,
            "lag_share": share}
    if not host["keeps_up"]:
        host["advice"] = (f"this host fell up to {worst:.2f} modeled s behind the devices' clock (at {who}); "
                          f"the lag was {100 * host['lag_share']:.0f}% of the modeled compute time: raise "
                          f"channel.time_scale (now {ts:g}) or use fewer clients per core")
    totals = {k: sum(c[k] for c in per_client.values()) for k in ("compute_j", "radio_j", "energy_j", "flops")}
    return {"clients": per_client, "tasks": tasks, "host": host, "totals": totals,
            "too_slow": sorted(n for n, c in per_client.items() if c["never_in_time"])}


def print_devices(console: Console, report: Mapping[str, Any]) -> None:
    table = Table(title="devices: modeled compute and energy per client (whole run)")
    for col in ("client", "device", "tasks", "in time", "too slow", "compute s", "host lag s", "compute J",
                "radio J", "total J"):
        table.add_column(col, justify="left" if col in ("client", "device") else "right")
    for name, c in report["clients"].items():
        style = "red" if c["never_in_time"] else None
        table.add_row(name, c["device"], str(c["tasks"]), str(c["in_time"]), str(c["too_slow"]),
                      f"{c['compute_s']:.1f}", f"{c['lag_s']:.1f}", f"{c['compute_j']:.1f}", f"{c['radio_j']:.2f}",
                      f"{c['energy_j']:.1f}", style=style)
    t = report["totals"]
    table.add_row("total", "", "", "", "", "", "", f"{t['compute_j']:.1f}", f"{t['radio_j']:.2f}",
                  f"{t['energy_j']:.1f}", style="bold")
    console.print(table)
    if report["too_slow"]:
        console.print(f"[red]too slow for every deadline: {', '.join(report['too_slow'])}[/red]")
    host = report["host"]
    if not host["keeps_up"]:
        console.print(f"[yellow]{host['advice']}[/yellow]")
    elif math.isfinite(host["max_lag_s"]):
        console.print(f"this host kept up with the modeled clock at time_scale {host['time_scale']:g} "
                      f"(largest lag {host['max_lag_s']:.3f} s)")
