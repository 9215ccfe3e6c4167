"""FedAvg, FedSC and DP: the formulas, against direct computations."""

import math

import pytest
import torch

from nmoe_models.fedavg import fedavg, is_bn_buffer, select, with_prefix
from nmoe_models.fedsc import clip_norm, correlation, fedsc_loss, q_weights, rbar_minus, scheduled_q
from nmoe_models.privacy import epsilon, privatize, sensitivity, symmetric_gaussian


def test_fedavg_is_the_hand_computed_weighted_mean():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(10)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(20)}
    out = fedavg([a, b], [100, 300])
    assert torch.allclose(out["w"], torch.tensor([0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 6]))
    assert out["n"].dtype == torch.int64 and int(out["n"]) == round(0.25 * 10 + 0.75 * 20)


def test_fedavg_key_filters_select_by_name():
    state = {"shared.0.weight": torch.ones(2), "local.0.weight": torch.zeros(2), "bn.running_mean": torch.ones(1)}
    assert list(select(state, with_prefix("shared."))) == ["shared.0.weight"]
    assert [k for k in state if not is_bn_buffer(k)] == ["shared.0.weight", "local.0.weight"]
    out = fedavg([state, state], [1, 1], keys=["shared.0.weight"])
    assert list(out) == ["shared.0.weight"]


def test_fedavg_rejects_bad_input():
    with pytest.raises(ValueError, match="no states"):
        fedavg([], [])
    with pytest.raises(ValueError, match="shape"):
        fedavg([{"w": torch.ones(2)}, {"w": torch.ones(3)}], [1, 1])
    with pytest.raises(ValueError, match="positive"):
        fedavg([{"w": torch.ones(2)}], [0])


def test_correlation_and_fedsc_loss_against_direct_computation():
    torch.manual_seed(0)
    b, d, q = 7, 5, 0.3
    z1, z0 = torch.randn(b, d), torch.randn(b, d)
    rbar = torch.randn(d, d)
    rbar = (rbar + rbar.T) / 2
    # direct: R = E[z z^T] over both views, Tr(R+) = E[<z1, z0>]
    r = sum(torch.outer(z, z) for z in torch.cat([z1, z0])) / (2 * b)
    tr_plus = sum(float(z1[i] @ z0[i]) for i in range(b)) / b
    expected = -tr_plus + 0.5 * q * float(torch.trace(r @ r.T)) + (1 - q) * float(torch.trace(r @ rbar))
    r_got, tr_got = correlation(z1, z0)
    assert torch.allclose(r_got, r, atol=1e-5)
    assert math.isclose(float(tr_got), tr_plus, rel_tol=1e-5)
    assert math.isclose(float(fedsc_loss(z1, z0, q, rbar)), expected, rel_tol=1e-5, abs_tol=1e-5)


def test_clip_norm_bounds_rows_and_keeps_short_ones():
    z = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    out = clip_norm(z, mu=4.0)
    assert torch.allclose(out[0].norm(), torch.tensor(2.0))
    assert torch.allclose(out[1], z[1])


def test_rbar_minus_is_the_q_weighted_mean_of_the_others():
    corrs = {i: torch.full((2, 2), float(i + 1)) for i in range(3)}
    q = q_weights({0: 100, 1: 100, 2: 200})
    assert q == {0: 0.25, 1: 0.25, 2: 0.5}
    out = rbar_minus(corrs, q)
    # Rbar_{-0} = (0.25 * 2 + 0.5 * 3) / (1 - 0.25)
    assert torch.allclose(out[0], torch.full((2, 2), (0.25 * 2 + 0.5 * 3) / 0.75))
    assert torch.allclose(out[2], torch.full((2, 2), (0.25 * 1 + 0.25 * 2) / 0.5))


def test_q_schedule_decays_linearly_to_q_final():
    assert scheduled_q(0, 5, 0.2) == 1.0
    assert math.isclose(scheduled_q(4, 5, 0.2), 0.2)
    assert math.isclose(scheduled_q(2, 5, 0.2), 0.6)


def test_dp_noise_is_symmetric_with_the_calibrated_scale():
    gen = torch.Generator().manual_seed(0)
    sigma = sensitivity(mu=4.0, n_samples=1000) * 2.0
    assert math.isclose(sigma, 2 * math.sqrt(2) * 4 / 1000)
    noise = symmetric_gaussian(300, sigma, gen)
    assert torch.equal(noise, noise.T)
    upper = noise[torch.triu(torch.ones(300, 300, dtype=torch.bool))]
    assert abs(float(upper.std()) / sigma - 1.0) < 0.02  # 45,150 draws: std within 2%
    r = torch.eye(4)
    assert not torch.equal(privatize(r, sigma, gen), r)


def test_rdp_epsilon_grows_with_rounds_and_shrinks_with_noise():
    e1, e10 = epsilon(1.0, 1, 1e-5), epsilon(1.0, 10, 1e-5)
    assert 0 < e1 < e10
    assert epsilon(4.0, 10, 1e-5) < e10
    assert epsilon(1.0, 0, 1e-5) == 0.0


def test_replacing_one_sample_moves_r_by_at_most_the_sensitivity():
    """The bound the DP noise is calibrated to, checked on R itself rather than on its formula:
    R over n samples (two views each), one sample replaced by the worst case we can construct."""
    torch.manual_seed(0)
    n, d, mu = 50, 8, 4.0

    def r_of(z1, z0):
        return correlation(clip_norm(z1, mu), clip_norm(z0, mu))[0]

    z1, z0 = torch.randn(n, d) * 3, torch.randn(n, d) * 3
    worst = 0.0
    for trial in range(200):
        a1, a0 = z1.clone(), z0.clone()
        # replace sample 0 by a random one or by an orthogonal, norm-clipped adversary
        a1[0], a0[0] = (torch.randn(d) * 10, torch.randn(d) * 10) if trial % 2 else (-z1[0] * 10, -z0[0] * 10)
        worst = max(worst, float((r_of(a1, a0) - r_of(z1, z0)).norm()))
    bound = sensitivity(mu, n)
    assert worst <= bound + 1e-6
    assert worst > 0.5 * bound  # and the bound is not loose by orders of magnitude


def test_rbar_minus_renormalizes_over_the_clients_that_reported():
    corrs = {0: torch.full((2, 2), 1.0), 2: torch.full((2, 2), 3.0)}  # client 1 never reported
    q = {0: 0.25, 1: 0.25, 2: 0.5}
    out = rbar_minus(corrs, q)
    assert torch.allclose(out[1], torch.full((2, 2), (0.25 * 1 + 0.5 * 3) / 0.75))
    assert torch.allclose(out[0], torch.full((2, 2), 3.0))  # only client 2 is left: its R_j, not q_2 * R_j
