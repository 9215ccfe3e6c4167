"""The wireless channel model (broker/channel): pure, fast, no broker.

Statistical tests use a fixed seed and a stated bound (4 standard deviations of the estimator), so
they are deterministic and a model that is wrong by more than noise fails them.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

import numpy as np
import pytest

from broker.channel import (
    PRESETS,
    ChannelConfig,
    ChannelModel,
    Delivery,
    Drop,
    LinkParams,
    RealtimeDriver,
    resolve_profile,
)
from broker.channel.config import KINDS, PRESET_NAMES, ClientOverrides, LinkOverrides
from broker.channel.loss import GilbertElliottLoss, stream
from broker.channel.processes import BlockRayleighRate
from nmoe.errors import ChannelError, ConfigError
from scenarios.schema import build

AGENTS = ["coordinator", "client-0", "client-1", "client-2"]


def model(link: dict[str, Any] | None = None, agents: list[str] | None = None, seed: int = 0,
          **section: Any) -> ChannelModel:
    """A model built the way a scenario's channel section is: ideal preset plus overrides."""
    data = {"preset": "ideal", "shared_uplink": False, "link": link or {}, **section}
    return ChannelModel(build(ChannelConfig, data, "channel"), agents or AGENTS, seed)


def drops(results: list[Any]) -> list[Drop]:
    return [r for r in results if isinstance(r, Drop)]


def deliveries(results: list[Any]) -> list[Delivery]:
    return [r for r in results if isinstance(r, Delivery)]


# -- rate and delay -------------------------------------------------------------------------------


def test_fixed_rate_link_delivers_after_delay_plus_serialization() -> None:
    rate, delay, nbytes = 2e6, 0.05, 250_000  # S/R = 1.0 s
    m = model({"rate": "fixed", "rate_bps": rate, "delay_s": delay})
    m.submit("client-0", "coordinator", nbytes, key="up")  # one hop: the uplink
    m.submit("coordinator", "client-1", nbytes, key="down")  # one hop: the downlink
    m.submit("client-1", "client-2", nbytes, key="both")  # two hops, store-and-forward
    m.run()
    arrive = {r.key: r.t_arrive for r in deliveries(m.drain())}
    one_hop = delay + 8 * nbytes / rate
    assert arrive["up"] == pytest.approx(one_hop, abs=1e-9)
    assert arrive["down"] == pytest.approx(one_hop, abs=1e-9)
    # client-1's uplink is free at t=0 but client-1 is also receiving; its uplink carries "both" alone.
    assert arrive["both"] == pytest.approx(2 * one_hop, abs=1e-9)


def test_ideal_path_delivers_synchronously_without_events() -> None:
    m = ChannelModel(ChannelConfig(preset="ideal"), AGENTS, seed=0)
    m.submit("client-0", "client-1", 10**6, key=1)
    (result,) = m.drain()  # no env.run(): the ideal path needs no SimPy event
    assert isinstance(result, Delivery) and result.t_arrive == result.t_send == 0.0
    assert m.env.peek() == math.inf


def test_messages_on_a_link_never_overtake_each_other() -> None:
    m = model({"delay_s": 0.05, "jitter_s": 0.05})
    for i in range(200):
        m.run_until(i * 0.001)
        m.submit("client-0", "coordinator", 100, key=i)
    m.run()
    got = deliveries(m.drain())
    assert [d.key for d in got] == list(range(200))
    assert all(a.t_arrive <= b.t_arrive for a, b in zip(got, got[1:], strict=False))
    assert len({round(d.latency, 9) for d in got}) > 100  # jitter did vary the delay


# -- loss and retransmission ----------------------------------------------------------------------


def within_4_sigma(observed: float, expected: float, sigma: float) -> bool:
    return abs(observed - expected) <= 4 * sigma


def test_bernoulli_loss_unreliable_message_drop_rate() -> None:
    p, packets, n = 0.02, 10, 3000
    m = model({"loss": "bernoulli", "loss_p": p, "mtu_bytes": 1500})
    for i in range(n):
        m.submit("client-0", "coordinator", packets * 1500, reliable=False, key=i)
    m.run()
    lost = drops(m.drain())
    q = 1 - (1 - p) ** packets  # a message is lost with any of its packets
    assert within_4_sigma(len(lost), n * q, math.sqrt(n * q * (1 - q)))
    assert {d.reason for d in lost} == {"loss"}


