"""A networked run: broker, coordinator and client agents talking over MQTT.

``nmoe run SCENARIO`` starts a broker (mosquitto, else embedded amqtt, or uses ``--broker``), the
channel emulator when the scenario emulates one (``channel_process``), the client agents
(``agent_groups``: subprocesses, tasks, or boards started by hand), and runs the coordinator in
this process. Everything it starts is entered on one ``AsyncExitStack`` and so stopped, by its
own PID, in reverse order on success, on failure and on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress

from agents.bus import BusSession, BusStats
from agents.codec import COORDINATOR, client_index, client_name
from agents.coordinator import BusFleet
from agents.messages import Bye, Stage, Task
from agents.strategy import RunSummary, Strategy
from broker.auth import Account, BrokerAddress, ChannelMode, accounts_with_passwords, make_accounts, read_accounts_file
from broker.server import Prefer, launch_broker
from nmoe.errors import ConfigError, NmoeError
from nmoe_models.data import load_dataset
from nmoe_models.partition import load_client_data

from . import baseline_worker
from .agent_groups import AgentGroup, AgentsMode, ExternalAgents, agents_running, make_group
from .agent_host import AgentHost
from .baseline_worker import BaselineWorker
from .bus_sizing import bus_config
from .cache import StageCache
from .channel_process import ChannelProcess, channel_running
from .dashboard.live import LiveRun, Observers
from .dashboard.server import serving
from .devices import device_report, print_devices
from .runner import (
    Checkpoint,
    ProgressObserver,
    make_progress,
    resume_strategy,
    run_baselines,
    set_threads,
    stage1_classifier,
    write_scenario,
)
from .scenario import Scenario
from .schema import to_dict

log = logging.getLogger(__name__)

__all__ = ["AgentsMode", "bus_config", "run_networked", "run_networked_scenario", "traffic_per_kind"]


class AgentsFailed(NmoeError):
    """Client agent processes exited before the run ended."""


@dataclass
class Faults:
    """The scenario's injected faults: a timer per fault, armed when its task goes out."""

    scn: Scenario
    group: AgentGroup
    event: Callable[[str], None]
    injected: list[dict[str, Any]] = field(default_factory=list)
    timers: list[asyncio.TimerHandle] = field(default_factory=list)

    def on_task(self, task: Task) -> None:
        for fault in self.scn.network.faults:
            if fault.op is task.op and fault.round == task.round:
                self.timers.append(asyncio.get_running_loop().call_later(
                    fault.after_s * self.scn.channel.time_scale, self._kill, fault.client))
                self.injected.append(to_dict(fault))

    def _kill(self, agent: str) -> None:
        self.event(f"fault injection: killing {agent}")
        self.group.kill(agent)

    def cancel(self) -> None:
        for timer in self.timers:
            timer.cancel()


async def _watch(fleet: BusFleet, group: AgentGroup, channel: ChannelProcess | None, progress: Progress,
                 started: float) -> None:
    """Keep the 'bus' line of the display current; fail fast when agents die before JOIN is over,
    or when the channel emulator dies (every message would be lost from then on)."""
    task = progress.add_task("bus", total=None, info="")
    while True:
        if channel is not None:
            channel.check()
        online = len([a for a in fleet.bus.online() if client_index(a) is not None])
        s = fleet.bus.stats
        moved = (sum(s.sent_bytes.values()) + sum(s.received_bytes.values())) / 1e6
        progress.update(task, info=f"{online}/{len(fleet.clients)} clients online, "
                                   f"{moved:.1f} MB through the coordinator, {time.perf_counter() - started:.0f}s")
        if not fleet.members.join_over and (failed := group.failed()):
            first = next(iter(failed))
            raise AgentsFailed(f"{len(failed)} agent(s) exited with an error before joining ({', '.join(failed)}); "
                               f"the last lines of {first}'s log:\n{group.log_tail(first)}")
        await asyncio.sleep(0.5)


