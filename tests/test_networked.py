"""Networked runs over a real mosquitto: reproduction of the in-process run, a client killed mid-round,
JOIN that names who is missing, and a client rejoining a run in progress."""

from __future__ import annotations

import asyncio
import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import needs_mosquitto, quiet, toy_scenario
from safetensors.torch import load_file

from agents.bus import BusConfig, BusSession
from agents.client import ClientAgent
from agents.codec import Wire, decode_control, decode_reply, decode_task, encode_control, encode_task
from agents.config import NetworkConfig
from agents.coordinator import BusFleet, JoinFailed
from agents.messages import Bye, Hello, Refusal, Shutdown, Stage, Stage1Fit, Sync
from agents.strategy import Strategy
from broker.auth import make_accounts
from broker.server import launch_broker
from broker.topics import Kind
from scenarios.networked import add_channel_rejections, run_networked_scenario
from scenarios.runner import run_inprocess


def _wire(msg) -> Wire:
    return Wire(msg.kind, dict(msg.tensors), dict(msg.header.meta), msg.header.round, msg.header.stage)


def _losses(out: Path) -> list[tuple[str, str, str]]:
    with open(out / "metrics.csv") as fh:
        return [(r["stage"], r["round"], r["mean_loss"]) for r in csv.DictReader(fh) if r["mean_loss"]]