def test_bernoulli_loss_reliable_retransmits_each_packet_geometrically() -> None:
    p, packets, n, rto = 0.1, 10, 3000, 0.2
    m = model({"loss": "bernoulli", "loss_p": p, "max_retries": 50, "rto_s": rto})
    for i in range(n):
        m.submit("client-0", "coordinator", packets * 1500, key=i)
    m.run()
    got = deliveries(m.drain())
    assert len(got) == n  # nothing exhausts 50 retries
    retx = sum(d.retransmissions for d in got) / (n * packets)
    # Failures before a packet's success are geometric: mean p/(1-p), variance p/(1-p)^2.
    assert within_4_sigma(retx, p / (1 - p), math.sqrt(p / (1 - p) ** 2 / (n * packets)))


def test_reliable_single_packet_latency_is_one_rto_per_retransmission() -> None:
    rto = 0.25
    m = model({"loss": "bernoulli", "loss_p": 0.5, "max_retries": 60, "rto_s": rto})
    for i in range(300):
        m.submit("client-0", "coordinator", 100, key=i)
    m.run()
    got = deliveries(m.drain())
    assert any(d.retransmissions > 0 for d in got)
    # Messages queue behind each other on the link, so compare with the previous arrival.
    prev = 0.0
    for d in got:
        assert d.t_arrive - prev == pytest.approx(rto * d.retransmissions, abs=1e-9)
        prev = d.t_arrive


def test_reliable_message_is_lost_after_the_retry_limit() -> None:
    p, retries, packets, n = 0.3, 1, 4, 2000
    m = model({"loss": "bernoulli", "loss_p": p, "max_retries": retries})
    for i in range(n):
        m.submit("client-0", "coordinator", packets * 1500, key=i)
    m.run()
    lost = drops(m.drain())
    q = 1 - (1 - p ** (retries + 1)) ** packets
    assert within_4_sigma(len(lost), n * q, math.sqrt(n * q * (1 - q)))


def gilbert_elliott_link(p: float, r: float) -> dict[str, Any]:
    return {"loss": "gilbert_elliott", "ge_p": p, "ge_r": r, "ge_loss_bad": 1.0, "ge_loss_good": 0.0}