async def _coordinate(strategy: Strategy, fleet: BusFleet, watcher: asyncio.Task[None], until: Stage,
                      joined: Callable[[], object] | None) -> None:
    """JOIN, then ``joined()``, then every stage (up to ``until``), until done or the watcher
    fails; the fleet keeps serving rejoins."""
    async def work() -> None:
        await fleet.join()
        if joined is not None:
            joined()
        await strategy.run(fleet, until=until)

    job = asyncio.create_task(work())
    try:
        done, _ = await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (job, watcher):
            t.cancel()
        await asyncio.gather(job, watcher, return_exceptions=True)
    for t in done:
        t.result()  # re-raise a failure of either


async def run_networked(scn: Scenario, out_dir: Path, console: Console, mode: AgentsMode = "subprocess",
                        broker_url: str | None = None, listen: str = "127.0.0.1",
                        broker_kind: Prefer = "auto", broker_accounts: Path | None = None,
                        resume: Checkpoint | None = None, dashboard: int | None = None,
                        live: LiveRun | None = None, dashboard_token: bool | None = None,
                        host: AgentHost | None = None, joined: Callable[[], object] | None = None,
                        ) -> tuple[RunSummary, dict[str, Any]]:
    """Run the method over the bus; returns the Strategy's summary and the traffic report.

    ``live`` (made here when not given) follows the run for the dashboard and ``live.json``;
    ``dashboard`` is the port to serve the dashboard on (on ``listen``; 0: a free one; None: none);
    it needs a token off loopback, or as ``dashboard_token`` says. ``joined`` is called once the
    fleet has joined, before round 0 (on the event loop: it must not block).

    With an external broker, every agent logs in as itself (username = agent id) with its password
    from ``broker_accounts`` (``--broker-accounts FILE``), or else all with the URL's one password."""
    run_id = scn.name
    ids = [client_name(i) for i in range(scn.clients)]
    accounts: list[Account] = make_accounts(ids)
    external = BrokerAddress.parse(broker_url) if broker_url else None
    if external is not None and broker_accounts is not None:  # the broker's operator made one per agent
        accounts = accounts_with_passwords(accounts, read_accounts_file(broker_accounts), str(broker_accounts))
    elif external is not None:  # one shared password: the ACL then cannot tell agents apart
        if external.password is None:
            raise ConfigError(f"--broker {external.redacted()}: no password (see cli.check_external_broker)")
        accounts = [Account(a.username, external.password, a.role) for a in accounts]
    scenario_file = write_scenario(scn, out_dir / "scenario.yaml")
    channel_mode: ChannelMode = "emulated" if scn.channel.model == "emulated" else "direct"
    started = time.perf_counter()
    timeline = {"started_at": time.time()}
    strategy = Strategy(scn, None, scn.network.min_clients)
    resume_strategy(strategy, resume, console)
    channel: ChannelProcess | None = None
    live = live or LiveRun(to_dict(scn), mode, out_dir, lambda: channel.live_stats() if channel is not None else None)
    async with contextlib.AsyncExitStack() as stack:
        if dashboard is not None:  # first: a port in use fails the run before anything starts
            served = await stack.enter_async_context(serving(live, listen, dashboard,
                                                                      require_token=dashboard_token))
            console.print(f"dashboard: {served.login_url}" + ("  (the token is for you only: it is on no page)"
                                                             if served.token else ""), highlight=False)
        broker = await stack.enter_async_context(launch_broker(
            run_id, accounts, channel_mode=channel_mode, prefer=broker_kind, external=external, host=listen,
            tls=scn.network.tls))
        timeline["broker_ready_at"] = time.time()
        console.print(f"broker: {broker.kind} on {broker.host}:{broker.port}; agents: {mode}")
        group = make_group(mode, scn, run_id, broker, scenario_file, out_dir, host)
        if isinstance(group, ExternalAgents):
            console.print(f"waiting for {scn.clients} agents; their command lines (with passwords) are in "
                          f"{group.instructions}")
        channel = await stack.enter_async_context(channel_running(scn, run_id, broker, ids, out_dir))
        coord = external if external is not None and broker_accounts is None else broker.address_for(COORDINATOR)
        bus = await stack.enter_async_context(BusSession(bus_config(scn, run_id, COORDINATOR, coord),
                                                         watch_status=True))
        progress = stack.enter_context(make_progress(console))
        strategy.obs = Observers(ProgressObserver(progress, out_dir), live)

        def event(text: str) -> None:
            progress.console.print(f"[yellow]{text}[/yellow]")
            live.event(text)

        def on_task(task: Task) -> None:
            faults.on_task(task)
            live.on_task(task)

        faults = Faults(scn, group, event)
        fleet = await stack.enter_async_context(BusFleet(bus, scn.clients, scn.network, scn.channel.time_scale,
                                                         sync=strategy.sync_task, on_event=event,
                                                         on_task=on_task))
        await stack.enter_async_context(agents_running(group))
        watcher = asyncio.create_task(_watch(fleet, group, channel, progress, started))
        follower = asyncio.create_task(live.follow(fleet, strategy))
        ok = False
        try:
            await _coordinate(strategy, fleet, watcher, Stage(scn.until), joined)
            ok = True
        finally:
            faults.cancel()
            if follower.done() and (err := follower.exception()) is not None:  # it never ends by itself
                log.error("the live view stopped following the run", exc_info=err)
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
            await live.close(fleet, strategy, ok)
            await fleet.shutdown(timeout=10.0 if ok else 2.0)  # agents started by hand hear of a failure too
        per_kind, rejected = traffic_per_kind(bus.stats, fleet.telemetry.byes)
        traffic: dict[str, Any] = {
            "broker": broker.kind,
            "agents": mode,
            "coordinator": bus.stats.as_dict(),
            "clients": {client_name(i): s for i, s in fleet.telemetry.client_stats().items()},
            "late_answers": [{"op": a.op.value, "round": a.round, "client": client_name(a.client),
                              "after_s": round(a.after_s, 3)} for a in fleet.late],
            "timeline": {**timeline, **fleet.telemetry.timeline,
                         "max_data_s": max(fleet.members.data_seconds.values(), default=0.0)},
            "faults_injected": faults.injected,
            "per_kind": per_kind,
            "rejected": rejected,
            "joined": sorted(client_name(i) for i in fleet.members.joined),
        }
        devices = device_report(scn, fleet.telemetry.usage)
    traffic["channel"] = channel.stats if channel is not None else None  # filled in when it stopped
    if devices is not None:
        traffic["devices"] = devices
    if channel is not None:
        add_channel_rejections(traffic["rejected"], channel.stats)
    return strategy.summary, traffic


