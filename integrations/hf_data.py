"""Trainer-ready datasets: dict items with a group column, and the column checks of the callback.

These need neither ``transformers`` nor the callback; :mod:`miu_hooks.integrations.hf`
re-exports the public names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from miu_hooks.data import dataset_groups
from miu_hooks.errors import DataError

__all__ = [
    "GroupDictDataset",
    "as_trainer_dataset",
    "check_forget_columns",
    "check_train_columns",
    "first_item",
]


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


def first_item(dataset: Any, what: str) -> Mapping[str, Any]:
    """Item 0 of ``dataset``, checked to be a dict of columns (``what`` names it in errors).

    Raises:
        DataError: The dataset is empty, or its items are not mappings.

    Example:
        >>> sorted(first_item([{"pixel_values": 0, "labels": 1, "group": 2}], "forget set"))
        ['group', 'labels', 'pixel_values']
        >>> first_item([(0, 1, 2)], "forget set")
        Traceback (most recent call last):
        ...
        miu_hooks.errors.DataError: forget set items must be dicts of columns for the Trainer; \
item 0 is tuple. Wrap (inputs, label, group) datasets with as_trainer_dataset()
    """
    if len(dataset) == 0:
        raise DataError(f"the {what} is empty")
    item = dataset[0]
    if not isinstance(item, Mapping):
        raise DataError(
            f"{what} items must be dicts of columns for the Trainer; item 0 is "
            f"{type(item).__name__}. Wrap (inputs, label, group) datasets with as_trainer_dataset()"
        )
    return item


def check_forget_columns(dataset: Any, group_key: str, label_key: str | None) -> None:
    """Check that the forget set's items have the group and label columns.

    Raises:
        DataError: A column is missing (the message lists the columns there are).

    Example:
        >>> check_forget_columns([{"pixel_values": 0, "labels": 1}], "group", None)
        Traceback (most recent call last):
        ...
        miu_hooks.errors.DataError: the forget dataset has no 'group' column; its columns are \
['labels', 'pixel_values']. Add it, or set MIUConfig(group_key=..., label_key=...)
    """
    item = first_item(dataset, "forget dataset")
    labels = [label_key] if label_key else ["labels", "label"]
    missing = [repr(group_key)] if group_key not in item else []
    if not any(k in item for k in labels):
        missing.append(" or ".join(map(repr, labels)))
    if missing:
        raise DataError(
            f"the forget dataset has no {' and no '.join(missing)} column; its columns are "
            f"{sorted(item)}. Add it, or set MIUConfig(group_key=..., label_key=...)"
        )


def check_train_columns(loader: Any, group_key: str) -> None:
    """Check that the group column reaches the batches of the Trainer's train loader.

    The first item goes through the loader's collator: with
    ``remove_unused_columns=True`` the Trainer's collator drops the column.

    Raises:
        DataError: The retain set has no group column, or the collator drops it.

    Example:
        >>> from torch.utils.data import DataLoader
        >>> items = [{"pixel_values": torch.zeros(2), "labels": 0, "group": 1}]
        >>> check_train_columns(DataLoader(items), "group")  # passes
        >>> check_train_columns(DataLoader(items, collate_fn=lambda b: {}), "group")
        Traceback (most recent call last):
        ...
        miu_hooks.errors.DataError: the 'group' column does not reach the training batches: ...
    """
    first = first_item(loader.dataset, "train (retain) dataset")
    if group_key not in first:
        raise DataError(
            f"the train (retain) dataset has no {group_key!r} column; its columns are "
            f"{sorted(first)}. Add the group id of each sample, or set MIUConfig(group_key=...)"
        )
    collate = getattr(loader, "collate_fn", None)
    batch = collate([first]) if callable(collate) else first
    if isinstance(batch, dict) and group_key not in batch:
        raise DataError(
            f"the {group_key!r} column does not reach the training batches: the Trainer removes "
            "columns its model's forward does not accept. Set "
            "TrainingArguments(remove_unused_columns=False) (MIUCallback does this itself "
            "when it is added with prepare_trainer or passed in Trainer(callbacks=[...]))"
        )
