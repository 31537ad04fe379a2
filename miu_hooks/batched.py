"""Batched fetching of tensor-backed data sets: one index per batch, not one per item.

A ``DataLoader`` over a :class:`~torch.utils.data.TensorDataset` reads a batch
item by item (``dataset[i]`` for every position, then ``torch.stack``); for a
small model that Python loop costs more than the forward pass. When a data set
is built from tensors only (a ``TensorDataset``, or ``Subset``,
``ConcatDataset`` and :class:`~miu_hooks.data.IndexedDataset` views of such
data sets, none of them subclassed with their own ``__getitem__``),
:func:`batched` wraps it in a view whose ``__getitems__`` indexes each column
once per batch, and :func:`collate` passes that batch through. The batch holds
the same values, in the same order, with the same dtypes as the item-by-item
path (``default_collate`` stacks the items' rows; positions become int64).
Any other data set is returned unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, overload

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from miu_hooks.data import IndexedDataset

__all__ = [
    "BatchedIndexedDataset",
    "BatchedTensorView",
    "Collated",
    "batched",
    "batched_loader_args",
    "collate",
    "tensor_source",
]

#: Read tensor-backed data a batch at a time in the library's loaders (``False``:
#: item by item, as a plain ``DataLoader`` does; the batches are the same).
ENABLED = True


class Collated(Sequence[tuple[Any, ...]]):
    """A batch read by ``__getitems__``: its columns, and its items on demand.

    :func:`collate` returns the columns as they are. Any other ``collate_fn``
    (a loader built by someone else over the same data set) sees a sequence of
    the items the data set's ``__getitem__`` returns, built when read, so it
    collates what it would have without ``__getitems__``.
    """

    __slots__ = ("columns", "indexed")

    def __init__(self, columns: tuple[Tensor, ...], indexed: bool = False) -> None:
        self.columns = columns
        self.indexed = indexed  # the last column holds positions, items carry them as ints

    def __len__(self) -> int:
        return int(self.columns[0].shape[0])

    @overload
    def __getitem__(self, i: int) -> tuple[Any, ...]: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[tuple[Any, ...]]: ...

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = tuple(c[i] for c in self.columns)
        return (*row[:-1], int(row[-1])) if self.indexed else row


def collate(data: Any) -> Any:
    """The loaders' ``collate_fn``: a :class:`Collated` batch as a tuple, else ``default_collate``.

    Example:
        >>> collate(Collated((torch.zeros(2), torch.ones(2))))[1].tolist()
        [1.0, 1.0]
        >>> collate([(torch.zeros(1), 1), (torch.ones(1), 2)])[1].tolist()
        [1, 2]
    """
    if isinstance(data, Collated):
        return data.columns
    return default_collate(data)


class _Source:
    """Columns of a tensor-backed data set, read at many positions at once."""

    width: int

    def __len__(self) -> int:
        raise NotImplementedError

    def take(self, index: Tensor) -> tuple[Tensor, ...]:
        raise NotImplementedError


class _Tensors(_Source):
    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = tuple(tensors)
        self.width = len(self.tensors)

    def __len__(self) -> int:
        return int(self.tensors[0].shape[0])

    def take(self, index: Tensor) -> tuple[Tensor, ...]:
        return tuple(t[index] for t in self.tensors)


class _Subset(_Source):
    def __init__(self, inner: _Source, indices: Tensor) -> None:
        self.inner, self.indices, self.width = inner, indices, inner.width

    def __len__(self) -> int:
        return int(self.indices.numel())

    def take(self, index: Tensor) -> tuple[Tensor, ...]:
        return self.inner.take(self.indices[index])


class _Concat(_Source):
    def __init__(self, parts: list[_Source], cumulative: list[int]) -> None:
        self.parts, self.width = parts, parts[0].width
        self.starts = torch.tensor([0, *cumulative[:-1]], dtype=torch.long)
        self.ends = torch.tensor(cumulative, dtype=torch.long)
        # Shape (beyond the first dimension) and dtype of every column, one part read.
        self.columns = [(c.shape[1:], c.dtype) for c in parts[0].take(torch.zeros(0).long())]

    def __len__(self) -> int:
        return int(self.ends[-1])

    def take(self, index: Tensor) -> tuple[Tensor, ...]:
        part = torch.searchsorted(self.ends, index, right=True)
        present = torch.unique(part).tolist()
        if len(present) == 1:
            p = present[0]
            return self.parts[p].take(index - self.starts[p])
        out = [torch.empty((index.numel(), *shape), dtype=dtype) for shape, dtype in self.columns]
        for p in present:
            rows = torch.nonzero(part == p).reshape(-1)
            for column, value in zip(out, self.parts[p].take(index[rows] - self.starts[p]),
                                     strict=True):  # fmt: skip
                column[rows] = value
        return tuple(out)


class _Indexed(_Source):
    def __init__(self, inner: _Source) -> None:
        self.inner, self.width = inner, inner.width + 1

    def __len__(self) -> int:
        return len(self.inner)

    def take(self, index: Tensor) -> tuple[Tensor, ...]:
        return (*self.inner.take(index), index)


def _plain(dataset: Any, cls: type) -> bool:
    """``dataset`` is a ``cls`` whose item access is ``cls``'s own."""
    kind: Any = type(dataset)
    own: Any = cls
    return (
        isinstance(dataset, cls)
        and kind.__getitem__ is own.__getitem__
        and getattr(kind, "__getitems__", None) is getattr(own, "__getitems__", None)
    )