def run_networked_scenario(scn: Scenario, out_dir: Path, console: Console, mode: AgentsMode = "subprocess",
                           broker_url: str | None = None, listen: str = "127.0.0.1",
                           broker_kind: Prefer = "auto", broker_accounts: Path | None = None,
                           resume: Checkpoint | None = None, dashboard: int | None = None, *,
                           dashboard_token: bool | None = None,
                           cache: StageCache | None = None, host: AgentHost | None = None) -> dict[str, Any]:
    """A networked run, then the baselines in this process. The federated stages are always
    computed over the bus; the baselines' trained models (none of them networked) come from
    ``cache`` when it holds them for these settings, as in an in-process run (results.json says).
    ``host``: an agent host the caller forked earlier (``nmoe run`` does, so that the host's own
    imports overlap the run's), else one is forked here; either way it is closed here."""
    from .report import build_results, print_summary, warm_pyplot, write_outputs

    started = time.perf_counter()
    workers: list[BaselineWorker] = []
    # first, while this process is still single-threaded: agents are then forked from a copy of it
    if host is None:
        host = AgentHost.fork_for(mode)
    try:
        # the baselines need nothing from the bus: a copy of this process trains them meanwhile
        if baseline_worker.enabled(scn):
            workers = [BaselineWorker.fork(scn, cache, group) for group in baseline_worker.groups(scn)]
        # The coordinator's tensor work is many small operations (checking and screening each reply's
        # ~140 tensors, averaging): with torch's thread pool on two busy cores each costs ten times
        # more than in one thread (measured 40 vs 4.6 ms to check one ResNet20 update) and it runs on
        # the event loop. Elementwise arithmetic is bit-identical either way. Baselines trained in
        # this process (no worker) get scn.threads again below.
        torch.set_num_threads(1)
        # the baselines train on every client's data: check it is here before hours of training
        datas = {i: load_client_data(scn, i) for i in range(scn.clients)} if scn.baselines else {}
        if mode != "external":  # once here, so agents on this machine map the files it decompressed
            load_dataset(scn.data, scn.seed)
        summary, traffic = asyncio.run(run_networked(scn, out_dir, console, mode, broker_url, listen, broker_kind,
                                                     broker_accounts, resume, dashboard,
                                                     dashboard_token=dashboard_token, host=host,
                                                     # the charts' import, in a thread, once the agents
                                                     # have joined: it overlaps their first round, not
                                                     # the start-up, where it held the GIL for 0.5 s
                                                     joined=warm_pyplot))
    except BaseException:
        for worker in workers:
            worker.close()
        raise
    finally:
        if host is not None:
            host.close()
    set_threads(scn.threads)
    extra: dict[str, Any] = {}
    with make_progress(console) as progress:
        clock = time.perf_counter()
        classifier = stage1_classifier(scn, summary)
        baselines: dict[str, Any] = {}
        if workers:
            baselines, waited = baseline_worker.collect(workers, progress)
            extra["baseline_worker"] = {"baselines": [b for w in workers for b in w.baselines], "waited_s": waited,
                                        "workers": len(workers)}
        rest = tuple(b for b in scn.baselines if b not in baselines)
        if rest:  # no worker, or the FedAvg baseline the run turned out to need after all
            baselines |= run_baselines(dataclasses.replace(scn, baselines=rest), datas, progress, classifier, cache)
        summary.stage_seconds["baselines"] = time.perf_counter() - clock
    devices = traffic.pop("devices", None)
    extra |= {"traffic": traffic} | ({"devices": devices} if devices is not None else {})
    if cache is not None and cache.report:
        extra["cache"] = {"root": str(cache.root), "stages": dict(cache.report)}
        for stage, entry in cache.report.items():
            if entry["status"] != "computed":
                console.print(f"{stage}: {entry['status']} from the stage cache ({entry['key']})", highlight=False)
    results = build_results(scn, "networked", summary, baselines, extra, time.perf_counter() - started)
    paths = write_outputs(out_dir, results, summary.rounds)
    print_summary(console, results)
    if devices is not None:
        print_devices(console, devices)
    console.print("outputs: " + ", ".join(str(p) for p in paths))
    return results


