"""Classifier networks as a dict of named constructors `(num_classes, in_channels, image_size) -> nn.Module`.

- `cnn_small`: a 4-layer strided CNN (~0.39M parameters) for 28x28 images; fast on CPU, any size >= 16.
- `cnn_medium`: the same CNN at 1.5 times the width (~0.87M parameters, 384-d pooled features).
- `wrn_28_2`: Wide ResNet 28-2 (Zagoruyko & Komodakis, BMVC 2016) as used by FixMatch (Sohn et al., NeurIPS
  2020) and USB: leaky ReLU 0.1, BatchNorm momentum 0.001, for 32x32 images.

Every network takes float images (N, C, H, W) in [-1, 1] and returns logits (N, num_classes).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


class CNNSmall(nn.Module):
    """Conv-BN-ReLU x4 (strides 2, 2, 1, 2) -> global average pool -> linear; 28x28 -> 4x4 features."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, w, 2),     # (N, w, H/2, W/2)
            *_conv_bn_relu(w, 2 * w, 2),           # (N, 2w, H/4, W/4)
            *_conv_bn_relu(2 * w, 4 * w, 1),       # (N, 4w, H/4, W/4)
            *_conv_bn_relu(4 * w, 8 * w, 2),       # (N, 8w, H/8, W/8)
        )
        self.fc = nn.Linear(8 * w, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        h = F.adaptive_avg_pool2d(h, 1).flatten(1)  # (N, 8w)
        return self.fc(h)


class _WideBlock(nn.Module):
    """Pre-activation residual block of WRN with FixMatch's leaky ReLU and slow BatchNorm."""

    def __init__(self, c_in: int, c_out: int, stride: int, activate_before_residual: bool = False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in, momentum=0.001, eps=0.001)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, momentum=0.001, eps=0.001)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None if c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)
        self.activate_before_residual = activate_before_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.leaky_relu(self.bn1(x), 0.1)
        if self.shortcut is not None or self.activate_before_residual:
            x = act                                 # the shortcut sees the activated input (FixMatch/USB)
        out = self.conv1(act)
        out = self.conv2(F.leaky_relu(self.bn2(out), 0.1))
        return out + (x if self.shortcut is None else self.shortcut(x))


class WideResNet(nn.Module):
    """WRN-depth-widen: three groups of (depth-4)/6 blocks at 32, 16, 8 px; FixMatch's initialisation.

    `features(x)` is the map before pooling, (N, 64*widen, H/4, W/4), as `CNNSmall.features`: the domain features
    of the evaluation's oracle (evaluate/domain.py) are its global average; `fc` of that average is `forward`.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, depth: int = 28, widen: int = 2):
        super().__init__()
        n = (depth - 4) // 6
        ch = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, 1, 1, bias=False)
        blocks = []
        for g, stride in enumerate((1, 2, 2)):
            for i in range(n):
                c_in = ch[g] if i == 0 else ch[g + 1]
                blocks.append(_WideBlock(c_in, ch[g + 1], stride if i == 0 else 1,
                                         activate_before_residual=(g == 0 and i == 0)))
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(ch[3], momentum=0.001, eps=0.001)
        self.fc = nn.Linear(ch[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features before pooling: float (N, C, H, W) -> (N, 64*widen, H/4, W/4)."""
        h = self.blocks(self.conv1(x))                       # (N, 64*widen, H/4, W/4)
        return F.leaky_relu(self.bn(h), 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)   # (N, 64*widen)
        return self.fc(h)


def _at_least_16(name: str, image_size: int) -> None:
    if image_size < 16:
        raise ValueError(f"{name} needs images of at least 16x16, got {image_size}")


def cnn_small(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Small CNN for 28x28 (any side >= 16)."""
    _at_least_16("cnn_small", image_size)
    return CNNSmall(num_classes, in_channels)


def cnn_medium(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """cnn_small at width 48 (features 384-d) for 28x28 (any side >= 16)."""
    _at_least_16("cnn_medium", image_size)
    return CNNSmall(num_classes, in_channels, width=48)


def wrn_28_2(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """WRN-28-2 (1.5M parameters) for 32x32 images."""
    _at_least_16("wrn_28_2", image_size)
    return WideResNet(num_classes, in_channels, depth=28, widen=2)


NETWORKS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "cnn_small": cnn_small,
    "cnn_medium": cnn_medium,
    "wrn_28_2": wrn_28_2,
}


def build_network(name: str, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    """Look up `name` in NETWORKS and build it; unknown names list the valid ones."""
    if name not in NETWORKS:
        raise ValueError(f"unknown classifier network {name!r} (stage1.network must be one of {sorted(NETWORKS)})")
    return NETWORKS[name](num_classes, in_channels, image_size)
