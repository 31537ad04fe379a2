"""Reading ``(inputs, label, group)`` samples and calling models on them.

Datasets may yield tuples ``(inputs, label, group)`` or mappings with
configurable keys. These helpers turn a collated batch into tensors and a model
output into logits, so every method and metric reads data the same way.
:class:`GroupTensorDataset` is the in-memory ``(inputs, labels, groups)``
container the core, the command line and the demo share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from miu_hooks.errors import DataError, NoClassifierOutputError, NonFiniteInputError

__all__ = [
    "Batch",
    "GroupTensorDataset",
    "IndexedDataset",
    "dataset_groups",
    "forward_logits",
    "indexed",
    "is_deterministic",
    "raise_if_nonfinite_inputs",
    "split_batch",
    "split_keys",
]

INPUT_KEYS = ("pixel_values", "input", "inputs", "x", "input_ids")
LABEL_KEYS = ("labels", "label", "y")


class Batch:
    """A batch split into model inputs, labels, groups and (optional) indices.

    Attributes:
        inputs: A tensor, or a dict of tensors passed as keyword arguments.
        labels: LongTensor[B].
        groups: LongTensor[B].
        index: LongTensor[B] of dataset positions, when the loader provides them.
        host_index: ``index`` as it was on the host before :meth:`to` moved it
            (lookups in host-resident tables need no device-to-host copy).
    """

    __slots__ = ("groups", "host_index", "index", "inputs", "labels")

    def __init__(
        self,
        inputs: Tensor | dict[str, Tensor],
        labels: Tensor,
        groups: Tensor,
        index: Tensor | None = None,
    ) -> None:
        self.inputs = inputs
        self.labels = labels
        self.groups = groups
        self.index = index
        self.host_index = index if index is not None and index.device.type == "cpu" else None

    def to(self, device: torch.device | str) -> Batch:
        """Move every tensor to ``device`` (non-blocking) and return ``self``.

        The copies are asynchronous when the tensors sit in pinned memory (the
        library's loaders pin batches for CUDA runs).
        """
        if isinstance(self.inputs, dict):
            self.inputs = {k: _move(v, device) for k, v in self.inputs.items()}
        else:
            self.inputs = _move(self.inputs, device)
        self.labels = self.labels.to(device, non_blocking=True)
        self.groups = self.groups.to(device, non_blocking=True)
        if self.index is not None:
            if self.index.device.type == "cpu":
                self.host_index = self.index
            self.index = self.index.to(device, non_blocking=True)
        return self

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def raise_if_nonfinite_inputs(batch: Batch, where: str) -> None:
    """Raise :class:`NonFiniteInputError` when a floating-point input of ``batch`` is NaN/Inf.

    Called when a loss turns non-finite, so that bad data are not blamed on the
    optimiser. The message names ``where`` and the batch's dataset positions
    when it carries them.

    Example:
        >>> b = Batch(torch.tensor([[1.0], [float("nan")]]), torch.zeros(2), torch.zeros(2))
        >>> raise_if_nonfinite_inputs(b, "the retain step")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        miu_hooks.errors.NonFiniteInputError: the inputs of 1 sample of the batch in the ...
    """
    values = batch.inputs.values() if isinstance(batch.inputs, dict) else [batch.inputs]
    bad: Tensor | None = None
    for value in values:
        if isinstance(value, Tensor) and value.is_floating_point() and value.dim() >= 1:
            rows = ~torch.isfinite(value.detach().reshape(value.shape[0], -1)).all(dim=1)
            bad = rows if bad is None else bad | rows
    if bad is None or not bool(bad.any()):
        return
    count = int(bad.sum())
    where_in_data = ""
    if batch.index is not None:
        positions = batch.index[bad.to(batch.index.device)].tolist()[:5]
        where_in_data = f" (dataset positions {', '.join(map(str, positions))}, counting from 0)"
    raise NonFiniteInputError(
        f"the inputs of {count} sample{'s' if count > 1 else ''} of the batch in {where} hold "
        f"NaN or Inf{where_in_data}: the data are bad, not the training; fix or drop them"
    )


def _move(value: Any, device: torch.device | str) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, Tensor) else value


def _columns(mapping: Mapping[str, Any]) -> list[str]:
    """The data's columns, for messages (without the position the library attaches)."""
    return sorted(k for k in mapping if k != "__index__")


def _pick(mapping: Mapping[str, Any], key: str | None, candidates: Sequence[str], what: str) -> str:
    if key is not None:
        if key not in mapping:
            raise DataError(
                f"batch has no {what} column {key!r}; columns are {_columns(mapping)}"
            )
        return key
    for cand in candidates:
        if cand in mapping:
            return cand
    raise DataError(
        f"batch has no {what} column (looked for {', '.join(candidates)}); "
        f"columns are {_columns(mapping)}; set the {what} key ({what}_key) in the config"
    )


def split_batch(
    batch: Any,
    *,
    input_key: str | None = None,
    label_key: str | None = None,
    group_key: str = "group",
    id_key: str = "id",
) -> Batch:
    """Split a collated batch into :class:`Batch` fields.

    Tuples are read as ``(inputs, label, group[, index])``. Mappings are read by
    key; every key that is not a label, group, id or index column and that the
    input key does not name stays in ``inputs`` when ``input_key`` is ``None`` and
    several model inputs are present (e.g. ``input_ids`` and ``attention_mask``).

    Args:
        batch: A collated batch (tuple/list or mapping).
        input_key: Key of the inputs; ``None`` picks the first known one.
        label_key: Key of the labels; ``None`` picks ``labels``/``label``/``y``.
        group_key: Key of the group ids.
        id_key: Key of sample ids, dropped from the inputs.

    Returns:
        The batch as a :class:`Batch`.

    Raises:
        DataError: A column is missing or the tuple has the wrong length.

    Example:
        >>> b = split_batch({"pixel_values": torch.zeros(2, 3), "labels": torch.tensor([0, 1]),
        ...                  "group": torch.tensor([1, 2])})
        >>> b.inputs.shape, b.groups.tolist()
        (torch.Size([2, 3]), [1, 2])
    """
    if isinstance(batch, Mapping):
        lkey = _pick(batch, label_key, LABEL_KEYS, "label")
        if group_key not in batch:
            raise DataError(
                f"batch has no group column {group_key!r}; columns are {_columns(batch)}"
            )
        index = batch.get("__index__")
        if input_key is not None or "input_ids" not in batch:
            ikey = _pick(batch, input_key, INPUT_KEYS, "input")
            inputs: Tensor | dict[str, Tensor] = batch[ikey]
        else:
            skip = {lkey, group_key, id_key, "__index__"}
            inputs = {k: v for k, v in batch.items() if k not in skip}
        return Batch(
            inputs, _long(batch[lkey], "labels"), _long(batch[group_key], "groups"), _index(index)
        )
    if isinstance(batch, (tuple, list)):
        if len(batch) not in (3, 4):
            raise DataError(
                f"tuple items must be (inputs, label, group); got a tuple of {len(batch)}"
            )
        index = batch[3] if len(batch) == 4 else None
        return Batch(batch[0], _long(batch[1], "labels"), _long(batch[2], "groups"), _index(index))
    raise DataError(f"unsupported batch type {type(batch).__name__}: use a tuple or a mapping")


def split_keys(config: Any) -> dict[str, Any]:
    """The column keys of a config, as :func:`split_batch`'s keyword arguments.

    Example:
        >>> from miu_hooks.config import TrainConfig
        >>> split_keys(TrainConfig(label_key="y"))["label_key"]
        'y'
    """
    return {
        "input_key": config.input_key,
        "label_key": config.label_key,
        "group_key": config.group_key,
        "id_key": config.id_key,
    }


def _index(value: Any) -> Tensor | None:
    return None if value is None else torch.as_tensor(value).long().reshape(-1)


def _long(value: Any, what: str) -> Tensor:
    tensor = torch.as_tensor(value)
    if tensor.is_floating_point():
        if not torch.equal(tensor, tensor.round()):
            raise DataError(f"{what} must be integers; got fractional values")
    return tensor.long().reshape(-1)


def forward_logits(model: nn.Module, inputs: Tensor | dict[str, Tensor]) -> Tensor:
    """Call ``model`` on ``inputs`` and return its logits.

    Dict inputs are passed as keyword arguments. The output may be a tensor, an
    object with ``.logits`` (Hugging Face), or a tuple whose first element is
    the logits.

    Raises:
        NoClassifierOutputError: The output carries no logits tensor.

    Example:
        >>> forward_logits(nn.Linear(3, 2), torch.zeros(4, 3)).shape
        torch.Size([4, 2])
    """
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return logits_of(out)


def logits_of(out: Any) -> Tensor:
    """Return the logits held by a model output (see :func:`forward_logits`)."""
    if isinstance(out, Tensor):
        logits = out
    elif getattr(out, "logits", None) is not None:
        logits = out.logits
    elif isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        logits = out["logits"]  # a plain dict, as Trainer-compatible models may return
    elif isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        logits = out[0]
    else:
        raise NoClassifierOutputError(
            f"model output of type {type(out).__name__} has no logits: return a tensor "
            "[B, num_classes], an object or dict with logits, or a tuple starting with the logits"
        )
    if logits.dim() != 2:
        raise NoClassifierOutputError(
            f"model logits must be [batch, num_classes]; got shape {tuple(logits.shape)}"
        )
    return logits


class GroupTensorDataset(TensorDataset):
    """A :class:`~torch.utils.data.TensorDataset` of ``(inputs, labels, groups)``.

    Items are ``(inputs[i], labels[i], groups[i])`` tuples; ``groups`` and
    ``labels`` are exposed as attributes, so group counts never touch images.

    Args:
        inputs: Tensor[N, ...] of model inputs.
        labels: LongTensor[N] of target labels.
        groups: LongTensor[N] of group ids.

    Raises:
        DataError: The three tensors differ in length.

    Example:
        >>> ds = GroupTensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 1]),
        ...                         torch.tensor([0, 3, 2]))
        >>> len(ds), ds.groups.tolist(), ds.labels.tolist()
        (3, [0, 3, 2], [0, 1, 1])
    """

    tensors: tuple[Tensor, ...]

    def __init__(self, inputs: Tensor, labels: Tensor, groups: Tensor) -> None:
        labels = torch.as_tensor(labels).long().reshape(-1)
        groups = torch.as_tensor(groups).long().reshape(-1)
        if not len(inputs) == len(labels) == len(groups):
            raise DataError(
                f"inputs, labels and groups must have the same length; got "
                f"{len(inputs)}, {len(labels)} and {len(groups)}"
            )
        super().__init__(inputs, labels, groups)

    @property
    def inputs(self) -> Tensor:
        """Tensor[N, ...] of model inputs."""
        return self.tensors[0]

    @property
    def labels(self) -> Tensor:
        """LongTensor[N] of target labels."""
        return self.tensors[1]

    @property
    def groups(self) -> Tensor:
        """LongTensor[N] of group ids."""
        return self.tensors[2]


class IndexedDataset(Dataset):
    """A view of ``dataset`` whose items also carry their position.

    Tuple items become ``(inputs, label, group, index)``; mapping items gain an
    ``"__index__"`` key. Used to look up cached per-sample features.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[i]
        if isinstance(item, Mapping):
            return {**item, "__index__": i}
        if isinstance(item, (tuple, list)) and len(item) == 3:
            return (*item, i)
        raise DataError(
            f"dataset items must be (inputs, label, group) tuples or mappings; "
            f"item {i} is {type(item).__name__}"
            + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else "")
        )


def dataset_groups(dataset: Dataset, group_key: str = "group") -> Tensor:
    """Return the group id of every sample of ``dataset`` as LongTensor[N].

    Uses a ``groups`` attribute, a :class:`TensorDataset`'s third tensor, the
    ``group_key`` column of a column store (a ``datasets.Dataset``), or
    :class:`Subset`/:class:`ConcatDataset` structure when available, so inputs
    are not loaded just to read groups; otherwise reads every item.

    Example:
        >>> ds = TensorDataset(torch.zeros(3, 2), torch.tensor([0, 1, 1]), torch.tensor([0, 3, 2]))
        >>> dataset_groups(ds).tolist()
        [0, 3, 2]
    """
    if hasattr(dataset, "groups"):
        return torch.as_tensor(dataset.groups).long().reshape(-1)
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 3:
        return dataset.tensors[2].long().reshape(-1)
    column = _group_column(dataset, group_key)
    if column is not None:
        return column
    if isinstance(dataset, Subset):
        return dataset_groups(dataset.dataset, group_key)[torch.as_tensor(dataset.indices)]
    if isinstance(dataset, ConcatDataset):
        return torch.cat([dataset_groups(d, group_key) for d in dataset.datasets])
    if isinstance(dataset, IndexedDataset):
        return dataset_groups(dataset.dataset, group_key)
    base = getattr(dataset, "batched_from", None)  # miu_hooks.batched's view
    if base is not None:
        return dataset_groups(base, group_key)
    groups = []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        item = dataset[i]
        if isinstance(item, Mapping):
            if group_key not in item:
                raise DataError(
                    f"dataset item {i} has no group column {group_key!r}; keys are {_columns(item)}"
                )
            groups.append(int(item[group_key]))
        elif isinstance(item, (tuple, list)) and len(item) >= 3:
            groups.append(int(item[2]))
        else:
            raise DataError(
                f"dataset items must be (inputs, label, group) tuples or mappings; "
                f"item {i} is {type(item).__name__}"
            )
    return torch.tensor(groups, dtype=torch.long)


def _group_column(dataset: Any, group_key: str) -> Tensor | None:
    """The ``group_key`` column of a column store (``datasets.Dataset``), else ``None``."""
    columns = getattr(dataset, "column_names", None)
    if not isinstance(columns, list) or group_key not in columns:
        return None
    values = dataset[group_key]  # a list, a tensor or a lazy column, by the dataset's format
    try:
        return torch.as_tensor([int(v) for v in values], dtype=torch.long)
    except (TypeError, ValueError) as exc:
        raise DataError(f"the {group_key!r} column must hold integer group ids ({exc})") from exc


def indexed(dataset: Dataset) -> IndexedDataset:
    """Return ``dataset`` with positions attached to its items (unchanged if it has them)."""
    return dataset if isinstance(dataset, IndexedDataset) else IndexedDataset(dataset)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        return isinstance(b, Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


def is_deterministic(dataset: Dataset, probes: int = 2) -> bool:
    """Return whether reading the same items twice gives identical values (no augmentation).

    Example:
        >>> ds = [(torch.ones(2), 0, 1)] * 3
        >>> is_deterministic(ds)
        True
    """
    n = len(dataset)  # type: ignore[arg-type]
    for i in sorted({0, n - 1})[:probes]:
        if n and not _same(dataset[i], dataset[i]):
            return False
    return True