def run_lengths(mask: np.ndarray) -> np.ndarray:
    """Lengths of the runs of True in a boolean sequence."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return edges[1::2] - edges[::2]


def test_gilbert_elliott_bursts_have_mean_length_one_over_r() -> None:
    p, r, n = 0.05, 0.2, 20_000
    m = model(gilbert_elliott_link(p, r))
    for i in range(n):  # one packet per message: the chain must carry its state across messages
        m.submit("client-0", "coordinator", 1000, reliable=False, key=i)
    m.run()
    lost = np.zeros(n, dtype=bool)
    lost[np.array([d.key for d in drops(m.drain())], dtype=int)] = True
    runs = run_lengths(lost)
    # With 1-h = 1 and 1-k = 0 a loss burst is a bad-state sojourn: geometric, mean 1/r.
    assert within_4_sigma(runs.mean(), 1 / r, math.sqrt((1 - r) / r**2 / len(runs)))
    # Loss rate: the bad state's stationary share, p/(p+r); effective samples n(1-l)/(1+l), l = 1-p-r.
    share, lam = p / (p + r), 1 - p - r
    assert within_4_sigma(lost.mean(), share, math.sqrt(share * (1 - share) / (n * (1 - lam) / (1 + lam))))


def test_gilbert_elliott_chain_state_carries_across_draws() -> None:
    ge = GilbertElliottLoss(0.02, 0.1, 1.0, 0.0, stream(7, "test"))
    rng = np.random.default_rng(1)
    states = np.concatenate([ge.states(int(k)) for k in rng.integers(1, 40, size=4000)])
    runs = run_lengths(states)
    assert within_4_sigma(runs.mean(), 10.0, math.sqrt(0.9 / 0.01 / len(runs)))


# -- availability ---------------------------------------------------------------------------------


def test_offline_client_neither_sends_nor_receives() -> None:
    m = model({"delay_s": 0.3}, clients={"client-1": {"mean_online_s": 2.0, "mean_offline_s": 1.0}})
    for i in range(1000):
        m.run_until(i * 0.05)
        m.submit("client-1", "coordinator", 100, key=("from", i))
        m.submit("coordinator", "client-1", 100, key=("to", i))
        m.submit("client-0", "client-1", 100, key=("via", i))
    m.run()
    results = m.drain()
    assert len(results) == 3000
    for r in results:
        if isinstance(r, Delivery) and r.src == "client-1":  # its uplink hop: [t_send, t_send + 0.3]
            assert m.online_throughout("client-1", r.t_send, r.t_arrive)
        elif isinstance(r, Delivery):  # its downlink hop ends at t_arrive and lasts 0.3 s
            assert m.online_throughout("client-1", r.t_arrive - 0.3, r.t_arrive)
        elif r.src == "client-1" and not m.is_online("client-1", r.t_send):
            assert r.reason == "offline" and r.t_drop == r.t_send  # dropped at once, never queued
    reasons = {r.reason for r in drops(results)}
    assert reasons == {"offline"}
    assert 0.2 < len(drops(results)) / len(results) < 0.8  # the process did switch, both ways
    assert not any(r.src == "client-0" and r.dst == "coordinator" for r in results)  # sanity of keys


# -- shared medium --------------------------------------------------------------------------------


def upload_times(shared: bool, sizes: dict[str, int]) -> dict[str, float]:
    m = model({"rate": "fixed", "rate_bps": 1e6}, shared_uplink=shared)
    for src, nbytes in sizes.items():
        m.submit(src, "coordinator", nbytes, key=src)
    m.run()
    return {str(r.key): r.t_arrive for r in deliveries(m.drain())}


def test_two_concurrent_uploads_on_a_shared_uplink_take_twice_as_long() -> None:
    alone = upload_times(True, {"client-0": 125_000})["client-0"]
    both = upload_times(True, {"client-0": 125_000, "client-1": 125_000})
    separate = upload_times(False, {"client-0": 125_000, "client-1": 125_000})
    assert alone == pytest.approx(1.0, abs=1e-9)
    assert both == pytest.approx({"client-0": 2.0, "client-1": 2.0}, abs=1e-9)
    assert separate == pytest.approx({"client-0": 1.0, "client-1": 1.0}, abs=1e-9)


def test_shared_uplink_is_processor_sharing() -> None:
    # Half the size: done at 1.0 s (half of the airtime); then the other has the cell alone.
    got = upload_times(True, {"client-0": 125_000, "client-1": 62_500})
    assert got == pytest.approx({"client-1": 1.0, "client-0": 1.5}, abs=1e-9)


def test_broadcast_crosses_the_sender_uplink_once() -> None:
    m = model({"uplink": {"rate": "fixed", "rate_bps": 1e6}}, shared_uplink=True)
    m.submit("client-0", "all", 125_000, key="b")
    m.run()
    got = deliveries(m.drain())
    assert sorted(d.dst for d in got) == ["client-1", "client-2", "coordinator"]
    assert all(d.t_arrive == pytest.approx(1.0, abs=1e-9) for d in got)


# -- seeds ----------------------------------------------------------------------------------------


def drop_pattern(seed: int, agents: list[str]) -> list[object]:
    m = model({"loss": "bernoulli", "loss_p": 0.2}, agents=agents, seed=seed)
    for i in range(500):
        m.submit("client-0", "client-1", 3000, reliable=False, key=i)
        if "client-9" in agents:
            m.submit("client-9", "client-1", 3000, reliable=False, key=-i)
    m.run()
    return [d.key for d in drops(m.drain()) if d.src == "client-0"]


def test_same_seed_same_drops_different_seed_different_drops() -> None:
    base = drop_pattern(1, AGENTS)
    assert len(base) > 50
    assert drop_pattern(1, AGENTS) == base
    assert drop_pattern(2, AGENTS) != base
    # Streams are keyed by link name: another client and its traffic shift nothing on this link.
    # (client-1's downlink now carries client-9's messages too, so compare client-0's uplink drops.)
    m1 = model({"uplink": {"loss": "bernoulli", "loss_p": 0.2}}, seed=1)
    m2 = model({"uplink": {"loss": "bernoulli", "loss_p": 0.2}}, agents=[*AGENTS, "client-9"], seed=1)
    for m in (m1, m2):
        for i in range(500):
            m.submit("client-0", "coordinator", 3000, reliable=False, key=i)
            m.submit("client-9" if m is m2 else "client-2", "coordinator", 3000, reliable=False, key=-i)
        m.run()
    pattern = [[d.key for d in drops(m.drain()) if d.src == "client-0"] for m in (m1, m2)]
    assert pattern[0] == pattern[1] and len(pattern[0]) > 50


def test_config_seed_overrides_the_scenario_seed() -> None:
    a = ChannelModel(ChannelConfig(seed=5), AGENTS, seed=1)
    b = ChannelModel(ChannelConfig(seed=5), AGENTS, seed=2)
    assert a.seed == b.seed == 5
    assert ChannelModel(ChannelConfig(), AGENTS, seed=3).seed == 3


# -- Shannon capacity with block Rayleigh fading ----------------------------------------------------


def expected_shannon(bandwidth: float, snr: float, min_snr: float = 0.0) -> float:
    """E[B log2(1 + snr X); snr X >= min_snr], X ~ Exp(1), by quadrature in u = 1 - exp(-x)."""
    u = (np.arange(200_000) + 0.5) / 200_000  # midpoint rule on (0, 1)
    x = -np.log1p(-u)
    return float(bandwidth * np.mean(np.where(snr * x >= min_snr, np.log2(1 + snr * x), 0.0)))


def test_rayleigh_block_rates_average_to_the_ergodic_capacity() -> None:
    bandwidth, snr_db, blocks = 1e6, 10.0, 20_000
    proc = BlockRayleighRate(bandwidth, snr_db, 0.01, -100.0, stream(3, "test"))
    rates = proc.rates(0, blocks)
    expected = expected_shannon(bandwidth, 10.0)
    assert expected == pytest.approx(2.9065e6, rel=1e-3)  # e^(1/10) E1(1/10) / ln 2 = 2.9065 bit/s/Hz
    assert within_4_sigma(rates.mean(), expected, rates.std() / math.sqrt(blocks))
    assert proc.rate_at(0.015) == rates[1] and proc.next_change(0.015) == pytest.approx(0.02)


def test_shannon_link_transfer_time_matches_mean_capacity() -> None:
    bandwidth, coherence = 1e6, 0.01
    link = {"rate": "shannon", "bandwidth_hz": bandwidth, "snr_db": 10.0, "coherence_s": coherence}
    expected_rate = expected_shannon(bandwidth, 10.0)
    nbytes = int(expected_rate * 50.0 / 8)  # about 5000 coherence blocks
    m = model(link)
    m.submit("client-0", "coordinator", nbytes)
    m.run()
    (d,) = m.drain()
    assert isinstance(d, Delivery)
    # Equal-length blocks: sum of R_k Tc = S bits, so T ~ S / E[R]; rel. sd ~ sd(R) / (E[R] sqrt(K)).
    sd = BlockRayleighRate(bandwidth, 10.0, coherence, -100.0, stream(0, "x")).rates(0, 5000).std()
    assert within_4_sigma(d.t_arrive, 50.0, 50.0 * sd / expected_rate / math.sqrt(5000))


def test_outage_drops_a_stalled_message() -> None:
    link = {"rate": "shannon", "bandwidth_hz": 1e6, "snr_db": 0.0, "coherence_s": 0.1, "min_snr_db": 0.0}
    stalled = model({**link, "outage_timeout_s": 0.25})  # P(outage block) = 1 - e^-1 = 63 %
    patient = model(link)  # outage_timeout_s: inf, the default
    for m in (stalled, patient):
        for i in range(20):
            m.submit("client-0", "coordinator", 50_000, key=i)
        m.run()
    assert {r.reason for r in drops(stalled.drain())} == {"outage"}
    assert len(deliveries(patient.drain())) == 20


# -- config, presets and overrides ----------------------------------------------------------------


def test_presets_resolve_as_documented() -> None:
    assert set(PRESETS) == set(PRESET_NAMES) == {"ideal", "wifi", "lte", "edge-poor"}
    ideal = PRESETS["ideal"]
    assert ideal.uplink.is_ideal and ideal.downlink.is_ideal and ideal.always_online
    wifi = PRESETS["wifi"]
    assert (wifi.downlink.rate_bps, wifi.uplink.rate_bps, wifi.uplink.loss) == (80e6, 40e6, "bernoulli")
    lte = PRESETS["lte"]
    assert lte.uplink.rate == "shannon" and lte.uplink.snr_db < lte.downlink.snr_db
    poor = PRESETS["edge-poor"]
    assert poor.uplink.loss == "gilbert_elliott" and not poor.always_online
    assert resolve_profile(ChannelConfig(preset="lte"), "client-0") == lte


@pytest.mark.parametrize(("preset", "down_mbps", "up_mbps"), [("lte", 29.0, 13.2), ("edge-poor", 1.84, 1.17)])
def test_preset_mean_rates_are_the_documented_ones(preset: str, down_mbps: float, up_mbps: float) -> None:
    profile = PRESETS[preset]
    for link, mbps in ((profile.downlink, down_mbps), (profile.uplink, up_mbps)):
        mean = expected_shannon(link.bandwidth_hz, 10 ** (link.snr_db / 10), 10 ** (link.min_snr_db / 10))
        assert mean / 1e6 == pytest.approx(mbps, rel=0.01)


def test_edge_poor_loss_and_availability_are_the_documented_ones() -> None:
    link = PRESETS["edge-poor"].uplink
    bad = link.ge_p / (link.ge_p + link.ge_r)  # stationary share of the bad state
    assert bad * link.ge_loss_bad + (1 - bad) * link.ge_loss_good == pytest.approx(0.02, abs=0.001)
    assert 1 / link.ge_r == 4.0  # mean burst, packets
    poor = PRESETS["edge-poor"]
    assert poor.mean_offline_s / (poor.mean_online_s + poor.mean_offline_s) == pytest.approx(0.09, abs=0.005)


def test_shared_uplink_true_groups_clients_by_preset() -> None:
    cfg = ChannelConfig(preset="wifi", clients={"client-3": ClientOverrides(preset="edge-poor")})
    assert cfg.cell_of("client-0", "uplink") == cfg.cell_of("client-1", "uplink")
    assert cfg.cell_of("client-3", "uplink") != cfg.cell_of("client-0", "uplink")
    assert cfg.cell_of("client-0", "downlink") is None  # shared_downlink defaults to false


def test_overrides_apply_preset_then_scenario_then_client() -> None:
    cfg = ChannelConfig(
        preset="wifi",
        link=LinkOverrides(mtu_bytes=1400, delay_s=0.01, uplink=LinkOverrides(rate_bps=5e6)),
        clients={"client-3": ClientOverrides(preset="edge-poor", delay_s=0.2, mean_offline_s=0.0)},
    )
    other = resolve_profile(cfg, "client-0")
    assert other.uplink.rate_bps == 5e6 and other.downlink.rate_bps == 80e6  # direction-specific
    assert other.uplink.mtu_bytes == other.downlink.mtu_bytes == 1400
    assert other.uplink.delay_s == 0.01 and other.uplink.loss_p == PRESETS["wifi"].uplink.loss_p
    poor = resolve_profile(cfg, "client-3")
    assert poor.uplink.loss == "gilbert_elliott" and poor.uplink.rate == "shannon"  # its own preset
    assert poor.uplink.mtu_bytes == 1400  # the scenario-wide layer still applies
    assert poor.uplink.delay_s == poor.downlink.delay_s == 0.2  # its own layer wins
    assert poor.always_online


def test_channel_section_loads_from_yaml_data() -> None:
    cfg = build(ChannelConfig, {
        "preset": "wifi",
        "time_scale": 0.1,
        "shared_uplink": {"client-0": "a", "client-1": "a"},
        "reliable_kinds": ["model", "update"],
        "clients": {"client-3": {"preset": "edge-poor", "uplink": {"rate": "fixed", "rate_bps": 1e5}}},
    }, "channel")
    assert cfg.clients["client-3"].uplink is not None and cfg.clients["client-3"].uplink.rate_bps == 1e5
    assert cfg.cell_of("client-0", "uplink") == "a" and cfg.cell_of("client-2", "uplink") is None
    assert cfg.is_reliable("update") and not cfg.is_reliable("latent")
    assert ChannelConfig().reliable_kinds == KINDS


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"time_scale": 0.0}, "time_scale"),
    ({"time_scale": math.inf}, "time_scale"),
    ({"seed": -1}, "seed"),
    ({"preset": "5g"}, "preset"),
    ({"model": "wired"}, "model"),
    ({"reliable_kinds": ("model", "gossip")}, "reliable_kinds"),
    ({"shared_uplink": {"client-0": ""}}, "shared_uplink.client-0"),
])
def test_bad_channel_values_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        ChannelConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"rate_bps": 0.0}, "rate_bps"),
    ({"delay_s": -0.1}, "delay_s"),
    ({"loss_p": 1.5}, "loss_p"),
    ({"ge_r": 0.0}, "ge_r"),
    ({"mtu_bytes": 10}, "mtu_bytes"),
    ({"max_retries": -1}, "max_retries"),
    ({"coherence_s": math.nan}, "coherence_s"),
    ({"loss": "random"}, "loss"),
])
def test_bad_link_values_name_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        LinkParams(**kwargs)
    with pytest.raises(ValueError, match=f"^{field}: "):
        ClientOverrides(**kwargs)


def test_loader_reports_the_key_path() -> None:
    path = r"^channel\.clients\.client-3\.uplink\.loss_p: must be in \[0, 1\]"
    with pytest.raises(ConfigError, match=path):
        build(ChannelConfig, {"clients": {"client-3": {"uplink": {"loss_p": 2}}}}, "channel")
    with pytest.raises(ConfigError, match=r"^channel\.clients\.client-3\.mean_offline_s: "):
        build(ChannelConfig, {"clients": {"client-3": {"mean_offline_s": -1}}}, "channel")


def test_model_rejects_unknown_agents() -> None:
    with pytest.raises(ChannelError, match="channel.clients: 'client-7'"):
        ChannelModel(ChannelConfig(clients={"client-7": ClientOverrides()}), AGENTS, seed=0)
    with pytest.raises(ChannelError, match="direct"):
        ChannelModel(ChannelConfig(model="direct"), AGENTS, seed=0)
    m = ChannelModel(ChannelConfig(), AGENTS, seed=0)
    with pytest.raises(ChannelError, match="unknown destination"):
        m.submit("client-0", "client-9", 10)


def test_kinds_match_the_topic_scheme() -> None:
    topics = pytest.importorskip("broker.topics")
    assert tuple(k.value for k in topics.Kind) == KINDS


# -- stats ----------------------------------------------------------------------------------------


def test_stats_per_pair() -> None:
    m = model({"delay_s": 0.01, "loss": "bernoulli", "loss_p": 0.5, "max_retries": 0})
    for i in range(200):
        m.submit("client-0", "coordinator", 100, key=i)
    m.run()
    results = m.drain()
    s = m.stats()[("client-0", "coordinator")]
    assert s.delivered == len(deliveries(results)) and s.dropped == {"loss": len(drops(results))}
    assert s.sent == 200 and s.bytes_delivered == 100 * s.delivered
    assert s.latency_p50 == pytest.approx(0.01) and s.latency_p99 == pytest.approx(0.01)


# -- real-time driver -----------------------------------------------------------------------------


async def test_driver_delivers_at_the_scaled_wall_clock_time() -> None:
    scale, delay = 0.05, 1.0  # 1 modeled second lasts 50 ms
    loop = asyncio.get_running_loop()
    arrived: dict[object, tuple[Delivery | Drop, float]] = {}
    done = asyncio.Event()

    def on_result(r: Delivery | Drop) -> None:
        arrived[r.key] = (r, loop.time())
        if len(arrived) == 2:
            done.set()

    section = {"preset": "ideal", "time_scale": scale, "link": {"delay_s": delay}}
    cfg = build(ChannelConfig, section, "channel")
    m = ChannelModel(cfg, AGENTS, seed=0, on_result=on_result)
    async with RealtimeDriver(m) as driver:
        t_wall = loop.time()
        driver.submit("client-0", "coordinator", 100, key="a")  # one hop: 1 modeled second
        await asyncio.sleep(0.02)
        driver.submit("client-0", "client-1", 100, key="b")  # two hops: 2 modeled seconds
        await asyncio.wait_for(done.wait(), timeout=10)
    a, a_wall = arrived["a"]
    b, b_wall = arrived["b"]
    assert isinstance(a, Delivery) and isinstance(b, Delivery)
    assert a.latency == pytest.approx(delay, abs=1e-9) and b.latency == pytest.approx(2 * delay, abs=1e-9)
    assert b.t_send >= 0.02 / scale * 0.9  # modeled send times follow the wall clock
    # Wall-clock bounds are loose on purpose: never early, and not stalled.
    assert scale * delay * 0.99 <= a_wall - t_wall < 2.0
    assert a_wall < b_wall and b_wall - t_wall < 3.0