def tensor_source(dataset: Any) -> _Source | None:
    """The columns behind ``dataset`` when its items are rows of CPU tensors, else ``None``."""
    if _plain(dataset, TensorDataset):
        tensors = dataset.tensors
        if not tensors or any(t.device.type != "cpu" for t in tensors):
            return None
        return _Tensors(tensors)
    if _plain(dataset, Subset):
        inner = tensor_source(dataset.dataset)
        if inner is None:
            return None
        return _Subset(inner, torch.as_tensor(list(dataset.indices), dtype=torch.long))
    if _plain(dataset, ConcatDataset):
        parts = [tensor_source(d) for d in dataset.datasets]
        if not parts or any(p is None for p in parts):
            return None
        sources = [p for p in parts if p is not None]
        empty = torch.zeros(0).long()
        layouts = {tuple((c.shape[1:], c.dtype) for c in p.take(empty)) for p in sources}
        if len(layouts) != 1:  # columns of different shapes or dtypes: item by item
            return None
        return _Concat(sources, list(dataset.cumulative_sizes))
    if _plain(dataset, IndexedDataset):
        inner = tensor_source(dataset.dataset)
        # IndexedDataset reads tuples of (inputs, label, group) only.
        return _Indexed(inner) if inner is not None and inner.width == 3 else None
    return None


def _take(source: _Source, positions: Sequence[int]) -> Collated:
    index = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
    n = len(source)
    if index.numel() and bool(((index < -n) | (index >= n)).any()):
        bad = next(int(i) for i in index if not -n <= int(i) < n)
        raise IndexError(f"index {bad} is out of range for a data set of {n} samples")
    columns = source.take(torch.where(index < 0, index + n, index))
    return Collated(columns, indexed=isinstance(source, _Indexed))


class BatchedTensorView(Dataset):
    """``dataset`` read a batch at a time (see :mod:`miu_hooks.batched`).

    Items (``view[i]``) are those of ``dataset``; ``view.__getitems__(positions)``
    returns the collated batch of those positions, in their order (use
    ``collate_fn=collate``). Other attributes are the wrapped data set's.

    Example:
        >>> data = TensorDataset(torch.arange(6.0).reshape(3, 2), torch.tensor([0, 1, 1]))
        >>> view = batched(data)
        >>> [t.tolist() for t in collate(view.__getitems__([2, 0]))]
        [[[4.0, 5.0], [0.0, 1.0]], [1, 0]]
    """

    def __init__(self, dataset: Dataset, source: _Source) -> None:
        self.dataset = dataset
        self.batched_from = dataset
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i]

    def __getitems__(self, positions: Sequence[int]) -> Collated:
        return _take(self.source, positions)

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "source", "batched_from"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class BatchedIndexedDataset(IndexedDataset):
    """An :class:`~miu_hooks.data.IndexedDataset` of tensor-backed data, read a batch at a time.

    The same items as ``IndexedDataset(dataset)`` (and the same ``.dataset``);
    ``__getitems__`` returns the collated batch (use ``collate_fn=collate``).
    """

    def __init__(self, dataset: Dataset, source: _Source) -> None:
        super().__init__(dataset)
        self.source = source

    def __getitems__(self, positions: Sequence[int]) -> Collated:
        return _take(self.source, positions)


def batched(dataset: Any) -> Any:
    """``dataset`` read a batch at a time when it is tensor-backed, else ``dataset`` itself.

    An :class:`~miu_hooks.data.IndexedDataset` becomes a
    :class:`BatchedIndexedDataset`, anything else tensor-backed a
    :class:`BatchedTensorView`. Use with ``collate_fn=collate``
    (:func:`batched_loader_args` sets both).
    """
    if isinstance(dataset, (BatchedTensorView, BatchedIndexedDataset)):
        return dataset
    source = tensor_source(dataset)
    if source is None:
        return dataset
    if isinstance(source, _Indexed):
        return BatchedIndexedDataset(dataset.dataset, source)
    return BatchedTensorView(dataset, source)


def batched_loader_args(dataset: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The data set and ``DataLoader`` keyword arguments of a batched loader of ``dataset``.

    Returns them unchanged when ``dataset`` is not tensor-backed or the caller
    chose its own ``collate_fn``.
    """
    if not ENABLED or kwargs.get("collate_fn") is not None:
        return dataset, kwargs
    view = batched(dataset)
    if not isinstance(view, (BatchedTensorView, BatchedIndexedDataset)):
        return dataset, kwargs
    return view, {**kwargs, "collate_fn": collate}
