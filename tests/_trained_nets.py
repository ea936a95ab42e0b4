"""Small PyTorch networks for tests/test_trained.py: factories ``tests._trained_nets:name``.

Imported only by the trained-kernel tests (and their workers), which skip without torch.
"""

from __future__ import annotations

import torch
from torch import nn


def mlp_tanh() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def mlp_relu() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 4))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 4, 2, padding=0, bias=False),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def cnn_nobias_maxpool() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=1, padding=2, dilation=2, bias=False),
        nn.Tanh(),
        nn.MaxPool2d(3),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 2),
    )


def mlp_layernorm() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))


def cnn_batchnorm() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.AvgPool2d(4),
        nn.Flatten(),
        nn.Linear(12, 3),
    )
    with torch.no_grad():  # running statistics other than the defaults
        net[1].running_mean.uniform_(-0.5, 0.5)
        net[1].running_var.uniform_(0.5, 2.0)
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    return net


class _OneD(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)[:, 0]


def one_d() -> nn.Module:
    return _OneD()


class _NoGrad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.body(x)


def no_grad() -> nn.Module:
    return _NoGrad()


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(torch.tanh(self.body(x)))


def shared() -> nn.Module:
    return _Shared()


def mlp_small_regression() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))


def mlp_small_classifier() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3))
