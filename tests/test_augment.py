"""Augmentations: per-sample parameters, reproducibility, agreement with torchvision, output format."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from nmoe.errors import DataError
from nmoe_models.augment import (
    RECIPES,
    WEAK_PADDING,
    _adjust,
    color_jitter,
    crop_params,
    pad_crop_flip,
    resized_crop,
    supervised_augment,
    two_views,
)
from nmoe_models.data import DATASET_STATS, to_float


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int, c: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (b, c, size, size), dtype=torch.uint8, generator=gen(seed))


@pytest.mark.parametrize(("dataset", "c", "size"), [("fashion_mnist", 1, 28), ("cifar10", 3, 32),
                                                    ("synthetic", 1, 28)])
def test_two_views_shapes_dtypes_and_normalized_range(dataset, c, size):
    x = images(16, c, size)

    v1, v2 = two_views(x, dataset, gen())

    assert v1.shape == v2.shape == (16, c, size, size)
    assert v1.dtype == v2.dtype == torch.float32
    mean, std = (torch.tensor(v).view(1, c, 1, 1) for v in DATASET_STATS[dataset])
    for v in (v1, v2):
        assert (v >= (0 - mean) / std - 1e-5).all() and (v <= (1 - mean) / std + 1e-5).all()
    assert not torch.equal(v1, v2)


@pytest.mark.parametrize(("dataset", "c", "size"), [("fashion_mnist", 1, 28), ("cifar10", 3, 32)])
def test_each_sample_gets_its_own_random_parameters(dataset, c, size):
    x = images(1, c, size).expand(64, -1, -1, -1)  # the same image 64 times

    v1, _ = two_views(x, dataset, gen())
    weak = supervised_augment(x, dataset, "weak", gen())

    assert len(torch.unique(v1.flatten(1), dim=0)) >= 60
    assert len(torch.unique(weak.flatten(1), dim=0)) >= 20  # 81 offsets x 2 flips


def test_the_generator_alone_decides_the_views():
    x = images(32, 3, 32)
    torch.manual_seed(1)
    a = two_views(x, "cifar10", gen(5))
    torch.manual_seed(2)  # the global RNG must not matter
    b = two_views(x, "cifar10", gen(5))
    c = two_views(x, "cifar10", gen(6))

    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_float_input_in_unit_range_matches_uint8_input():
    x = images(8, 3, 32)
    a = two_views(x, "cifar10", gen(3))
    b = two_views(x.float() / 255, "cifar10", gen(3))
    assert torch.allclose(a[0], b[0], atol=1e-5)


def test_crop_params_follow_the_scale_and_ratio_ranges():
    top, left, h, w = crop_params(4096, 32, 32, (0.2, 1.0), (3 / 4, 4 / 3), gen())

    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    area = (h * w).float() / 1024
    assert area.min() > 0.17 and area.max() <= 1.0  # 0.2 minus integer rounding
    ratio = w.float() / h.float()
    assert ratio.min() > 0.6 and ratio.max() < 1.6
    assert len(torch.unique(torch.stack([top, left, h, w], 1), dim=0)) > 1000


def test_resized_crop_and_flip_match_torchvision_per_sample():
    x = torch.rand(12, 3, 32, 32, generator=gen())
    top, left, h, w = crop_params(12, 32, 32, (0.2, 1.0), (3 / 4, 4 / 3), gen(1))
    flip = torch.arange(12) % 2 == 1

    out = resized_crop(x, top, left, h, w, 32, flip)

    for i in range(12):
        ref = TF.resized_crop(x[i], int(top[i]), int(left[i]), int(h[i]), int(w[i]), [32, 32],
                              antialias=False)
        ref = TF.horizontal_flip(ref) if flip[i] else ref
        assert torch.allclose(out[i], ref, atol=1e-5), i


@pytest.mark.parametrize(("op", "fn"), [(0, TF.adjust_brightness), (1, TF.adjust_contrast),
                                        (2, TF.adjust_saturation), (3, TF.adjust_hue)])
def test_colour_operations_match_torchvision_per_sample(op, fn):
    x = torch.rand(6, 3, 16, 16, generator=gen())
    factors = torch.tensor([-0.1, -0.05, 0.0, 0.02, 0.07, 0.1]) if op == 3 else \
        torch.tensor([0.6, 0.8, 1.0, 1.1, 1.3, 1.4])

    out = _adjust(op, x, factors)

    for i in range(6):
        assert torch.allclose(out[i], fn(x[i], float(factors[i])), atol=1e-5), i


def test_jitter_leaves_about_a_fifth_of_the_samples_alone():
    x = torch.rand(2000, 3, 4, 4, generator=gen())
    out = color_jitter(x, RECIPES["cifar10"], gen(1))
    untouched = (out == x).flatten(1).all(1).float().mean().item()
    assert 0.15 < untouched < 0.25  # RandomApply(p=0.8)


def test_weak_augmentation_is_a_padded_shift_and_maybe_a_flip():
    x = images(6, 1, 28)
    out = pad_crop_flip(x, WEAK_PADDING, gen())
    padded = F.pad(x, (WEAK_PADDING,) * 4)
    span = 2 * WEAK_PADDING + 1
    for i in range(6):
        candidates = [c for dy in range(span) for dx in range(span)
                      for c in (padded[i, :, dy:dy + 28, dx:dx + 28],
                                padded[i, :, dy:dy + 28, dx:dx + 28].flip(-1))]
        assert any(torch.equal(out[i], c) for c in candidates), i


def test_supervised_levels():
    x = images(8, 1, 28)
    assert torch.equal(supervised_augment(x, "fashion_mnist", "none", gen()), to_float(x, "fashion_mnist"))
    for level in ("weak", "strong"):
        out = supervised_augment(x, "fashion_mnist", level, gen())
        assert out.shape == (8, 1, 28, 28) and out.dtype == torch.float32
    with pytest.raises(DataError):
        supervised_augment(x, "fashion_mnist", "extreme", gen())  # type: ignore[arg-type]
