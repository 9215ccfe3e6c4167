"""Energy a client spends: compute (device power x modeled compute time) and radio (power x airtime).

Radio power follows the linear model of Huang et al., "A Close Examination of Performance and Power
Characteristics of 4G LTE Networks", MobiSys 2012 (Table 3, measured on phones): while transferring
at throughput t (Mbit/s) a radio draws

    uplink:   P = alpha_up * t + beta        downlink:   P = alpha_down * t + beta

=========  ==============  ================  ==========
radio      alpha_up        alpha_down        beta
=========  ==============  ================  ==========
LTE        438.39 mW/Mbps  51.97 mW/Mbps     1288.04 mW
Wi-Fi      283.17 mW/Mbps  137.01 mW/Mbps    132.86 mW
=========  ==============  ================  ==========

The channel presets ``lte`` and ``edge-poor`` (a narrow LTE cell) use the LTE row, ``wifi`` the
Wi-Fi row, ``ideal`` (a wire) spends nothing on the radio. Airtime of ``b`` bits on a link of mean
rate R is b / R times the expected transmissions per packet, 1 / (1 - p) for a packet loss rate p
(reliable traffic resends lost packets), so E = (alpha t + beta) b / (R (1 - p)) with t = R in Mbit/s.
R is the link's mean rate: the fixed rate, or E[B log2(1 + SNR X); SNR X above the outage
threshold] with X ~ Exp(1) for a Shannon link (what ``broker.channel.processes.BlockRayleighRate``
draws). LTE's RRC tail energy (the radio staying in its high-power state for ~11 s after a
transfer, the same paper) is not counted: rounds here are back to back, so a tail would overlap the
next transfer anyway.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from broker.channel.config import LinkParams, RadioProfile

Radio = Literal["lte", "wifi", "none"]


@dataclass(frozen=True)
class RadioPower:
    alpha_up_w_per_mbps: float
    alpha_down_w_per_mbps: float
    beta_w: float


RADIO_POWER: dict[str, RadioPower] = {
    "lte": RadioPower(0.43839, 0.05197, 1.28804),
    "wifi": RadioPower(0.28317, 0.13701, 0.13286),
}
RADIO_OF_PRESET: dict[str, Radio] = {"ideal": "none", "wifi": "wifi", "lte": "lte", "edge-poor": "lte"}


def mean_rate_bps(link: LinkParams) -> float:
    """The link's long-run mean rate in bit/s (inf for an unlimited one); outage blocks carry 0."""
    if link.rate == "unlimited":
        return math.inf
    if link.rate == "fixed":
        return link.rate_bps
    snr, floor = 10 ** (link.snr_db / 10), 10 ** (link.min_snr_db / 10)
    # E[log2(1 + snr X) 1{snr X >= floor}], X ~ Exp(1): quadrature on a fine grid of X (exact to ~1e-6)
    x = np.linspace(floor / snr, 60.0, 400_001)
    dens = np.exp(-x) * np.log2(1.0 + snr * x)
    integral = float(np.sum((dens[1:] + dens[:-1]) * np.diff(x)) / 2.0)
    return link.bandwidth_hz * integral


def loss_rate(link: LinkParams) -> float:
    """Long-run packet loss probability (Gilbert-Elliott: the stationary mix of its two states)."""
    if link.loss == "bernoulli":
        return link.loss_p
    if link.loss == "gilbert_elliott":
        bad = link.ge_p / (link.ge_p + link.ge_r)
        return bad * link.ge_loss_bad + (1 - bad) * link.ge_loss_good
    return 0.0


def _joules(bits: float, link: LinkParams, alpha: float, beta: float) -> float:
    rate = mean_rate_bps(link)
    if bits <= 0 or math.isinf(rate):
        return 0.0
    airtime = bits / rate / max(1e-9, 1.0 - loss_rate(link))
    return (alpha * rate / 1e6 + beta) * airtime


@dataclass(frozen=True)
class RadioModel:
    """A client's radio energy per byte sent and received (the profile resolved from its channel)."""

    radio: Radio
    profile: RadioProfile | None

    def joules(self, tx_bytes: float, rx_bytes: float) -> float:
        if self.radio == "none" or self.profile is None:
            return 0.0
        p = RADIO_POWER[self.radio]
        return (_joules(8.0 * tx_bytes, self.profile.uplink, p.alpha_up_w_per_mbps, p.beta_w)
                + _joules(8.0 * rx_bytes, self.profile.downlink, p.alpha_down_w_per_mbps, p.beta_w))
