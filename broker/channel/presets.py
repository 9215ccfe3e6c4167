"""Radio presets and the pure function that resolves a client's effective radio.

The values are *representative*, chosen to sit inside commonly reported ranges, not measured on
any particular network; each preset's docstring says where its numbers come from. Mean Shannon
rates below are E[B log2(1 + SNR X)] with X ~ Exp(1) over blocks that are not in outage.

=========  ===========  ===========  =========  ==============  ===========================  =========
preset     downlink     uplink       one-way    jitter (sd)     loss per 1500 B packet       offline
=========  ===========  ===========  =========  ==============  ===========================  =========
ideal      unlimited    unlimited    0          0               none                         never
wifi       80 Mbit/s    40 Mbit/s    2 ms       1 ms            Bernoulli 0.1 %              never
lte        ~29 Mbit/s   ~13 Mbit/s   20 ms      5 ms            Bernoulli 0.1 %              never
edge-poor  ~1.8 Mbit/s  ~1.2 Mbit/s  60 ms      20 ms           Gilbert-Elliott, ~2 %        ~9 %
=========  ===========  ===========  =========  ==============  ===========================  =========
"""

from __future__ import annotations

from dataclasses import replace

from broker.channel.config import (
    ChannelConfig,
    ClientOverrides,
    DirectionOverrides,
    LinkOverrides,
    LinkParams,
    RadioProfile,
)

IDEAL = RadioProfile(uplink=LinkParams(), downlink=LinkParams())
"""No airtime, no delay, no loss, always online: the channel only records modeled timestamps."""

_WIFI_UP = LinkParams(rate="fixed", rate_bps=40e6, delay_s=0.002, jitter_s=0.001, loss="bernoulli",
                      loss_p=0.001, mtu_bytes=1500, rto_s=0.02, max_retries=7)
WIFI = RadioProfile(uplink=_WIFI_UP, downlink=replace(_WIFI_UP, rate_bps=80e6))
"""An 802.11ac/ax access point shared by the clients of one room.

- Rates: application-level TCP throughput of a client a few metres from a Wi-Fi 5/6 access point is
  typically tens to a few hundred Mbit/s; 80 Mbit/s down and 40 Mbit/s up (clients transmit with
  less power and contend for the medium) sit at the modest end. Fixed: rate adaptation hides most
  fading indoors.
- Delay 2 ms one way, jitter 1 ms: Wi-Fi LAN round trips of a few milliseconds.
- Loss 0.1 % per packet, independent: the residual loss left after 802.11's own link-layer retries
  (retry limit 7, hence max_retries 7 here as well).
- rto_s 20 ms: TCP repairs isolated losses by fast retransmit within a few round trips.
"""

_LTE_UP = LinkParams(rate="shannon", bandwidth_hz=10e6, snr_db=3.0, coherence_s=0.05, min_snr_db=-6.7,
                     outage_timeout_s=2.0, delay_s=0.020, jitter_s=0.005, loss="bernoulli", loss_p=0.001,
                     mtu_bytes=1500, rto_s=0.1, max_retries=7)
LTE = RadioProfile(uplink=_LTE_UP, downlink=replace(_LTE_UP, snr_db=10.0))
"""One LTE cell, a UE with the carrier to itself, block Rayleigh fading.

- Rate: Shannon capacity over a 10 MHz carrier (an LTE channel bandwidth of 3GPP TS 36.101), mean
  SNR 10 dB down and 3 dB up (the UE's 23 dBm against the eNodeB's ~46 dBm): ~29 and ~13 Mbit/s on
  average, in line with commonly reported LTE user throughputs (tens of Mbit/s down, around ten up).
  Shannon is an upper bound on what a real modem achieves; read bandwidth_hz as an effective one.
- Coherence 50 ms: Tc ~ 0.423 / f_D with Doppler f_D = v f_c / c ~ 5.6 Hz at walking speed and 2 GHz.
- Outage below -6.7 dB: roughly where LTE's most robust CQI stops decoding. A message stalled by
  outages for 2 s is dropped: longer than the radio-link-failure timer T310 (commonly 1000 ms,
  TS 36.331) plus a re-establishment attempt. A representative choice, not a standard value; raise
  it to model a TCP connection that rides out long fades.
- Delay 20 ms one way, jitter 5 ms: LTE round trips are commonly reported at 30-60 ms.
- Loss 0.1 % per packet: residual loss after HARQ and RLC retransmissions; rto_s 100 ms.
"""

