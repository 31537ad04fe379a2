"""Check that an unlearning entry point leaves no trace on the user's model.

:func:`snapshot` records what a run must give back unchanged once its hooks are
removed; :func:`assert_no_trace` compares the model with that record:

* the model's class and its ``state_dict`` keys, with each tensor's shape, dtype
  and device (and, with ``same_values=True``, the values: for entry points that
  do not train, such as ``attach`` + ``remove``);
* every module's hook dicts (``_forward_hooks``, ``_forward_pre_hooks``,
  ``_backward_hooks``, ``_backward_pre_hooks``, the ``*_with_kwargs`` and
  ``*_always_called`` dicts, the state-dict hooks: every instance attribute
  whose name contains ``hooks``), the parameters' tensor hooks, and torch's
  global module hooks;
* each parameter's ``requires_grad``, each module's ``training`` flag, and that
  no module got an instance attribute ``forward`` (a patched forward).

:func:`hooks_of` lists the hooks alone (empty for a clean model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as torch_module

__all__ = ["ModelTrace", "assert_no_trace", "hooks_of", "snapshot"]

_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_forward_hooks_always_called",
    "_global_forward_hooks_with_kwargs",
)


def _ids(value: Any) -> tuple[Any, ...] | None:
    """The keys of a hook dict (``None`` for an empty or absent one)."""
    if isinstance(value, dict) and value:
        return tuple(sorted(value, key=repr))
    return None


def hooks_of(model: nn.Module) -> dict[str, tuple[Any, ...]]:
    """Every non-empty hook dict on ``model``, its parameters and torch's globals, by place."""
    found: dict[str, tuple[Any, ...]] = {}
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if "hooks" in attr and (ids := _ids(value)) is not None:
                found[f"{name or '<model>'}.{attr}"] = ids
    for name, param in model.named_parameters():
        for attr in ("_backward_hooks", "_post_accumulate_grad_hooks"):
            if (ids := _ids(getattr(param, attr, None))) is not None:
                found[f"{name}.{attr}"] = ids
    for attr in _GLOBAL_HOOKS:
        if (ids := _ids(getattr(torch_module, attr, None))) is not None:
            found[f"torch.nn.modules.module.{attr}"] = ids
    return found


@dataclass(frozen=True)
class ModelTrace:
    """What :func:`snapshot` records of a model."""

    cls: type
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype, torch.device]]
    values: dict[str, torch.Tensor]
    hooks: dict[str, tuple[Any, ...]]
    requires_grad: dict[str, bool]
    training: dict[str, bool]
    patched: tuple[str, ...]


def _patched(model: nn.Module) -> tuple[str, ...]:
    return tuple(name or "<model>" for name, m in model.named_modules() if "forward" in vars(m))


def snapshot(model: nn.Module) -> ModelTrace:
    """Record ``model``'s structure, hooks, flags and (a copy of) its state_dict values."""
    state = model.state_dict()
    return ModelTrace(
        cls=type(model),
        tensors={k: (tuple(v.shape), v.dtype, v.device) for k, v in state.items()},
        values={k: v.detach().clone() for k, v in state.items()},
        hooks=hooks_of(model),
        requires_grad={k: p.requires_grad for k, p in model.named_parameters()},
        training={k or "<model>": m.training for k, m in model.named_modules()},
        patched=_patched(model),
    )


def assert_no_trace(model: nn.Module, before: ModelTrace, *, same_values: bool = False) -> None:
    """Assert ``model`` matches ``before`` (see the module docstring); values only if asked."""
    after = snapshot(model)
    assert after.cls is before.cls, f"model class changed: {before.cls} -> {after.cls}"
    assert list(after.tensors) == list(before.tensors), "state_dict keys changed"
    changed = [k for k in before.tensors if after.tensors[k] != before.tensors[k]]
    assert not changed, f"shape/dtype/device changed: {changed}"
    left = {k: v for k, v in after.hooks.items() if before.hooks.get(k) != v}
    gone = {k: v for k, v in before.hooks.items() if after.hooks.get(k) != v}
    assert not left and not gone, f"hooks left behind: {left}; hooks removed: {gone}"
    flips = [k for k, v in before.requires_grad.items() if after.requires_grad[k] != v]
    assert not flips, f"requires_grad changed: {flips}"
    modes = [k for k, v in before.training.items() if after.training[k] != v]
    assert not modes, f"training flag changed: {modes}"
    assert after.patched == before.patched, f"instance forward set on {after.patched}"
    if same_values:
        diff = [k for k, v in before.values.items() if not torch.equal(after.values[k], v)]
        assert not diff, f"state_dict values changed: {diff}"
