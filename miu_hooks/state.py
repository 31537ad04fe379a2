"""Flat ``str -> Tensor`` state, so every checkpoint is safetensors (no pickle)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["flatten_optimizer_state", "load_flat_optimizer_state", "prefixed", "unprefixed"]


def flatten_optimizer_state(
    optimizer: torch.optim.Optimizer, prefix: str = ""
) -> dict[str, Tensor]:
    """Return the per-parameter state of ``optimizer`` as ``{prefix}state.{i}.{key}`` tensors.

    Hyper-parameters (``param_groups``) are not included: they come from the
    config and the scheduler, which are replayed on resume.

    Example:
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
        >>> p.grad = torch.ones(2); opt.step()
        >>> sorted(flatten_optimizer_state(opt))
        ['state.0.momentum_buffer']
    """
    flat: dict[str, Tensor] = {}
    for idx, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            if value is None:
                continue
            tensor = value if isinstance(value, Tensor) else torch.tensor(value)
            flat[f"{prefix}state.{idx}.{key}"] = tensor.detach().clone().contiguous()
    return flat


def load_flat_optimizer_state(
    optimizer: torch.optim.Optimizer, flat: dict[str, Tensor], prefix: str = ""
) -> None:
    """Inverse of :func:`flatten_optimizer_state` (keys outside ``prefix`` are ignored)."""
    current = optimizer.state_dict()
    state: dict[int, dict[str, Any]] = {}
    for name, value in flat.items():
        if not name.startswith(f"{prefix}state."):
            continue
        idx_s, key = name[len(prefix) + len("state.") :].split(".", 1)
        state.setdefault(int(idx_s), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


def prefixed(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Return ``state`` with ``prefix`` prepended to every key."""
    return {f"{prefix}{k}": v for k, v in state.items()}


def unprefixed(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Return the entries of ``state`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
