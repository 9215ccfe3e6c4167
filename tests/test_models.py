"""Models: shapes, parameter counts, top-k routing and the mixture combiner."""

import pytest
import torch

from nmoe_models.moe import Classifier, ContrastiveModel, Gate, combine, expert, mixture_nll, topk_weights
from nmoe_models.resnet import num_params, resnet20


def test_resnet20_width1_has_about_027m_parameters():
    # Prepare / Execute
    rgb, gray = resnet20(3, 1), resnet20(1, 1)
    # Assert: the paper's 0.27M (CIFAR, 3 channels); 1 channel drops 2*16*9 weights of the stem
    assert num_params(rgb) == 271_824
    assert num_params(gray) == num_params(rgb) - 2 * 16 * 9
    assert 0.26e6 < num_params(rgb) < 0.28e6


@pytest.mark.parametrize(("channels", "size", "width"), [(1, 28, 1), (3, 32, 1), (1, 28, 2)])
def test_resnet20_latents(channels, size, width):
    net = resnet20(channels, width).eval()
    h = net(torch.randn(5, channels, size, size).contiguous(memory_format=torch.channels_last))
    assert h.shape == (5, 64 * width)
    assert net.out_dim == 64 * width


def test_width_multiplier_scales_parameters_quadratically():
    assert 3.5 < num_params(resnet20(1, 2)) / num_params(resnet20(1, 1)) < 4.1


def test_expert_is_a_four_layer_mlp():
    e = expert(64, 32, 10)
    assert isinstance(e[0], torch.nn.BatchNorm1d)  # standardizes the latents
    linears = [m for m in e if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 32), (32, 32), (32, 10)]


def test_gate_names_shared_and_local_layers():
    g = Gate(64, 16, experts=5, layers=4, shared_layers=3)
    linear = {n.rsplit(".", 1)[0] for n, p in g.named_parameters() if p.dim() == 2}
    assert sorted(linear) == ["local.0", "shared.1", "shared.3", "shared.5"]  # 3 shared layers, 1 local
    assert all(n.startswith(("shared.", "local.")) for n in g.state_dict())
    assert isinstance(g.shared[0], torch.nn.BatchNorm1d)
    assert g.local[-1].out_features == 5
    assert isinstance(Gate(64, 16, 5, 4, shared_layers=0).local[0], torch.nn.BatchNorm1d)
    assert g(torch.randn(7, 64)).shape == (7, 5)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_topk_weights_sum_to_one_over_exactly_k_experts(k):
    logits = torch.randn(64, 5)
    w = topk_weights(logits, k)
    assert torch.allclose(w.sum(1), torch.ones(64))
    assert bool(((w > 0).sum(1) == k).all())
    # the chosen experts are the k largest logits
    assert torch.equal((w > 0), torch.zeros_like(w, dtype=torch.bool).scatter(1, logits.topk(k, 1).indices, True))


def test_topk_noise_changes_choices_and_is_reproducible():
    logits = torch.zeros(200, 4)
    a = topk_weights(logits, 1, noise_std=1.0, generator=torch.Generator().manual_seed(1))
    b = topk_weights(logits, 1, noise_std=1.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert len(set(a.argmax(1).tolist())) == 4


def test_combine_and_mixture_nll_match_a_direct_computation():
    w = topk_weights(torch.randn(6, 3), 2)
    lp = torch.log_softmax(torch.randn(6, 3, 4), dim=2)
    y = torch.randint(0, 4, (6,))
    direct = torch.zeros(6, 4)
    for b in range(6):
        for j in range(3):
            direct[b] += w[b, j] * lp[b, j].exp()
    assert torch.allclose(combine(w, lp), direct, atol=1e-6)
    expected = -torch.log(direct[torch.arange(6), y]).mean()
    assert torch.allclose(mixture_nll(w, lp, y), expected, atol=1e-5)


def test_classifier_and_contrastive_model_shapes():
    f = resnet20(1, 1)
    assert Classifier(f, 32, 10)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert ContrastiveModel(resnet20(1, 1))(torch.randn(2, 1, 28, 28)).shape == (2, 64)
