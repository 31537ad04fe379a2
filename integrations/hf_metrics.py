"""Trainer-side helpers: dict datasets, feature discovery and group metrics for ``compute_metrics``.

These need neither ``transformers`` nor the callback; :mod:`miu_hooks.integrations.hf`
re-exports them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
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
from miu_hooks.taps import infer_feature_dim, resolve_head

__all__ = ["GroupDictDataset", "as_trainer_dataset", "find_features", "make_compute_metrics"]

logger = logging.getLogger(__name__)

GroupSource = Tensor | Sequence[int] | np.ndarray | Dataset


class GroupDictDataset(Dataset):
    """Items ``(inputs, label, group)`` of ``dataset`` as Trainer-ready dicts.

    ``view[i]`` is ``{input_key: inputs, label_key: label, group_key: group}``
    with the label and group as 0-d long tensors. ``groups`` is exposed, so
    group counts never load inputs when the wrapped dataset has ``groups`` too.

    Args:
        dataset: A map-style dataset of ``(inputs, label, group)`` tuples.
        input_key: Name of the model input (``pixel_values`` for vision models).
        label_key: Name of the label column the model takes (``labels``).
        group_key: Name of the group column (``MIUConfig.group_key``).

    Example:
        >>> from miu_hooks.data import GroupTensorDataset
        >>> base = GroupTensorDataset(torch.zeros(2, 3), torch.tensor([0, 1]), torch.tensor([1, 3]))
        >>> item = GroupDictDataset(base)[1]
        >>> sorted(item), int(item["group"])
        (['group', 'labels', 'pixel_values'], 3)
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        input_key: str = "pixel_values",
        label_key: str = "labels",
        group_key: str = "group",
    ) -> None:
        self.dataset = dataset
        self.input_key = input_key
        self.label_key = label_key
        self.group_key = group_key

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 3:
            raise DataError(
                f"GroupDictDataset needs (inputs, label, group) items; item {i} is "
                f"{type(item).__name__}"
            )
        inputs, label, group = item[:3]
        return {
            self.input_key: inputs,
            self.label_key: torch.as_tensor(label).long().reshape(()),
            self.group_key: torch.as_tensor(group).long().reshape(()),
        }

    @property
    def groups(self) -> Tensor:
        """LongTensor[N], the group of every item."""
        return dataset_groups(self.dataset)


def as_trainer_dataset(dataset: Dataset, *, input_key: str = "pixel_values") -> Dataset:
    """Return ``dataset`` with dict items for the Trainer (tuples are wrapped).

    Datasets whose items already are mappings are returned unchanged.

    Example:
        >>> from miu_hooks.data import GroupTensorDataset
        >>> ds = as_trainer_dataset(GroupTensorDataset(torch.zeros(1, 2), [0], [2]))
        >>> sorted(ds[0])
        ['group', 'labels', 'pixel_values']
    """
    if len(dataset) and isinstance(dataset[0], Mapping):  # type: ignore[arg-type]
        return dataset
    return GroupDictDataset(dataset, input_key=input_key)


def find_features(
    model: nn.Module, feature_module: str | nn.Module | None = None
) -> tuple[str, int | None]:
    """Return the dotted name of the classification head whose input MIU taps, and its width.

    The head is found as in :func:`miu_hooks.taps.resolve_head`; for Hugging Face
    image classifiers (ViT, DeiT, Swin, ConvNeXt, ResNet, BEiT, Dinov2, ...) it is
    ``classifier``, a ``Linear`` or a ``Sequential(Flatten, Linear)`` (ResNet),
    whose input are the pooled penultimate features. The width is ``None`` when
    it cannot be read off the head's layers (it is then taken from the first batch).

    Example:
        >>> find_features(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        ('2', 8)
    """
    name, head = resolve_head(model, feature_module)
    return name, infer_feature_dim(head)


def _groups_of(values: GroupSource) -> Tensor:
    if isinstance(values, Tensor):
        return values.long().reshape(-1).cpu()
    if isinstance(values, Dataset):
        return dataset_groups(values)
    return torch.as_tensor(np.asarray(values), dtype=torch.long).reshape(-1)


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (tuple, list)) else value


def make_compute_metrics(
    eval_groups: GroupSource,
    forget_groups: Sequence[int] | None = None,
    num_sensitive: int = 2,
    num_groups: int | None = None,
) -> Callable[[Any], dict[str, float]]:
    """Return a ``compute_metrics`` for the Trainer with per-group, worst-group and EO metrics.

    The Trainer's ``EvalPrediction`` carries predictions and labels but not the
    groups, so they are given here, in the order of the eval dataset (the
    Trainer evaluates in dataset order, also across processes): a LongTensor, a
    sequence, or the eval dataset itself (its groups are read once).

    Keys (the Trainer prefixes ``eval_``): ``miu/accuracy``, ``miu/group_<g>_acc``
    for every non-empty group, ``miu/worst_group_acc``, and with ``forget_groups``
    ``miu/forget_group_acc`` (GA) and ``miu/eo`` (METHOD.md §5). All x100.

    Args:
        eval_groups: Group id of every eval sample, in order (or the eval dataset).
        forget_groups: Ids of the forgotten group(s), for GA and EO.
        num_sensitive: S, the number of sensitive-attribute values (g = s + y·S).
        num_groups: |G| (default ``max id + 1``).

    Raises:
        DataError: (when called) the number of predictions differs from ``eval_groups``.

    Example:
        >>> fn = make_compute_metrics(torch.tensor([0, 1, 2, 3]), forget_groups=[3])
        >>> out = fn((np.array([[1., 0], [1, 0], [0, 1], [1, 0]]), np.array([0, 0, 1, 1])))
        >>> out["miu/accuracy"], out["miu/forget_group_acc"], out["miu/worst_group_acc"]
        (75.0, 0.0, 0.0)
    """
    groups = _groups_of(eval_groups)
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
