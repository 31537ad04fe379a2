"""Checks of a run's data and model made before any work (used by ``validate``).

* :func:`dataset_labels_groups` reads the labels and group ids of a data set
  (from attributes or tensors when it has them, so images are not decoded).
* :func:`label_group_problems`: every group id must name its label,
  ``g // S == y`` (g = s + y·S, docs/method.md §1), and ``num_groups`` must fit
  the model's classes.
* :func:`nonfinite_position`: the first sample whose inputs hold NaN or Inf,
  for data sets whose inputs are tensors in memory.
* :func:`batch_of_one_problem`: whether the model can take a training step on
  one sample (BatchNorm cannot), for runs that would feed it one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset, default_collate

from miu_hooks.data import LABEL_KEYS, IndexedDataset, forward_logits
from miu_hooks.errors import DataError, GroupRangeError

__all__ = [
    "batch_of_one_problem",
    "dataset_labels_groups",
    "has_batchnorm",
    "label_group_problems",
    "nonfinite_position",
    "one_sample_inputs",
]


def _label_of(item: Any, label_key: str | None, i: int) -> int:
    if isinstance(item, Mapping):
        keys = [label_key] if label_key is not None else list(LABEL_KEYS)
        key = next((k for k in keys if k in item), None)
        if key is None:
            shown = sorted(k for k in item if k != "__index__")
            raise DataError(f"dataset item {i} has no label column ({', '.join(keys)}); keys are "
                            f"{shown}")  # fmt: skip
        return int(item[key])
    return int(item[1])


def _group_of(item: Any, group_key: str, i: int) -> int:
    if isinstance(item, Mapping):
        if group_key not in item:
            shown = sorted(k for k in item if k != "__index__")
            raise DataError(f"dataset item {i} has no group column {group_key!r}; keys are {shown}")
        return int(item[group_key])
    return int(item[2])


def dataset_labels_groups(
    dataset: Dataset, label_key: str | None = None, group_key: str = "group"
) -> tuple[Tensor, Tensor]:
    """Return ``(labels, groups)`` of every sample of ``dataset`` as LongTensor[N] each.

    Uses ``labels``/``groups`` attributes, a :class:`TensorDataset`'s second and
    third tensors, or :class:`Subset`/:class:`ConcatDataset` structure when
    available; otherwise reads every item once.

    Raises:
        DataError: An item has no label or group column, or is neither a tuple
            of three nor a mapping.

    Example:
        >>> ds = TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 1]), torch.tensor([0, 3, 2]))
        >>> [t.tolist() for t in dataset_labels_groups(ds)]
        [[0, 1, 1], [0, 3, 2]]
    """
    if hasattr(dataset, "labels") and hasattr(dataset, "groups"):
        labels = torch.as_tensor(dataset.labels).long().reshape(-1)
        return labels, torch.as_tensor(dataset.groups).long().reshape(-1)
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 3:
        return dataset.tensors[1].long().reshape(-1), dataset.tensors[2].long().reshape(-1)
    if isinstance(dataset, Subset):
        labels, groups = dataset_labels_groups(dataset.dataset, label_key, group_key)
        index = torch.as_tensor(dataset.indices, dtype=torch.long)
        return labels[index], groups[index]
    if isinstance(dataset, ConcatDataset):
        parts = [dataset_labels_groups(d, label_key, group_key) for d in dataset.datasets]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    if isinstance(dataset, IndexedDataset):
        return dataset_labels_groups(dataset.dataset, label_key, group_key)
    label_list: list[int] = []
    group_list: list[int] = []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        item = dataset[i]
        if not isinstance(item, Mapping) and not (
            isinstance(item, (tuple, list)) and len(item) >= 3
        ):
            raise DataError(
                f"dataset items must be (inputs, label, group) tuples or mappings; "
                f"item {i} is {type(item).__name__}"
            )
        label_list.append(_label_of(item, label_key, i))
        group_list.append(_group_of(item, group_key, i))
    return torch.tensor(label_list, dtype=torch.long), torch.tensor(group_list, dtype=torch.long)


def _shown(positions: list[int], labels: Tensor, groups: Tensor, limit: int = 5) -> str:
    parts = [
        f"sample {i} has label {int(labels[i])} and group {int(groups[i])}"
        for i in positions[:limit]
    ]
    more = f" and {len(positions) - limit} more" if len(positions) > limit else ""
    return "; ".join(parts) + more


def label_group_problems(
    name: str,
    labels: Tensor,
    groups: Tensor,
    *,
    num_groups: int,
    num_sensitive: int,
    num_classes: int | None = None,
) -> list[GroupRangeError]:
    """Check that group ids name their labels and fit the model's classes.

    Group ids are ``g = s + y·S``, so ``g // S`` must equal the label y (ids
    outside ``[0, num_groups)`` are reported elsewhere and skipped here). With
    ``num_classes`` (the model's logits), labels must lie in ``[0, num_classes)``
    and ``num_groups`` may not exceed ``num_classes·S``.

    Args:
        name: The set's name in messages (e.g. ``"retain"``).
        labels: LongTensor[N].
        groups: LongTensor[N].
        num_groups: |G|.
        num_sensitive: S.
        num_classes: The model's number of logits, when known.

    Returns:
        The problems found (empty when the data fit).

    Example:
        >>> p = label_group_problems("retain", torch.tensor([0, 1]), torch.tensor([1, 7]),
        ...                          num_groups=8, num_sensitive=2, num_classes=2)
        >>> [str(e)[:60] for e in p]  # doctest: +NORMALIZE_WHITESPACE
        ['retain set: 1 group id contradicts its label (g = s + y·S wi',
         'num_groups=8 with S=2 means 4 classes (y = g // 2), but the ']
    """
    problems: list[GroupRangeError] = []
    s = int(num_sensitive)
    if labels.numel() != groups.numel():
        return [GroupRangeError(f"{name} set: {labels.numel()} labels for {groups.numel()} groups")]
    valid = (groups >= 0) & (groups < num_groups)
    wrong = (valid & (groups // s != labels)).nonzero().flatten().tolist()
    if wrong:
        problems.append(
            GroupRangeError(
                f"{name} set: {len(wrong)} group id{'s' if len(wrong) > 1 else ''} "
                f"contradict{'' if len(wrong) > 1 else 's'} {'their' if len(wrong) > 1 else 'its'} "
                f"label (g = s + y·S with S = {s}, so g // {s} must be the label): "
                f"{_shown(wrong, labels, groups)} (positions count from 0)"
            )
        )
    if num_classes is not None:
        out = ((labels < 0) | (labels >= num_classes)).nonzero().flatten().tolist()
        if out:
            values = sorted({int(labels[i]) for i in out})
            problems.append(
                GroupRangeError(
                    f"{name} set: label {values[0]} is outside [0, {num_classes}), the model's "
                    f"classes" + (f" (so are {values[1:5]})" if len(values) > 1 else "")
                )
            )
        if num_groups > num_classes * s and name == "retain":
            problems.append(
                GroupRangeError(
                    f"num_groups={num_groups} with S={s} means {-(-num_groups // s)} classes "
                    f"(y = g // {s}), but the model gives {num_classes} logits: group ids must "
                    f"lie in [0, {num_classes * s})"
                )
            )
    return problems


def _input_tensor(dataset: Dataset) -> tuple[Tensor, Tensor | None] | None:
    """``(inputs, positions)`` of a data set whose inputs are one tensor in memory."""
    if isinstance(dataset, TensorDataset) and dataset.tensors:
        return dataset.tensors[0], None
    if isinstance(dataset, IndexedDataset):
        return _input_tensor(dataset.dataset)
    if isinstance(dataset, Subset):
        inner = _input_tensor(dataset.dataset)
        if inner is None:
            return None
        index = torch.as_tensor(dataset.indices, dtype=torch.long)
        return inner[0], index if inner[1] is None else inner[1][index]
    return None


def nonfinite_position(dataset: Dataset, chunk: int = 4096) -> int | None:
    """Return the position of the first sample whose inputs hold NaN or Inf.

    Only data sets whose inputs are one floating-point tensor in memory
    (:class:`TensorDataset`, :class:`~miu_hooks.data.GroupTensorDataset` and
    :class:`Subset` of them) are scanned, in chunks; for others ``None`` is
    returned (their batches are checked when a loss turns non-finite).

    Example:
        >>> x = torch.zeros(3, 2)
        >>> x[2, 1] = float("nan")
        >>> nonfinite_position(TensorDataset(x, torch.zeros(3), torch.zeros(3)))
        2
    """
    found = _input_tensor(dataset)
    if found is None or not found[0].is_floating_point():
        return None
    inputs, positions = found
    n = inputs.shape[0] if positions is None else positions.numel()
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        block = inputs[rows] if positions is None else inputs[positions[rows]]
        bad = ~torch.isfinite(block.reshape(block.shape[0], -1)).all(dim=1)
        if bool(bad.any()):
            return start + int(bad.nonzero()[0])
    return None


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` has a BatchNorm layer (which cannot train on one sample).

    Example:
        >>> has_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
        True
    """
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def batch_of_one_problem(model: nn.Module, inputs: Any) -> str | None:
    """Return why ``model`` cannot take a training step on one sample, or ``None``.

    Runs one training-mode forward on ``inputs`` (a batch of one, already on the
    model's device) under ``no_grad``; BatchNorm running statistics, every
    module's mode and the global RNG are restored. Only models with BatchNorm
    layers are probed: BatchNorm needs more than one value per channel (a
    ``BatchNorm2d`` after a 1x1 feature map does not get it).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
        >>> batch_of_one_problem(net, torch.zeros(1, 2))[:40]
        'ValueError: Expected more than 1 value p'
    """
    if not has_batchnorm(model):
        return None
    from miu_hooks.critic_tuning import batchnorm_buffers_restored

    modes = {m: m.training for m in model.modules()}
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            with batchnorm_buffers_restored(model):
                model.train()
                forward_logits(model, inputs)
    except ValueError as exc:
        if "value per channel" not in str(exc):
            raise
        return f"ValueError: {' '.join(str(exc).split())}"
    finally:
        for module, mode in modes.items():
            module.training = mode
    return None


def one_sample_inputs(
    dataset: Dataset,
    keys: dict[str, Any],
    device: torch.device,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> Any:
    """The inputs of ``dataset[0]`` as a batch of one on ``device`` (for probes).

    Args:
        dataset: The data set (its first item is read).
        keys: ``input_key``, ``label_key``, ``group_key`` and ``id_key`` for
            :func:`~miu_hooks.data.split_batch`.
        device: Where the inputs go.
        collate_fn: The loader's collate function (default ``default_collate``).
    """
    from miu_hooks.data import split_batch

    batch = split_batch((collate_fn or default_collate)([dataset[0]]), **keys).to(device)
    return batch.inputs
