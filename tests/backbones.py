"""Small backbones the unit tests share (importable because tests/conftest.py puts this folder on sys.path)."""
import torch
from torch import nn

from selfxit.zoo.cifar_resnet import cifar_resnet


def scrambled_resnet20() -> nn.Module:
    """An untrained CIFAR ResNet-20 (seed 0) with non-trivial BatchNorm statistics, so outputs are not
    degenerate; frozen and in eval mode. Leaves the global RNG seeded at 0 plus what init drew."""
    torch.manual_seed(0)
    model = cifar_resnet("cifar_resnet20").eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.requires_grad_(False)
