"""Models of the benchmark (seeded, built from code), their training and arithmetic cost."""

from __future__ import annotations

from typing import Any

import torch
from bench_settings import Settings
from torch import nn
from torch.utils.data import DataLoader

from miu_hooks import TrainConfig
from miu_hooks.data import forward_logits
from miu_hooks.functional import checked_cross_entropy
from miu_hooks.unlearn import build_optimizer, build_scheduler


def mlp(seed: int, s: Settings) -> nn.Module:
    """Flatten -> 3*size*size -> hidden -> 2, seeded (the same init for Original and Retrain)."""
    torch.manual_seed(seed)
    d, (h1, h2) = 3 * s.size * s.size, s.hidden
    return nn.Sequential(
        nn.Flatten(), nn.Linear(d, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 2)
    )


def convnet(seed: int) -> nn.Module:
    """A small conv backbone (~0.1M params, 3x16x16 inputs) for the overhead micro-benchmark."""
    torch.manual_seed(seed)

    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2),
    )  # fmt: skip


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with batch norm and an identity or 1x1 shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(seed: int, width: int = 64, num_classes: int = 2) -> nn.Module:
    """ResNet-18 (blocks [2, 2, 2, 2], 11.2M params, 512-d features) with a 3x3 stem.

    The paper's backbone, for small inputs (CIFAR-style stem, no max-pool); the
    head is the last ``Linear`` (input: the 512-d penultimate features).
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU()]  # fmt: skip
    cin = width
    for stage in range(4):
        cout = width * 2**stage
        layers += [BasicBlock(cin, cout, 1 if stage == 0 else 2), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def linear_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates per sample of the Linear and Conv2d layers (forward)."""
    total = 0

    def count(module: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        w = module.weight  # type: ignore[union-attr]
        spatial = out[0, 0].numel() if isinstance(module, nn.Conv2d) else 1
        total += w.numel() * spatial

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Linear, nn.Conv2d))]  # fmt: skip
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    return total


def flop_bound(model_macs: int, feature_dim: int, num_groups: int,
               hidden: int) -> tuple[float, float]:  # fmt: skip
    """Arithmetic-only MIU/CE retain-step ratios (cache on, cache off).

    A CE step is ~3 model forwards (forward + backward). With the cache, MIU adds
    T_u's forward (the z projection once, two group heads) and its backward to z
    (~2 forwards); T_o is a table lookup. Without it, the original model's forward
    and T_o's forward come on top.
    """
    critic = (feature_dim + num_groups) * hidden + hidden
    cached = 1.0 + 3.0 * critic / (3.0 * model_macs)
    return cached, cached + (model_macs + critic) / (3.0 * model_macs)


def train_original(model: nn.Module, data: Any, cfg: TrainConfig) -> nn.Module:
    """ERM on D with the Retrain recipe (same optimiser, schedule and batch size)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, generator=gen)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    model.train()
    for _ in range(cfg.epochs):
        for x, y, _g in loader:
            opt.zero_grad(set_to_none=True)
            checked_cross_entropy(forward_logits(model, x), y).backward()
            opt.step()
        sched.step()
    return model