@needs_mosquitto
def test_networked_run_reproduces_the_inprocess_run(tmp_path):
    """Same seed, direct channel, one torch thread everywhere: the same numbers, to the last bit.

    Each client computes the same operations on the same float32 inputs (weights travel as exact
    float32 safetensors), and the coordinator reduces in client-id order, not arrival order.
    """
    scn = toy_scenario(tmp_path, ["privacy.reproducible_noise=true"])  # else DP noise is fresh randomness
    ref = run_inprocess(scn, tmp_path / "inprocess", quiet())
    net = run_networked_scenario(scn, tmp_path / "networked", quiet(), "subprocess")
    for i, m in ref["methods"]["nmoe"]["per_client"].items():
        got = net["methods"]["nmoe"]["per_client"][i]
        assert (got["accuracy"], got["f1_macro"]) == (m["accuracy"], m["f1_macro"])
    assert _losses(tmp_path / "inprocess") == _losses(tmp_path / "networked")
    a = load_file(tmp_path / "inprocess" / "checkpoint.safetensors")
    b = load_file(tmp_path / "networked" / "checkpoint.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    traffic = net["traffic"]
    assert traffic["broker"] == "mosquitto" and traffic["joined"] == ["client-0", "client-1", "client-2"]
    assert traffic["per_kind"]["update"]["messages"] >= 3 * 4  # 2 FedSC + 2 FedGate rounds, 3 clients
    assert traffic["per_kind"]["latent"]["bytes"] > 0
    assert sum(traffic["rejected"].values()) == 0
    assert sorted(p.name for p in (tmp_path / "networked" / "logs").iterdir()) == [
        "client-0.log", "client-1.log", "client-2.log"]


@needs_mosquitto
def test_a_run_completes_when_a_client_is_killed_mid_round(tmp_path):
    scn = toy_scenario(tmp_path, [
        # 8 local epochs: a round's local training takes far longer than the 0.05 s before the kill
        "stage1.method=fedce", "stage1.rounds=3", "stage1.local_epochs=8", "network.min_clients=2",
        "network.round_timeout_s=60", "network.inference_deadline_s=1",
        "network.faults=[{client: client-2, op: stage1_fit, round: 1, after_s: 0.05}]",
    ])
    results = run_networked_scenario(scn, tmp_path / "out", quiet(), "subprocess")
    with open(tmp_path / "out" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["answered"] == "3"
    round1 = next(r for r in rows if r["stage"] == "stage1" and r["round"] == "1")
    assert round1["answered"] == "2" and round1["failures"] in ("client-2:offline", "client-2:missing")
    assert all(r["answered"] == "2" for r in rows[rows.index(round1):])
    assert set(results["methods"]["nmoe"]["per_client"]) == {"0", "1"}
    assert results["traffic"]["faults_injected"][0]["client"] == "client-2"
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["methods"]["nmoe"]["fallback_rate"] == 0.0  # client-2's expert is not routed to at all


@needs_mosquitto
async def test_join_times_out_naming_the_missing_clients():
    net = NetworkConfig(join_timeout_s=1.0, min_clients=2)
    accounts = make_accounts(["client-0", "client-1"])
    async with launch_broker("jt", accounts, prefer="mosquitto") as broker:
        cfg = BusConfig("jt", "coordinator", broker.address_for("coordinator"))
        async with BusSession(cfg, watch_status=True) as bus, BusFleet(bus, 2, net) as fleet:
            expected = (r"2 of 2 clients did not join within 1s: client-0 \(never connected\), "
                        r"client-1 \(never connected\); min_clients is 2")
            with pytest.raises(JoinFailed, match=expected):
                await fleet.join()


@needs_mosquitto
async def test_a_client_saying_hello_mid_run_gets_the_current_state(tmp_path):
    scn = toy_scenario(tmp_path, ["clients=2"])
    accounts = make_accounts(["client-0", "client-1"])
    async with launch_broker("rj", accounts, prefer="mosquitto") as broker:
        coord = BusConfig("rj", "coordinator", broker.address_for("coordinator"))
        client = BusConfig("rj", "client-1", broker.address_for("client-1"))
        strategy = Strategy(scn)
        strategy.stage = Stage.STAGE2  # the run is past Stage 1
        async with BusSession(coord, watch_status=True) as bus, \
                BusFleet(bus, 2, scn.network, sync=strategy.sync_task) as fleet, BusSession(client) as agent:
            hello = encode_control(Hello(96, 0.5))
            await agent.send("coordinator", hello.kind, meta=hello.meta)
            msg = await agent.receive(timeout=10)
    _, sync = decode_task(_wire(msg))
    assert msg.kind is Kind.MODEL and isinstance(sync, Sync) and sync.stage == 2
    assert set(sync.state) == set(strategy.global_stage1)
    assert fleet.members.joined == {1: 96}


@needs_mosquitto
async def test_repeated_hellos_cost_one_sync_per_change_of_the_clients_state(tmp_path):
    """Twenty hellos from one client used to make the coordinator send twenty syncs (about 6,000x
    amplification); now a hello earns a sync only for a new session, and not too often."""
    scn = toy_scenario(tmp_path, ["clients=2"])
    accounts = make_accounts(["client-0", "client-1"])
    async with launch_broker("amp", accounts, prefer="mosquitto") as broker:
        coord = BusConfig("amp", "coordinator", broker.address_for("coordinator"))
        client = BusConfig("amp", "client-1", broker.address_for("client-1"))
        strategy = Strategy(scn)
        strategy.stage = Stage.STAGE2
        async with BusSession(coord, watch_status=True) as bus, \
                BusFleet(bus, 2, scn.network, sync=strategy.sync_task) as fleet, BusSession(client) as agent:
            fleet.members.sync_interval_s = 0.5
            hello = encode_control(Hello(96, 0.5, session=0))
            for _ in range(20):
                await agent.send("coordinator", hello.kind, meta=hello.meta)
            first = await agent.receive(timeout=10)
            with pytest.raises(asyncio.TimeoutError):
                await agent.receive(timeout=1.0)  # nothing more for the 19 repeats
            assert bus.stats.rejected["hello_repeat"] == 19
            again = encode_control(Hello(96, 0.5, session=1))  # it reconnected: one more sync
            await agent.send("coordinator", again.kind, meta=again.meta)
            second = await agent.receive(timeout=10)
            await agent.send("coordinator", encode_control(Hello(96, 0.5, session=2)).kind,
                             meta=encode_control(Hello(96, 0.5, session=2)).meta)  # too soon after the last
            with pytest.raises(asyncio.TimeoutError):
                await agent.receive(timeout=0.3)
            assert bus.stats.rejected["hello_rate_limited"] == 1
            assert bus.stats.sent_messages["model"] == 2
    assert isinstance(decode_task(_wire(first))[1], Sync) and isinstance(decode_task(_wire(second))[1], Sync)


@needs_mosquitto
def test_a_scenario_on_a_lossy_channel_completes_with_failures_recorded(tmp_path):
    """client-2's radio loses 20% of packets and never retransmits: its large messages (weights,
    latents) are lost, the rounds close at their deadline without it, and the channel says why."""
    scn = toy_scenario(tmp_path, [
        "stage1.method=fedce", "network.min_clients=2", "network.join_timeout_s=8", "network.round_timeout_s=8",
        "network.stage2_timeout_s=20", "network.eval_timeout_s=20", "network.inference_deadline_s=0.5",
        "channel.model=emulated", "channel.preset=wifi", "channel.time_scale=0.5",
        "channel.clients={client-2: {loss: bernoulli, loss_p: 0.2, max_retries: 0}}",
    ])
    results = run_networked_scenario(scn, tmp_path / "out", quiet(), "subprocess")
    fits = [r for r in results["rounds"] if r["op"] == "stage1_fit"]
    assert all(r["answered"] == ["client-0", "client-1"] for r in fits)
    # its hello may be lost too (20% per packet): then it never joined and was not waited for
    assert all(r["failures"].get("client-2") in ("missing", "late", "offline", "never joined") for r in fits)
    links = results["traffic"]["channel"]["links"]
    assert sum(v["dropped"].get("loss", 0) for k, v in links.items() if "client-2" in k) > 0
    assert links["coordinator->client-0"]["dropped"] == {}
    assert links["client-0->coordinator"]["latency_p50_s"] > 0  # modeled wifi latency
    assert set(results["methods"]["nmoe"]["per_client"]) >= {"0", "1"}


def test_a_networked_run_on_the_embedded_amqtt_broker(tmp_path):
    """Where mosquitto is not installed the run falls back to amqtt; the method is unchanged."""
    scn = toy_scenario(tmp_path, ["stage1.method=fedce", "stage1.rounds=1", "stage3.rounds=1"])
    ref = run_inprocess(scn, tmp_path / "inprocess", quiet())
    net = run_networked_scenario(scn, tmp_path / "out", quiet(), "inprocess", broker_kind="amqtt")
    assert net["traffic"]["broker"] == "amqtt"
    for i, m in ref["methods"]["nmoe"]["per_client"].items():
        assert net["methods"]["nmoe"]["per_client"][i]["accuracy"] == m["accuracy"]


@needs_mosquitto
async def test_a_client_answers_a_malformed_task_with_an_error_and_keeps_working(tmp_path):
    scn = toy_scenario(tmp_path, ["clients=1", "stage1.method=fedce"])
    accounts = make_accounts(["client-0"])
    async with launch_broker("bad", accounts, prefer="mosquitto") as broker:
        agent = ClientAgent(scn, scn.network, 0, BusConfig("bad", "client-0", broker.address_for("client-0")))
        coord = BusConfig("bad", "coordinator", broker.address_for("coordinator"))
        async with BusSession(coord) as bus:
            running = asyncio.create_task(agent.run())
            hello = await bus.receive(timeout=30)
            assert isinstance(decode_control(_wire(hello)), Hello)
            wrong = {"features.conv1.weight": torch.zeros((3, 3))}  # the real one is (16, 1, 3, 3)
            task = encode_task(Stage1Fit(0, wrong), "t-wrong")
            await bus.send("client-0", task.kind, task.tensors, round=0, meta=task.meta)
            task_id, error = decode_reply(_wire(await bus.receive(timeout=30)))
            assert task_id == "t-wrong" and isinstance(error, Refusal) and "has shape (3, 3)" in error.reason
            await bus.send("client-0", Kind.CTRL, meta={"op": "no-such-op", "task": "t-odd"})  # dropped, counted
            end = encode_control(Shutdown())
            await bus.send("client-0", end.kind, meta=end.meta)
            bye = decode_control(_wire(await bus.receive(timeout=30)))
            await asyncio.wait_for(running, 30)
    assert isinstance(bye, Bye) and bye.counters["rejected"]["unknown_op"] == 1


def test_the_channel_emulators_rejections_count_with_the_agents():
    rejected = {"bad_header": 2}
    add_channel_rejections(rejected, {"rejected": {"bad_magic": 3, "unknown_agent": 1}, "links": {}})
    add_channel_rejections(rejected, {"links": {}})  # an emulator that refused nothing
    assert rejected == {"bad_header": 2, "channel.bad_magic": 3, "channel.unknown_agent": 1}
