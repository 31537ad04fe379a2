"""A tiny four-group problem shared by the engine tests (5 features, MLP 5-12-2)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


def toy_split(n: int = 96, seed: int = 0) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """Return ``(full, retain, forget)``: half of group 3 is the forget set."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    s = torch.randint(0, 2, (n,), generator=gen)
    x = torch.randn(n, 5, generator=gen) + y[:, None] + 0.5 * s[:, None]
    g = s + 2 * y
    forget_mask = (g == 3) & (torch.rand(n, generator=gen) < 0.5)
    full = TensorDataset(x, y, g)
    retain = TensorDataset(x[~forget_mask], y[~forget_mask], g[~forget_mask])
    forget = TensorDataset(x[forget_mask], y[forget_mask], g[forget_mask])
    return full, retain, forget


def toy_net(bn: bool = False) -> nn.Sequential:
    """Linear(5, 12) [-> BatchNorm1d] -> ReLU -> Linear(12, 2), seeded with 0."""
    torch.manual_seed(0)
    layers = (
        [nn.Linear(5, 12)] + ([nn.BatchNorm1d(12)] if bn else []) + [nn.ReLU(), nn.Linear(12, 2)]
    )
    return nn.Sequential(*layers)
