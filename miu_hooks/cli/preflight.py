"""Checks with the loaded model, before ``miu-unlearn`` evaluates or trains anything.

:func:`preflight` runs :func:`miu_hooks.validation.check_run` (settings, split,
labels against groups and classes, NaN inputs, the model's output and the
feature tap) and one forward on the first sample of ``--test`` and ``--val``,
so that inputs that do not fit the model (a wrong ``--image-size``, a test set of
another size) or a wrong tap stop the run with their own exit code, not after
the original model's evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from miu_hooks.cli.data_index import DataIndex
from miu_hooks.config import TrainConfig
from miu_hooks.data import forward_logits
from miu_hooks.data_checks import one_sample_inputs
from miu_hooks.errors import GroupRangeError, InputMismatchError, MIUError
from miu_hooks.validation import check_run, raise_first

__all__ = ["check_eval_set", "preflight"]


def check_eval_set(model: nn.Module, data: Dataset, index: DataIndex, what: str) -> None:
    """One evaluation forward of ``model`` on the first sample of an evaluation set.

    Raises:
        InputMismatchError: The forward fails on it (e.g. images of another size).
        GroupRangeError: A label of the set is outside the model's classes.
    """
    keys = {"input_key": None, "label_key": None, "group_key": "group", "id_key": "id"}
    param = next(model.parameters(), None)
    inputs = one_sample_inputs(data, keys, param.device if param is not None else
                               torch.device("cpu"))  # fmt: skip
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            logits = forward_logits(model, inputs)
    except MIUError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError) as exc:
        shape = list(inputs.shape[1:]) if isinstance(inputs, torch.Tensor) else None
        raise InputMismatchError(
            f"{what} {index.path}: the model's forward fails on its first sample"
            + (f" (inputs of shape {shape})" if shape is not None else "")
            + f": {type(exc).__name__}: {' '.join(str(exc).split())}"
        ) from exc
    finally:
        for module, mode in modes.items():
            module.training = mode
    classes = int(logits.shape[1])
    if len(index) and int(index.labels.max()) >= classes:
        raise GroupRangeError(
            f"{what} {index.path}: label {int(index.labels.max())} is outside [0, {classes}), "
            "the model's classes"
        )


def preflight(
    model: nn.Module,
    retain: Dataset,
    forget: Dataset,
    config: TrainConfig,
    *,
    method: str,
    num_groups: int,
    feature_module: str | None,
    evals: dict[str, tuple[Dataset, DataIndex]],
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> None:
    """Raise the first problem of the run (others named in its message), then check ``evals``.

    Args:
        model: The loaded model (nothing of it changes).
        retain: D_r.
        forget: D_f.
        config: The run's resolved config.
        method: The method name.
        num_groups: |G|.
        feature_module: Head override for the tap.
        evals: ``{"--test": (data, index), ...}`` of the evaluation sets given.
        collate_fn: How the run batches items (text: :class:`~miu_hooks.cli.text.TrimPadding`).
    """
    check = check_run(
        model,
        retain,
        forget,
        config,
        method=method,
        num_groups=num_groups,
        feature_module=feature_module,
        collate_fn=collate_fn,
    )
    raise_first(check.problems)
    for what, (data, index) in evals.items():
        check_eval_set(model, data, index, what)