_EDGE_UP = LinkParams(rate="shannon", bandwidth_hz=1.4e6, snr_db=0.0, coherence_s=0.5, min_snr_db=-6.7,
                      outage_timeout_s=2.0, delay_s=0.060, jitter_s=0.020, loss="gilbert_elliott",
                      ge_p=0.01, ge_r=0.25, ge_loss_bad=0.5, ge_loss_good=0.001, mtu_bytes=1500, rto_s=0.5,
                      max_retries=5)
EDGE_POOR = RadioProfile(uplink=_EDGE_UP, downlink=replace(_EDGE_UP, snr_db=3.0),
                         mean_online_s=300.0, mean_offline_s=30.0)
"""A device at the edge of a narrow cell: slow, lossy, bursty, and sometimes gone.

- Rate: Shannon over 1.4 MHz (LTE's narrowest channel), mean SNR 3 dB down and 0 dB up: ~1.8 and
  ~1.2 Mbit/s on average; 10 % and 19 % of fading blocks are outages (below -6.7 dB).
- Coherence 500 ms: a (nearly) static device, f_D below 1 Hz, so deep fades last. An outage of four
  blocks stalls a message past the 2 s outage timeout: 0.19^3, about 1 outage in 150, on the uplink
  (1 in 1000 on the downlink); a 1 MB upload alone (7-8 s, with retransmissions) is lost so about
  2 % of the time (21 of 1000 seeds).
- Delay 60 ms one way, jitter 20 ms: cell-edge round trips well above 100 ms.
- Loss: Gilbert-Elliott with netem's parameters p = 1 %, r = 25 %, 1-h = 50 %, 1-k = 0.1 %: bad
  bursts of 4 packets on average, 3.8 % of the time, about 2 % loss overall; the kind of bursty
  setting used with ``tc netem loss gemodel``. rto_s 500 ms: timeouts rather than fast retransmit.
- Availability: online for 300 s, offline for 30 s on average (exponential), ~91 % of the time.
"""

PRESETS: dict[str, RadioProfile] = {"ideal": IDEAL, "wifi": WIFI, "lte": LTE, "edge-poor": EDGE_POOR}


def apply_direction(params: LinkParams, overrides: DirectionOverrides | None) -> LinkParams:
    """``params`` with the fields ``overrides`` sets replaced."""
    if overrides is None:
        return params
    changes = overrides.link_changes()
    return replace(params, **changes) if changes else params  # type: ignore[arg-type]


def apply_link(profile: RadioProfile, overrides: LinkOverrides) -> RadioProfile:
    """``profile`` with one layer of overrides: both directions first, then uplink/downlink."""
    up = apply_direction(apply_direction(profile.uplink, overrides), overrides.uplink)
    down = apply_direction(apply_direction(profile.downlink, overrides), overrides.downlink)
    online = profile.mean_online_s if overrides.mean_online_s is None else overrides.mean_online_s
    offline = profile.mean_offline_s if overrides.mean_offline_s is None else overrides.mean_offline_s
    return RadioProfile(uplink=up, downlink=down, mean_online_s=online, mean_offline_s=offline)


def resolve_profile(cfg: ChannelConfig, agent: str) -> RadioProfile:
    """The effective radio of client ``agent``: preset <- scenario ``link`` <- ``clients.<agent>``.

    The preset is the client's own (``clients.<agent>.preset``) when it names one, else the
    scenario's. Pure: the same config and agent always give the same profile.
    """
    own = cfg.clients.get(agent, ClientOverrides())
    base = PRESETS[own.preset or cfg.preset]
    return apply_link(apply_link(base, cfg.link), own)
