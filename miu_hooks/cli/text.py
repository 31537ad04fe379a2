"""Tokenized text for ``miu-unlearn``: a ``datasets`` folder of token ids (imports torch).

A ``save_to_disk`` folder whose input column (``input_ids`` by default,
``--input-key`` otherwise) holds lists of token ids is read as text. Each item
is ``({"input_ids", "attention_mask"[, "token_type_ids"]}, label, group)``, every
sequence padded on the right to the longest one of the set with the model's
``pad_token_id`` (``config.json``, else 0) and an attention mask of 0 there
(ones over the tokens when the folder has no ``attention_mask`` column). The
sequences are padded to one length so that batches stack as they are; the
attention mask keeps the model's outputs those of the unpadded sequences.
:class:`TrimPadding`, the command's ``collate_fn``, then cuts each batch down to
its own longest sequence, so a batch of short sentences does not pay for the
longest one of the set.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from miu_hooks.cli.data_index import DataIndex
from miu_hooks.cli.inputs import ModelSource
from miu_hooks.errors import DataError

__all__ = ["TokenDataset", "TrimPadding", "pad_token_id"]

#: Optional columns passed to the model beside the token ids, padded with 0.
EXTRA_INPUTS = ("attention_mask", "token_type_ids")


def pad_token_id(source: ModelSource) -> int:
    """The model's ``pad_token_id`` from its ``config.json`` (0 when it has none)."""
    if source.config_dir is None:
        return 0
    try:
        config = json.loads((source.config_dir / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    value = config.get("pad_token_id")
    return value if isinstance(value, int) and value >= 0 else 0


class TrimPadding:
    """A ``collate_fn`` that stacks padded text items and drops the batch's padding-only columns.

    Items are ``(inputs, label, group[, index])`` with ``inputs`` a dict of LongTensor[L]
    holding ``input_ids`` and ``attention_mask``. After ``default_collate``, the trailing
    columns where every row is padding (``input_ids == pad_id`` and ``attention_mask == 0``)
    are cut from every input, which is what padding the batch to its own longest sequence
    gives. Batches of other shapes are returned as ``default_collate`` makes them.

    Args:
        pad_id: Token id of the padding.

    Example:
        >>> item = lambda ids, n: ({"input_ids": torch.tensor(ids),
        ...                         "attention_mask": torch.tensor([1] * n + [0] * (4 - n))},
        ...                        torch.tensor(0), torch.tensor(1))
        >>> inputs, label, group = TrimPadding(0)([item([5, 6, 0, 0], 2), item([7, 0, 0, 0], 1)])
        >>> inputs["input_ids"].tolist()
        [[5, 6], [7, 0]]
    """

    def __init__(self, pad_id: int = 0) -> None:
        self.pad_id = int(pad_id)

    def __call__(self, items: list[Any]) -> Any:
        """Collate ``items`` and cut the columns that are padding in every row."""
        batch = default_collate(items)
        if not isinstance(batch, (list, tuple)) or not batch or not isinstance(batch[0], dict):
            return batch
        inputs = batch[0]
        ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        if not isinstance(ids, Tensor) or not isinstance(mask, Tensor) or ids.dim() != 2:
            return batch
        used = ((ids != self.pad_id) | (mask != 0)).any(0)
        keep = int(used.nonzero().max()) + 1 if bool(used.any()) else ids.shape[1]
        if keep == ids.shape[1]:
            return batch
        trimmed = {k: v[:, :keep] if isinstance(v, Tensor) and v.dim() == 2 else v
                   for k, v in inputs.items()}  # fmt: skip
        return [trimmed, *batch[1:]] if isinstance(batch, list) else (trimmed, *batch[1:])


class TokenDataset(Dataset):
    """Token-id sequences of a ``datasets`` folder, padded to the set's longest sequence.

    Items are ``(inputs, label, group)`` with ``inputs`` a dict of LongTensor[L]
    (see the module docstring); ``labels`` and ``groups`` are attributes, so
    group counts never read the sequences.

    Args:
        index: A ``datasets`` :class:`~miu_hooks.cli.data_index.DataIndex` of text.
        pad_id: Token id of the padding.

    Raises:
        DataError: A sequence is empty, or its columns differ in length.
    """

    def __init__(self, index: DataIndex, pad_id: int = 0) -> None:
        self.index = index
        self.pad_id = int(pad_id)
        self.labels = torch.from_numpy(index.labels)
        self.groups = torch.from_numpy(index.groups)
        present = list(index.handle.column_names)
        self.extra = [c for c in EXTRA_INPUTS if c in present and c != index.keys["input"]]
        lengths = [len(v) for v in index.handle[index.keys["input"]]]
        if min(lengths) == 0:
            raise DataError(
                f"{index.path}: row {lengths.index(0)} holds no token (rows count from 0)"
            )
        self.length = max(lengths)
        #: The ``collate_fn`` that pads each batch to its own longest sequence.
        self.collate = TrimPadding(self.pad_id)

    def __len__(self) -> int:
        return len(self.index)

    def _padded(self, values: Any, fill: int, row: int, column: str, size: int) -> Tensor:
        tensor = torch.as_tensor(values, dtype=torch.long).reshape(-1)
        if tensor.numel() != size:
            raise DataError(
                f"{self.index.path}: row {row} has {tensor.numel()} values in {column!r} but "
                f"{size} token ids (rows count from 0)"
            )
        out = torch.full((self.length,), fill, dtype=torch.long)
        out[:size] = tensor
        return out

    def __getitem__(self, i: int) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        row = self.index.handle[i]
        ids = torch.as_tensor(row[self.index.keys["input"]], dtype=torch.long).reshape(-1)
        size = int(ids.numel())
        inputs = {"input_ids": self._padded(ids, self.pad_id, i, "input_ids", size)}
        inputs["attention_mask"] = self._padded([1] * size, 0, i, "attention_mask", size)
        for column in self.extra:
            inputs[column] = self._padded(row[column], 0, i, column, size)
        return inputs, self.labels[i], self.groups[i]
