"""CIFAR ResNets ("option A" shortcuts, He et al. 2016), matching the shared weights' layout."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DEPTHS = {"cifar_resnet20": 3, "cifar_resnet32": 5, "cifar_resnet44": 7, "cifar_resnet56": 9, "cifar_resnet110": 18}


class PadShortcut(nn.Module):
    """Weightless shortcut: subsample by 2 and zero-pad planes // 4 channels on each side."""

    def __init__(self, planes: int):
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = PadShortcut(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: conv1/bn1, layer1-3 of n BasicBlocks (16, 32, 64 ch), pool, linear."""

    def __init__(self, blocks_per_layer: int, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._make_layer(16, 16, blocks_per_layer, 1)
        self.layer2 = self._make_layer(16, 32, blocks_per_layer, 2)
        self.layer3 = self._make_layer(32, 64, blocks_per_layer, 2)
        self.linear = nn.Linear(64, num_classes)

    @staticmethod
    def _make_layer(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def cifar_resnet(name: str, num_classes: int = 10) -> CifarResNet:
    """Build an untrained CIFAR ResNet by zoo name, e.g. ``cifar_resnet56``."""
    if name not in DEPTHS:
        raise ValueError(f"unknown CIFAR ResNet {name!r}; choose one of {sorted(DEPTHS)}")
    return CifarResNet(DEPTHS[name], num_classes)
