"""Batched augmentations with per-sample random parameters, for FedSC's views and supervised training.

A torchvision.transforms.v2 transform applied to a (B, C, H, W) tensor draws its random parameters
once for the whole batch: every image gets the same crop, flip and jitter, which would make FedSC's
two views nearly useless as a contrastive signal. So the parameters are drawn here per sample, with
v2's own rules (RandomResizedCrop's 10 attempts and centre-crop fallback, ColorJitter's factor ranges
and random order of its four operations), and applied vectorized:

- resized crop and horizontal flip: one affine_grid + grid_sample per batch;
- brightness / contrast / saturation / hue: the formulas of v2.functional.adjust_* with per-sample
  factors, each sample in its own random order of the four operations;
- grayscale and the pad-and-crop of the weak recipe: torch.where and one gather.

All randomness comes from the torch.Generator passed in, so a seed reproduces the views exactly.
Inputs are uint8 (B, C, H, W), or float in [0, 1]; outputs are normalized float32 (B, C, H, W).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from nmoe.errors import DataError

from .data import normalize, to_float

__all__ = [
    "SSLRecipe",
    "RECIPES",
    "crop_params",
    "resized_crop",
    "color_jitter",
    "random_grayscale",
    "pad_crop_flip",
    "ssl_view",
    "two_views",
    "supervised_augment",
]

_GRAY = (0.2989, 0.587, 0.114)  # v2's rgb_to_grayscale weights


@dataclass(frozen=True)
class SSLRecipe:
    """One SSL view: RandomResizedCrop, flip, ColorJitter with probability, RandomGrayscale."""

    size: int
    """Output height = width."""
    scale: tuple[float, float] = (0.2, 1.0)
    """RandomResizedCrop area range (FedSC / SimCLR on CIFAR: 0.2-1.0)."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """RandomResizedCrop aspect-ratio range (v2's default)."""
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.0
    hue: float = 0.0
    grayscale_p: float = 0.0


RECIPES: dict[str, SSLRecipe] = {
    # FedSC's CIFAR recipe.
    "cifar10": SSLRecipe(32, saturation=0.4, hue=0.1, grayscale_p=0.2),
    # One channel: saturation, hue and grayscale do nothing, so only brightness and contrast remain.
    "fashion_mnist": SSLRecipe(28),
    "synthetic": SSLRecipe(28),
}

WEAK_PADDING = 4
"""Pad-and-crop of the weak recipe, in pixels (RandomCrop(size, padding=4), the CIFAR standard)."""


def _recipe(dataset: str) -> SSLRecipe:
    if dataset not in RECIPES:
        raise DataError(f"no augmentation recipe for dataset {dataset!r}; known: {', '.join(RECIPES)}")
    return RECIPES[dataset]


def _unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1]; float is taken to be in [0, 1] already."""
    if x.ndim != 4:
        raise DataError(f"expected a batch (B, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.to(torch.float32).mul_(1.0 / 255.0)
    if not x.is_floating_point():
        raise DataError(f"expected uint8 or float images, got {x.dtype}")
    return x.to(torch.float32)


def _uniform(n: int, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen, dtype=torch.float64).mul_(high - low).add_(low)


# --------------------------------------------------------------------------- geometry


def crop_params(batch: int, height: int, width: int, scale: tuple[float, float],
                ratio: tuple[float, float], gen: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample (top, left, h, w), int64 (B,) each, by v2.RandomResizedCrop's rule.

    Ten attempts per sample (area and log-uniform aspect ratio), the first that fits wins; samples
    with none fall back to the centre crop clamped to the ratio range, as in torchvision.
    """
    area = height * width
    tries = 10
    target = area * _uniform(batch * tries, *scale, gen).view(batch, tries)
    log_r = _uniform(batch * tries, math.log(ratio[0]), math.log(ratio[1]), gen).view(batch, tries)
    aspect = torch.exp(log_r)
    w_try = torch.round(torch.sqrt(target * aspect))
    h_try = torch.round(torch.sqrt(target / aspect))
    fits = (w_try > 0) & (w_try <= width) & (h_try > 0) & (h_try <= height)
    first = torch.argmax(fits.to(torch.int8), dim=1, keepdim=True)  # first True (0 when none)
    any_fit = fits.any(dim=1)

    in_ratio = width / height
    if in_ratio < min(ratio):
        fb_w, fb_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fb_w, fb_h = int(round(height * max(ratio))), height
    else:
        fb_w, fb_h = width, height
    w = torch.where(any_fit, w_try.gather(1, first).squeeze(1), float(fb_w)).to(torch.int64)
    h = torch.where(any_fit, h_try.gather(1, first).squeeze(1), float(fb_h)).to(torch.int64)

    u = torch.rand(2, batch, generator=gen, dtype=torch.float64)
    top = torch.floor(u[0] * (height - h + 1)).to(torch.int64)
    left = torch.floor(u[1] * (width - w + 1)).to(torch.int64)
    top = torch.where(any_fit, top, (height - h) // 2)
    left = torch.where(any_fit, left, (width - w) // 2)
    return top, left, h, w


def resized_crop(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, h: torch.Tensor,
                 w: torch.Tensor, size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop box (top, left, h, w) of each sample resized to size x size (bilinear), then flipped
    horizontally where `flip`; float (B, C, H, W) -> (B, C, size, size), one grid_sample.

    With align_corners=False, output pixel u in normalized coordinates maps to input
    x = (w / W) u + (2 left + w) / W - 1; a flip negates the slope.
    """
    b, c, height, width = x.shape
    dt = x.dtype
    sx = w.to(dt) / width
    sy = h.to(dt) / height
    tx = (2 * left + w).to(dt) / width - 1
    ty = (2 * top + h).to(dt) / height - 1
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x.device), [b, c, size, size], align_corners=False)  # (B, S, S, 2)
    # Clamp to the centres of the box's edge pixels, as interpolate clamps to the cropped image;
    # this makes the result equal v2.functional.resized_crop (+ flip) up to float rounding.
    lo = torch.stack([(2 * left + 1).to(dt) / width - 1, (2 * top + 1).to(dt) / height - 1], 1)
    hi = torch.stack([(2 * (left + w) - 1).to(dt) / width - 1, (2 * (top + h) - 1).to(dt) / height - 1], 1)
    lo, hi = (t.to(x.device).view(b, 1, 1, 2) for t in (lo, hi))
    grid = torch.maximum(torch.minimum(grid, hi), lo)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def pad_crop_flip(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """RandomCrop(size, padding, fill=0) + RandomHorizontalFlip per sample, any dtype, one gather."""
    b, c, height, width = x.shape
    padded = F.pad(x, (padding,) * 4)
    offs = torch.randint(0, 2 * padding + 1, (2, b), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    rows = offs[0, :, None] + torch.arange(height)  # (B, H)
    cols = offs[1, :, None] + torch.arange(width)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    dev = x.device
    bi = torch.arange(b, device=dev).view(b, 1, 1, 1)
    ci = torch.arange(c, device=dev).view(1, c, 1, 1)
    return padded[bi, ci, rows.to(dev)[:, None, :, None], cols.to(dev)[:, None, None, :]]


# --------------------------------------------------------------------------- colour


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luminance of float images with 1 or 3 channels."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (r * _GRAY[0] + g * _GRAY[1] + b * _GRAY[2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = f.view(-1, 1, 1, 1)
    return (x * f + other * (1 - f)).clamp_(0.0, 1.0)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    flat = delta == 0
    s = delta / torch.where(flat, torch.ones_like(maxc), maxc)
    d = torch.where(flat, torch.ones_like(delta), delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(flat, torch.zeros_like(h), h)
    h = (h / 6.0).remainder(1.0)
    return torch.stack((h, s, maxc), 1)


# hsv -> rgb: sector i of the hue picks each output channel from (v, p, q, t).
_SECTOR = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]])


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    h6 = h * 6.0
    i = torch.floor(h6)
    f = h6 - i
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), 1)  # (B, 4, H, W)
    sector = i.to(torch.int64).remainder(6)
    index = _SECTOR.to(x.device)[:, sector].movedim(0, 1)  # (B, 3, H, W)
    return vpqt.gather(1, index)


def _adjust(op: int, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    if op == 0:  # brightness
        return (x * f.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
    if op == 1:  # contrast: blend with the mean luminance of each image
        return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)
    if op == 2:  # saturation: blend with the grayscale image
        return _blend(x, _gray(x), f)
    hsv = _rgb_to_hsv(x)  # hue
    hsv[:, 0] = (hsv[:, 0] + f.view(-1, 1, 1)).remainder(1.0)
    return _hsv_to_rgb(hsv)


def color_jitter(x: torch.Tensor, recipe: SSLRecipe, gen: torch.Generator) -> torch.Tensor:
    """RandomApply(ColorJitter(b, c, s, h), p) with per-sample factors and per-sample op order.

    float (B, C, H, W) in [0, 1] -> same. Saturation and hue are skipped for 1-channel images
    (as v2 does), so gray images only draw brightness and contrast.
    """
    b = x.shape[0]
    color = x.shape[1] == 3
    ranges = [(1 - recipe.brightness, 1 + recipe.brightness), (1 - recipe.contrast, 1 + recipe.contrast),
              (1 - recipe.saturation, 1 + recipe.saturation), (-recipe.hue, recipe.hue)]
    strengths = [recipe.brightness, recipe.contrast, recipe.saturation if color else 0.0,
                 recipe.hue if color else 0.0]
    factors = torch.stack([_uniform(b, max(lo, 0.0) if k < 3 else lo, hi, gen)
                           for k, (lo, hi) in enumerate(ranges)], 1).to(x.dtype)  # (B, 4)
    order = torch.rand(b, 4, generator=gen).argsort(1)  # each row a random permutation of the 4 ops
    applied = torch.rand(b, generator=gen) < recipe.jitter_p
    out = x.clone()
    for stage in range(4):
        for op in range(4):
            if strengths[op] <= 0:
                continue
            idx = (applied & (order[:, stage] == op)).nonzero().squeeze(1)
            if idx.numel():
                dev_idx = idx.to(x.device)
                out[dev_idx] = _adjust(op, out[dev_idx], factors[idx, op].to(x.device))
    return out


def random_grayscale(x: torch.Tensor, p: float, gen: torch.Generator) -> torch.Tensor:
    """RandomGrayscale(p) per sample: selected RGB images become 3 equal luminance channels."""
    pick = torch.rand(x.shape[0], generator=gen) < p
    if x.shape[1] == 1 or not bool(pick.any()):
        return x
    return torch.where(pick.to(x.device).view(-1, 1, 1, 1), _gray(x).expand_as(x), x)


# --------------------------------------------------------------------------- recipes


def ssl_view(x: torch.Tensor, dataset: str, gen: torch.Generator) -> torch.Tensor:
    """One augmented view per sample: resized crop + flip, jitter, grayscale, normalize."""
    r = _recipe(dataset)
    x01 = _unit(x)
    b, _, height, width = x01.shape
    top, left, h, w = crop_params(b, height, width, r.scale, r.ratio, gen)
    flip = torch.rand(b, generator=gen) < r.flip_p
    out = resized_crop(x01, top, left, h, w, r.size, flip.to(x01.device))
    if r.jitter_p > 0:
        out = color_jitter(out, r, gen)
    if r.grayscale_p > 0:
        out = random_grayscale(out, r.grayscale_p, gen)
    return normalize(out, dataset)


def two_views(x: torch.Tensor, dataset: str, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """FedSC's two independently augmented views of each sample, normalized float32 (B, C, S, S)."""
    views = ssl_view(torch.cat([x, x]), dataset, gen)  # one pass over 2B rows: fewer kernel launches
    v1, v2 = views.chunk(2)
    return v1, v2


def supervised_augment(x: torch.Tensor, dataset: str, level: Literal["none", "weak", "strong"],
                       gen: torch.Generator) -> torch.Tensor:
    """Augmentation for the supervised stages: 'none'; 'weak' = pad-and-crop + flip; 'strong' = one
    SSL view. Normalized float32 (B, C, H, W)."""
    _recipe(dataset)
    if level == "none":
        return to_float(x, dataset) if x.dtype == torch.uint8 else normalize(_unit(x), dataset)
    if level == "weak":
        out = pad_crop_flip(x, WEAK_PADDING, gen)
        return to_float(out, dataset) if out.dtype == torch.uint8 else normalize(_unit(out), dataset)
    if level == "strong":
        return ssl_view(x, dataset, gen)
    raise DataError(f"augmentation level must be none, weak or strong (got {level!r})")
