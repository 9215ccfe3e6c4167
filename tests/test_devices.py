"""Edge devices: validation, the fleet's assignment, modeled compute time, energy, deadline-aware routing."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import pytest
import torch
from conftest import needs_mosquitto, quiet, toy_scenario

from agents.codec import (
    decode_expert_answer,
    decode_usage,
    encode_expert_decline,
    encode_expert_query,
    encode_usage,
    query_deadline,
)
from agents.compute import ComputeMeter, TooSlow, counted
from agents.devices import PRESETS, Device, DeviceOverrides, DeviceProfile, DevicesConfig, assign, mix_counts
from agents.energy import RadioModel, mean_rate_bps
from agents.messages import Op, Usage
from agents.protocol import deadline_plan
from agents.routing import LatencyPredictor, Peer
from broker.channel.config import LinkParams, RadioProfile
from broker.channel.presets import EDGE_POOR, LTE, WIFI
from nmoe.errors import ConfigError, ProtocolError
from nmoe_models.learner import ClientLearner
from nmoe_models.partition import load_client_data
from nmoe_models.routing import plan
from scenarios.sweep_report import run_figures

DEVICE_TOY = """
name: toydev
seed: 3
clients: 3
threads: 1
data: {name: synthetic, synthetic_train: 2000}
partition: {kind: noniid, tau: 0.5, train_per_client: 96, test_per_client: 48}
model: {head_hidden: 16, gate_hidden: 8}
stage1: {method: fedce, rounds: 1, batch_size: 32}
stage2: {epochs: 2}
stage3: {rounds: 1, local_epochs: 1}
baselines: []
network: {join_timeout_s: 90, round_timeout_s: 20, stage2_timeout_s: 20, eval_timeout_s: 30,
          inference_deadline_s: 2, agent_threads: 1, min_clients: 1}
