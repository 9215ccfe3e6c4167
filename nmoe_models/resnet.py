"""ResNet20 feature extractor F (He et al. 2016, CIFAR variant), after akamaster's resnet.py.

Stages of 16/32/64 channels (times ``width``), three basic blocks each, option-B (1x1 conv)
shortcuts, global average pooling: ``features(x) -> (B, 64 * width)``. With width 1 and 3 input
channels it has 271,824 parameters (the paper's 0.27M), about 41M MACs per 32x32 image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """The shared feature extractor: images (B, C, H, W) -> latents (B, 64 * width)."""

    def __init__(self, in_channels: int = 1, width: int = 1) -> None:
        super().__init__()
        assert in_channels in (1, 3), "ResNet20 takes 1-channel (Fashion-MNIST) or 3-channel (CIFAR) images"
        w = (16 * width, 32 * width, 64 * width)
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        blocks: list[nn.Module] = []
        c_in = w[0]
        for stage, c_out in enumerate(w):
            for b in range(3):
                blocks.append(BasicBlock(c_in, c_out, 2 if (stage > 0 and b == 0) else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = w[2]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))  # (B, 16w, H, W)
        out = self.blocks(out)  # (B, 64w, H/4, W/4)
        return out.mean(dim=(2, 3))  # (B, 64w)

    features = forward


def resnet20(in_channels: int = 1, width: int = 1, channels_last: bool = True) -> ResNet20:
    net = ResNet20(in_channels, width)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


def num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