def add_channel_rejections(rejected: dict[str, int], channel_stats: Mapping[str, Any]) -> None:
    """What the emulator refused to relay counts with the agents' rejections, as ``channel.<reason>``."""
    for reason, n in channel_stats.get("rejected", {}).items():
        rejected[f"channel.{reason}"] = rejected.get(f"channel.{reason}", 0) + int(n)


def traffic_per_kind(coordinator: BusStats, byes: Mapping[int, Bye]) -> tuple[dict[str, dict[str, int]],
                                                                             dict[str, int]]:
    """Bytes and messages per kind over every agent (each message counted once, by its sender), and
    rejected messages per reason (the coordinator's and every client's)."""
    per_kind: dict[str, dict[str, int]] = {}
    rejected: Counter[str] = Counter(coordinator.rejected)

    def add(sent_messages: Mapping[str, int], sent_bytes: Mapping[str, int]) -> None:
        for kind, n in sent_messages.items():
            per_kind.setdefault(kind, {"messages": 0, "bytes": 0})["messages"] += int(n)
        for kind, n in sent_bytes.items():
            per_kind.setdefault(kind, {"messages": 0, "bytes": 0})["bytes"] += int(n)

    add(coordinator.sent_messages, coordinator.sent_bytes)
    for bye in byes.values():
        add(bye.counters.get("sent_messages", {}), bye.counters.get("sent_bytes", {}))
        rejected.update(bye.counters.get("rejected", {}))
    return per_kind, dict(rejected)