channel: {model: emulated, preset: wifi, time_scale: 1.0}
"""


# -- validation -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("overrides", "message"), [
    (["devices.preset=toaster"], "devices.preset: 'toaster' is not allowed; choose one of 'server'"),
    (["devices.mix={raspberry-pi-4: 0.5, laptop: 0.4}"], "devices.mix: shares must sum to 1 \\(got 0.9\\)"),
    (["devices.mix={toaster: 1.0}"], "devices.mix.toaster: unknown device preset; presets: server"),
    (["devices.mix={laptop: 1.0}", "devices.preset=laptop"], "devices.mix: give either preset"),
    (["devices.clients={client-7: {preset: laptop}}"], "devices.clients.client-7: is not a client"),
    (["devices.clients={client-1: {train_gflops: 5}}"], "devices.clients.client-1.preset: give a preset"),
    (["devices.clients={client-1: {preset: laptop, active_w: -1}}"], "devices.clients.client-1.active_w: must be"),
    (["eval.routing=fastest"], "eval.routing: 'fastest' is not allowed; choose one of 'topk', 'deadline'"),
])
def test_bad_device_settings_fail_naming_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        toy_scenario(tmp_path, overrides, DEVICE_TOY)


def test_a_mix_is_assigned_by_largest_remainder_and_from_the_seed():
    cfg = DevicesConfig(mix={"raspberry-pi-4": 0.5, "jetson-nano": 0.3, "laptop": 0.2})
    assert mix_counts(cfg.mix, 10) == {"raspberry-pi-4": 5, "jetson-nano": 3, "laptop": 2}
    assert mix_counts(cfg.mix, 4) == {"raspberry-pi-4": 2, "jetson-nano": 1, "laptop": 1}
    a, b = assign(cfg, 10, seed=1), assign(cfg, 10, seed=1)
    assert a == b and a is not None
    assert sorted(d.name for d in a.values()) == sorted(["raspberry-pi-4"] * 5 + ["jetson-nano"] * 3 + ["laptop"] * 2)
    orders = {tuple(d.name for d in (assign(cfg, 10, seed=s) or {}).values()) for s in range(8)}
    assert len(orders) > 1  # the permutation comes from the seed
    own = assign(DevicesConfig(preset="laptop", clients={"client-1": DeviceOverrides(preset="phone", idle_w=0.2)}),
                 2, seed=0)
    assert own == {0: Device("laptop", PRESETS["laptop"]),
                   1: Device("phone*", DeviceProfile(8.0, 16.0, 3.5, 0.2))}
    assert assign(DevicesConfig(), 3, seed=0) is None


# -- modeled compute time ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def learner(tmp_path_factory):
    scn = toy_scenario(tmp_path_factory.mktemp("dev"), [], DEVICE_TOY)
    return ClientLearner(scn, load_client_data(scn, 0))


def _burn(stop: threading.Event) -> None:
    x = torch.randn(256, 256)
    while not stop.is_set():
        x = torch.tanh(x @ x)


def test_modeled_compute_time_does_not_depend_on_host_load(learner):
    device = Device("raspberry-pi-4", PRESETS["raspberry-pi-4"])

    async def fit(meter: ComputeMeter) -> Usage:
        meter.begin(Op.STAGE1_FIT)
        await meter(lambda: learner.stage1_fit(0))
        return meter.report(0, 0)

    quiet_run = asyncio.run(fit(ComputeMeter(device, time_scale=0.001)))
    stop = threading.Event()
    burners = [threading.Thread(target=_burn, args=(stop,)) for _ in range(2)]
    for t in burners:
        t.start()
    try:
        loaded_run = asyncio.run(fit(ComputeMeter(device, time_scale=0.001)))
    finally:
        stop.set()
        for t in burners:
            t.join()
    assert quiet_run.flops > 1e8
    assert loaded_run.flops == quiet_run.flops
    assert loaded_run.compute_s == quiet_run.compute_s == pytest.approx(quiet_run.flops / 3e9)
    assert loaded_run.compute_j == pytest.approx(6.4 * quiet_run.compute_s)


def test_the_meter_waits_for_the_device_and_reports_host_lag(learner):
    h = torch.randn(64, learner.exp.model.latent_dim)
    slow = Device("slow", DeviceProfile(train_gflops=1.0, infer_gflops=0.0003, active_w=5.0, idle_w=1.0))

    async def serve(device: Device) -> tuple[float, Usage]:
        meter = ComputeMeter(device, time_scale=1.0)
        meter.begin(Op.EVALUATE)
        t0 = time.perf_counter()
        await meter(lambda: learner.gate_logits(h))
        return time.perf_counter() - t0, meter.report(0, 0)

    wall, usage = asyncio.run(serve(slow))
    assert usage.compute_s > 0.2 and wall >= usage.compute_s * 0.99 and usage.lag_s == 0.0
    fast = Device("fast", DeviceProfile(train_gflops=1e6, infer_gflops=1e6, active_w=5.0, idle_w=1.0))
    _, usage = asyncio.run(serve(fast))
    assert usage.lag_s > 0 and usage.compute_s < 1e-6  # this host is slower than a 1 PFLOP/s device


def test_a_task_the_device_cannot_finish_before_its_deadline_is_declined(learner):
    async def fit() -> None:
        meter = ComputeMeter(Device("raspberry-pi-4", PRESETS["raspberry-pi-4"]), time_scale=1.0)
        meter.begin(Op.STAGE1_FIT, deadline_at=asyncio.get_running_loop().time() + 0.01)
        await meter(lambda: learner.stage1_fit(0))

    with pytest.raises(TooSlow, match=r"too slow: raspberry-pi-4 needs .* s \(modeled\) of compute for stage1_fit"):
        asyncio.run(fit())


def test_flop_counting_is_per_thread():
    a = torch.randn(64, 64)
    stop = threading.Event()
    other = threading.Thread(target=_burn, args=(stop,))
    other.start()
    try:
        _, flops = counted(lambda: a @ a)
    finally:
        stop.set()
        other.join()
    assert flops == 2 * 64**3


# -- usage on the wire, energy --------------------------------------------------------------------------
def test_usage_round_trips_and_malformed_usage_is_a_protocol_error():
    u = Usage("jetson-nano", 1e9, 0.04, 0.3, 0.26, 0.4, 1.5, 1000, 2000, too_slow=False)
    assert decode_usage(encode_usage(u)) == u
    assert decode_usage({"task": "x"}) is None
    bad = encode_usage(u) | {"dev.compute_s": -1.0}
    with pytest.raises(ProtocolError, match="compute_s must be a finite number >= 0"):
        decode_usage(bad)


def test_a_query_carries_its_deadline_and_an_expert_can_decline_it():
    query = encode_expert_query(torch.zeros(3, 8), deadline_s=0.25)
    assert query_deadline(query.meta) == 0.25
    assert query_deadline({}) == math.inf and query_deadline({"deadline_s": -1.0}) == math.inf
    decline = encode_expert_decline("too slow: raspberry-pi-4 needs 2.00 s")
    assert decode_expert_answer(decline.tensors, decline.meta).logprobs is None
    with pytest.raises(ProtocolError, match="an expert answer carries 'logp'"):
        decode_expert_answer({}, {})  # neither an answer nor a decline


def test_a_clients_wire_schema_lets_a_decline_through(tmp_path):
    """A decline carries no logits: the requester's wire check must pass it to the decoder (else it
    is dropped as missing_tensor and the requester waits out its deadline instead of falling back)."""
    import numpy as np

    from agents.bus import BusConfig
    from agents.client import ClientAgent
    from broker.auth import BrokerAddress
    from broker.topics import Kind
    from nmoe.errors import WireError

    scn = toy_scenario(tmp_path, [], DEVICE_TOY)
    agent = ClientAgent(scn, scn.network, 0, BusConfig("t", "client-0", BrokerAddress("127.0.0.1", 1, "u", "p")))
    logits = agent.schemas()[Kind.LOGITS]
    logits.check(encode_expert_decline("no trained expert on this client").tensors)  # no exception
    logits.check({"logp": np.zeros((4, 10), dtype=np.float32)})
    for bad, reason in (({"logp": np.zeros((4, 3), dtype=np.float32)}, "bad_shape"),
                        ({"logp": np.zeros((4, 10), dtype=np.float32), "x": np.zeros(1, dtype=np.float32)},
                         "unexpected_tensor")):
        with pytest.raises(WireError) as err:
            logits.check(bad)
        assert err.value.reason == reason


def test_mean_rates_match_the_channel_presets_and_loss_costs_energy():
    assert mean_rate_bps(LTE.uplink) / 1e6 == pytest.approx(13, abs=1.0)
    assert mean_rate_bps(LTE.downlink) / 1e6 == pytest.approx(29, abs=1.5)
    assert mean_rate_bps(EDGE_POOR.uplink) / 1e6 == pytest.approx(1.2, abs=0.15)
    assert mean_rate_bps(WIFI.uplink) == 40e6
    clean = RadioModel("lte", LTE).joules(1e6, 1e6)
    lossy_link = LinkParams(**{**LTE.uplink.__dict__, "loss_p": 0.3})
    lossy = RadioModel("lte", RadioProfile(uplink=lossy_link, downlink=LTE.downlink)).joules(1e6, 1e6)
    assert 0 < clean < lossy
    # uplink: (0.438 W/Mbps * 13 Mbps + 1.288 W) * 8 Mbit / 13 Mbps ~ 4.3 J; downlink ~ 1.2 J
    assert clean == pytest.approx(5.5, rel=0.1)
    assert RadioModel("none", None).joules(1e6, 1e6) == 0.0


# -- deadline-aware routing ----------------------------------------------------------------------------
class PredictedPool:
    """The routing side of a pool: what the real LatencyPredictor says about each expert."""

    def __init__(self, predictor: LatencyPredictor) -> None:
        self.predictor = predictor

    async def query(self, expert: int, latents: torch.Tensor):  # never called by the planner
        raise AssertionError("the planner does not query")

    def wire_bytes(self) -> int:
        return 0

    def would_miss(self, expert: int, rows: int) -> bool:
        return self.predictor.would_miss(expert, rows)


def _predictor(slow_expert_rate_bps: float) -> LatencyPredictor:
    fast = Peer(LTE, PRESETS["jetson-nano"])
    slow_link = LinkParams(rate="fixed", rate_bps=slow_expert_rate_bps, delay_s=0.06)
    slow = Peer(RadioProfile(uplink=slow_link, downlink=slow_link), PRESETS["jetson-nano"])
    return LatencyPredictor(0, {0: fast, 1: slow, 2: fast}, latent_dim=64, hidden=64, classes=10, deadline_s=0.3)


def test_deadline_routing_swaps_an_expert_whose_link_is_too_slow():
    logits = torch.tensor([[0.0, 3.0, 2.0]]).repeat(32, 1)  # every row prefers expert 1, then 2
    assert set(plan(logits, 1).rows) == {1}
    route, swapped = deadline_plan(logits, 1, 0, PredictedPool(_predictor(100e3)))  # 100 kbit/s: 8 KB take 0.7 s
    assert set(route.rows) == {2} and swapped == 1
    route, swapped = deadline_plan(logits, 1, 0, PredictedPool(_predictor(50e6)))  # a fast link: no change
    assert set(route.rows) == {1} and swapped == 0


def test_deadline_routing_serves_locally_when_every_remote_expert_would_miss():
    pred = _predictor(100e3)
    pred.observe(2, 32, None)  # expert 2 missed its last reply: measured, it is late too
    route, swapped = deadline_plan(torch.tensor([[0.0, 3.0, 2.0]]).repeat(8, 1), 2, 0, PredictedPool(pred))
    assert set(route.rows) == {0} and swapped == 2


def test_measured_replies_move_the_prediction_and_it_recovers():
    pred = _predictor(50e6)
    assert not pred.would_miss(2, 32)
    pred.observe(2, 32, 1.0)  # measured 1 s: a fade the presets did not predict
    assert pred.would_miss(2, 32)
    for _ in range(12):  # not asked for a while: the residual decays and the expert is tried again
        pred.predict(2, 32)
    assert not pred.would_miss(2, 32)
    assert math.isinf(LatencyPredictor(0, {1: Peer(RadioProfile(LTE.uplink, LTE.downlink, 10.0, 30.0), None)},
                                       64, 64, 10, 0.3).modeled(1, 8))  # offline 75 % of the time


# -- a networked run with a device too slow for any deadline ----------------------------------------------
@needs_mosquitto
def test_a_device_too_slow_for_every_deadline_is_reported_not_waited_for(tmp_path):
    from scenarios.networked import run_networked_scenario

    scn = toy_scenario(tmp_path, [
        "clients=2", "devices.preset=server",
        "devices.clients={client-1: {preset: raspberry-pi-4, train_gflops: 0.001, infer_gflops: 0.001}}",
        # deadlines this (shared, loaded) host meets for the fast device; the slow one needs hours
        "network.round_timeout_s=120", "network.stage2_timeout_s=120", "network.eval_timeout_s=120",
    ], DEVICE_TOY)
    results = run_networked_scenario(scn, tmp_path / "out", quiet(), "inprocess")
    devices = results["devices"]
    assert devices["too_slow"] == ["client-1"]
    assert devices["clients"]["client-1"]["device"] == "raspberry-pi-4*"
    assert devices["clients"]["client-1"]["in_time"] == 0 and devices["clients"]["client-0"]["too_slow"] == 0
    fit = next(r for r in results["rounds"] if r["op"] == "stage1_fit")
    # declined at once, as a failure that says why: not 'missing' after waiting out the deadline
    assert fit["answered"] == ["client-0"] and fit["failures"]["client-1"].startswith("error: too slow: raspberry")
    assert devices["clients"]["client-0"]["compute_j"] > 0 and devices["clients"]["client-0"]["radio_j"] > 0
    assert devices["clients"]["client-1"]["compute_j"] < devices["clients"]["client-0"]["compute_j"]
    assert devices["totals"]["energy_j"] == pytest.approx(sum(c["energy_j"] for c in devices["clients"].values()))
    figures = run_figures(json.loads((tmp_path / "out" / "results.json").read_text()))  # what a sweep summary reads
    assert figures["energy_j"] == pytest.approx(devices["totals"]["energy_j"])
    assert 0.5 <= figures["answered_share"] < 1.0 and figures["air_mb"] > 0
