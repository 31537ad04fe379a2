"""``make_compute_metrics``: per-group, worst-group and EO metrics for the Trainer's evaluation.

It needs neither ``transformers`` nor the callback; :mod:`miu_hooks.integrations.hf`
re-exports it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from miu_hooks.data import dataset_groups
from miu_hooks.errors import DataError
from miu_hooks.metrics import (
    accuracy,
    equalized_odds,
    forget_group_accuracy,
    per_group_accuracy,
    worst_group_accuracy,
)

__all__ = ["make_compute_metrics"]

logger = logging.getLogger(__name__)

GroupSource = Tensor | Sequence[int] | np.ndarray | Dataset


def _groups_of(values: GroupSource, group_key: str = "group") -> Tensor:
    if isinstance(values, Tensor):
        return values.long().reshape(-1).cpu()
    if isinstance(values, Dataset):
        return dataset_groups(values, group_key)
    columns = getattr(values, "column_names", None)
    if isinstance(columns, (list, tuple)):  # a datasets.Dataset: read its group column only
        if group_key not in columns:
            raise DataError(
                f"the eval dataset has no group column {group_key!r} (columns: "
                f"{', '.join(map(str, columns))}); pass group_key= or the groups themselves"
            )
        column = values[group_key]  # type: ignore[call-overload]
        return torch.as_tensor(np.asarray(list(column), dtype=np.int64)).reshape(-1)
    return torch.as_tensor(np.asarray(values), dtype=torch.long).reshape(-1)


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (tuple, list)) else value


def make_compute_metrics(
    eval_groups: GroupSource,
    forget_groups: Sequence[int] | None = None,
    num_sensitive: int = 2,
    num_groups: int | None = None,
    group_key: str = "group",
) -> Callable[[Any], dict[str, float]]:
    """Return a ``compute_metrics`` for the Trainer with per-group, worst-group and EO metrics.

    The Trainer's ``EvalPrediction`` carries predictions and labels but not the
    groups, so they are given here, in the order of the eval dataset (the
    Trainer evaluates in dataset order, also across processes): a LongTensor, a
    sequence, or the eval dataset itself, a torch ``Dataset`` or a
    ``datasets.Dataset`` (its ``group_key`` column is read once).

    Keys (the Trainer prefixes ``eval_``): ``miu/accuracy``, ``miu/group_<g>_acc``
    for every non-empty group, ``miu/worst_group_acc``, and with ``forget_groups``
    ``miu/forget_group_acc`` (GA) and ``miu/eo`` (docs/method.md §5). All x100.

    Args:
        eval_groups: Group id of every eval sample, in order (or the eval dataset).
        forget_groups: Ids of the forgotten group(s), for GA and EO.
        num_sensitive: S, the number of sensitive-attribute values (g = s + y·S).
        num_groups: |G| (default ``max id + 1``).
        group_key: The group column when ``eval_groups`` is a dataset of mappings.

    Raises:
        DataError: The eval dataset has no ``group_key`` column; (when called) the
            number of predictions differs from ``eval_groups``.

    Example:
        >>> fn = make_compute_metrics(torch.tensor([0, 1, 2, 3]), forget_groups=[3])
        >>> out = fn((np.array([[1., 0], [1, 0], [0, 1], [1, 0]]), np.array([0, 0, 1, 1])))
        >>> out["miu/accuracy"], out["miu/forget_group_acc"], out["miu/worst_group_acc"]
        (75.0, 0.0, 0.0)
    """
    groups = _groups_of(eval_groups, group_key)
    n_groups = int(num_groups) if num_groups is not None else int(groups.max()) + 1
    warned: set[str] = set()

    def compute_metrics(prediction: Any) -> dict[str, float]:
        if isinstance(prediction, tuple):
            preds, labels = prediction[0], prediction[1]
        else:
            preds, labels = prediction.predictions, prediction.label_ids
        logits = torch.as_tensor(np.asarray(_first(preds)))
        y = torch.as_tensor(np.asarray(_first(labels))).long().reshape(-1)
        if len(y) != len(groups):
            raise DataError(
                f"eval_groups has {len(groups)} entries but the evaluation produced {len(y)} "
                "predictions: pass the groups of the eval_dataset, in order"
            )
        out: dict[str, float] = {"miu/accuracy": accuracy(logits, y)}
        for g, acc in per_group_accuracy(logits, y, groups, n_groups).items():
            if acc is not None:
                out[f"miu/group_{g}_acc"] = acc
        out["miu/worst_group_acc"] = worst_group_accuracy(logits, y, groups, n_groups)
        if forget_groups is not None:
            for key, fn in (
                ("miu/forget_group_acc", forget_group_accuracy),
                ("miu/eo", equalized_odds),
            ):
                try:
                    out[key] = fn(logits, y, groups, list(forget_groups), num_sensitive)
                except DataError as exc:
                    if key not in warned:
                        warned.add(key)
                        logger.warning("compute_metrics: %s skipped (%s)", key, exc)
        return out

    return compute_metrics
