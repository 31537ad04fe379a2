"""Loader plumbing shared by the Trainer and Accelerate integrations.

* :func:`batch_sampler_chain`, :func:`index_sampler` and :func:`replace_index_sampler`
  walk a (possibly Accelerate-prepared) ``DataLoader`` down to the sampler that
  draws the indices, and swap it. This is the one walker both integrations use:
  ``prepare_miu`` checks that the retain loader samples with REWEIGHT, and the
  Trainer callback puts the REWEIGHT sampler into the Trainer's loader.
* :func:`user_collate` reads the collate function of the user's loader, which
  the loaders the library builds beside it reuse (padding for text).
* :class:`EndingLoader` lets ``prepare_miu``'s critic tuning stop in the middle
  of a prepared loader without leaving it registered with Accelerate.
* :class:`RankBatchSampler` and :class:`EpochLoader` are the loaders of the
  Trainer callback's own passes (forget steps, critic tuning), one global
  stream cut into per-rank shares; :func:`side_loaders` builds both.

How Accelerate nests samplers (accelerate 1.x, ``accelerate/data_loader.py``):
``accelerator.prepare`` returns a ``DataLoaderShard`` whose ``batch_sampler`` is
the original ``BatchSampler`` on one process, or a ``BatchSamplerShard`` wrapping
it on several; a Trainer resuming mid-epoch adds a ``SkipBatchSampler`` on top.
Each wrapper keeps the one below in its ``batch_sampler`` attribute, and
``DataLoaderShard.set_sampler`` also leaves a ``sampler`` reference on the
wrapper (which ``DataLoaderShard.set_epoch`` reads). When the user's loader was
built with a ``BatchSampler`` as its ``sampler`` (no automatic batching), the
chain starts at ``loader.sampler`` instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    ConcatDataset,
    DataLoader,
    Dataset,
    Sampler,
    default_collate,
)

from miu_hooks import batched
from miu_hooks.data import IndexedDataset
from miu_hooks.data_checks import batch_of_one_problem, one_sample_inputs
from miu_hooks.errors import ConfigError, ModelError
from miu_hooks.loader_options import loader_options
from miu_hooks.methods.base import ShuffleSampler
from miu_hooks.sampling import TrainBatchSampler

__all__ = [
    "EndingLoader",
    "check_last_batch",
    "last_batch_size",
    "EpochLoader",
    "RankBatchSampler",
    "batch_sampler_chain",
    "index_sampler",
    "replace_index_sampler",
    "side_loaders",
    "user_collate",
]

_MAX_DEPTH = 8  # a guard against cyclic references; real chains have at most 3 levels


def user_collate(loader: Any) -> Callable[[list[Any]], Any] | None:
    """The collate function the user gave ``loader``; ``None`` for the defaults.

    A ``DataLoader`` built without one has ``default_collate`` (or, from
    :class:`~miu_hooks.methods.base.SeededLoader` on tensor data, the batched
    reader's); the library's loaders then choose their own. Accelerate keeps the
    function when it prepares a loader.

    Example:
        >>> user_collate(DataLoader(range(4))) is None
        True
        >>> user_collate(DataLoader(range(4), collate_fn=list)) is list
        True
    """
    fn = getattr(loader, "collate_fn", None)
    if not callable(fn) or fn is default_collate or fn is batched.collate:
        return None
    return fn


def batch_sampler_chain(loader: Any) -> list[Any]:
    """The loader's batch sampler and the batch samplers it wraps, outermost first.

    Empty when the loader has no batch sampler (an iterable dataset, or a plain
    iterable of batches).

    Example:
        >>> from torch.utils.data import SequentialSampler
        >>> inner = BatchSampler(SequentialSampler(range(6)), 2, drop_last=False)
        >>> class Shard(BatchSampler):  # stands for accelerate's BatchSamplerShard
        ...     def __init__(self, batch_sampler):
        ...         self.batch_sampler = batch_sampler
        ...     def __iter__(self):
        ...         return iter(self.batch_sampler)
        >>> loader = DataLoader(range(6), batch_sampler=Shard(inner))
        >>> [type(s).__name__ for s in batch_sampler_chain(loader)]
        ['Shard', 'BatchSampler']
    """
    sampler = getattr(loader, "sampler", None)
    node = sampler if isinstance(sampler, BatchSampler) else getattr(loader, "batch_sampler", None)
    chain: list[Any] = []
    while node is not None and len(chain) < _MAX_DEPTH and not any(n is node for n in chain):
        chain.append(node)
        inner = getattr(node, "batch_sampler", None)
        if inner is None:
            below = getattr(node, "sampler", None)
            inner = below if isinstance(below, BatchSampler) else None
        node = inner
    return chain


def index_sampler(loader: Any) -> Any:
    """The sampler that draws the indices of ``loader``'s batches (``None`` if there is none).

    It is the ``sampler`` of the innermost batch sampler; a loader without a
    batch sampler gives its own ``sampler`` attribute.

    Example:
        >>> from torch.utils.data import RandomSampler
        >>> type(index_sampler(DataLoader(range(4), batch_size=2, shuffle=True))).__name__
        'RandomSampler'
    """
    chain = batch_sampler_chain(loader)
    if chain:
        return getattr(chain[-1], "sampler", None)
    return getattr(loader, "sampler", None)


def replace_index_sampler(loader: Any, sampler: Any) -> None:
    """Make ``loader`` draw its indices from ``sampler``, in place.

    The innermost batch sampler's ``sampler`` is replaced, and so is every
    wrapper's own ``sampler`` reference (Accelerate's ``set_epoch`` and
    ``get_sampler`` read those), so the loader reports and re-seeds the new
    sampler. Nothing else changes: batch size, ``drop_last``, sharding and the
    number of batches stay as they were when ``sampler`` has the old length.

    Raises:
        ConfigError: The loader has no batch sampler with a ``sampler`` (an
            iterable dataset or a custom batch sampler).

    Example:
        >>> loader = DataLoader(range(4), batch_size=2)
        >>> replace_index_sampler(loader, [3, 2, 1, 0])  # any iterable of indices with a len
        >>> [b.tolist() for b in loader]
        [[3, 2], [1, 0]]
    """
    chain = batch_sampler_chain(loader)
    if not chain or not hasattr(chain[-1], "sampler"):
        raise ConfigError(
            f"cannot replace the sampler of this {type(loader).__name__}: it has no batch "
            "sampler with a `sampler` (an IterableDataset or a custom batch sampler)"
        )
    for node in chain:
        if node is chain[-1] or (
            hasattr(node, "sampler") and not isinstance(node.sampler, BatchSampler)
        ):
            node.sampler = sampler


def last_batch_size(loader: Any) -> int | None:
    """The size of the last batch ``loader`` yields on one process (``None``: unknown).

    Read off its innermost batch sampler (batch size, ``drop_last``, the length
    of the index sampler; a :class:`~miu_hooks.sampling.TrainBatchSampler`
    merges a last single sample).

    Example:
        >>> last_batch_size(DataLoader(range(9), batch_size=4))
        1
        >>> last_batch_size(DataLoader(range(9), batch_sampler=TrainBatchSampler(range(9), 4)))
        5
    """
    chain = batch_sampler_chain(loader)
    node = chain[-1] if chain else None
    size = getattr(node, "batch_size", None)
    sampler = getattr(node, "sampler", None)
    if not isinstance(size, int) or size < 1 or sampler is None or not hasattr(sampler, "__len__"):
        return None
    n = len(sampler)
    full, rest = divmod(n, size)
    if getattr(node, "drop_last", False) or (full and not rest):
        return size if full else None
    if rest == 1 and full and isinstance(node, TrainBatchSampler) and node.merge_single:
        return size + 1
    return rest


def check_last_batch(
    loader: Any,
    model: nn.Module,
    *,
    what: str,
    fix: str,
    keys: dict[str, Any],
    world_size: int = 1,
) -> None:
    """Refuse a loader whose last batch holds one sample when ``model`` cannot train on one.

    Only on one process (Accelerate evens the last batches of several). The
    probe is one training-mode forward on the first sample
    (:func:`~miu_hooks.data_checks.batch_of_one_problem`; nothing is changed).

    Raises:
        ModelError: The last batch has one sample and the model's BatchNorm
            layers cannot train on it; the message says ``what`` and ``fix``.
    """
    if world_size != 1 or last_batch_size(loader) != 1:
        return
    dataset = getattr(loader, "dataset", None)
    if dataset is None or len(dataset) < 1:
        return
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    inputs = one_sample_inputs(dataset, keys, device, getattr(loader, "collate_fn", None))
    why = batch_of_one_problem(model, inputs)
    if why is not None:
        raise ModelError(
            f"{what} ends with a batch of one sample ({len(dataset)} samples), and the model "
            f"cannot take a training step on one ({why}; its BatchNorm layers need more than "
            f"one value per channel): {fix}"
        )


class EndingLoader:
    """Iterate a prepared loader that the engine may abandon mid-epoch (critic tuning).

    Accelerate registers a loader in its ``GradientState`` when iteration starts
    and removes it only at the end; an abandoned iteration would stay registered
    and skew ``end_of_dataloader``/``gather_for_metrics``. This calls the
    loader's ``end()`` (when it has one) however the iteration stops.

    Example:
        >>> batches = iter(EndingLoader(DataLoader(range(6), batch_size=2)))
        >>> next(batches).tolist()
        [0, 1]
    """

    def __init__(self, loader: Iterable[Any]) -> None:
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        """Forward ``epoch`` to the loader (reshuffle)."""
        set_epoch = getattr(self.loader, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from self.loader
        finally:
            end = getattr(self.loader, "end", None)
            if callable(end):
                end()


# -- the callback's own loaders (forget pass, critic tuning) ----------------------------------
class RankBatchSampler(Sampler[list[int]]):
    """Cut one global stream into batches of ``batch_size x world_size``; yield this rank's share.

    Rank ``r`` takes positions ``[r·b, (r+1)·b)`` of each global batch, as
    Accelerate does for the Trainer's own loader, so the batch gathered over
    ranks (in rank order) is the batch a single process at ``world_size x
    batch_size`` would draw. A short last global batch is split evenly and, when
    it does not divide, topped up from the start of the stream so that every
    rank passes the same batch size to the MI all-gather. With one process this
    is plain batching without ``drop_last``. A last global batch that would give
    each rank a single sample joins the global batch before it (BatchNorm cannot
    train on one sample), so no rank gets a batch of one unless the stream
    holds fewer samples than ranks or ``batch_size`` is 1.

    Raises:
        ConfigError: ``batch_size`` or ``world_size`` is below 1, or ``rank`` is
            not in ``[0, world_size)``.

    Example:
        >>> list(RankBatchSampler(range(11), 2, rank=1, world_size=2))  # topped up
        [[2, 3], [6, 7], [10, 0]]
        >>> list(RankBatchSampler(range(10), 2, rank=1, world_size=2))  # no batch of one
        [[2, 3], [7, 8, 9]]
        >>> list(RankBatchSampler(range(9), 4))
        [[0, 1, 2, 3], [4, 5, 6, 7, 8]]
    """

    def __init__(
        self, sampler: Any, batch_size: int, *, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(
                f"bad batch_size/rank/world_size: {batch_size}, {rank}, {world_size} (need "
                "batch_size >= 1 and 0 <= rank < world_size)"
            )
        self.sampler = sampler
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def set_epoch(self, epoch: int) -> None:
        """Forward ``epoch`` to the index sampler (reshuffle)."""
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def _merges(self, n: int) -> bool:
        """Whether the last global batch (of ``n`` samples) joins the one before it."""
        step = self.batch_size * self.world_size
        return self.batch_size > 1 and n > step and 0 < n % step <= self.world_size

    def __len__(self) -> int:
        n = len(self.sampler)
        return math.ceil(n / (self.batch_size * self.world_size)) - int(self._merges(n))

    def __iter__(self) -> Any:
        order = list(self.sampler)
        step = self.batch_size * self.world_size
        starts = list(range(0, len(order), step))
        if self._merges(len(order)):
            starts.pop()
        for i, start in enumerate(starts):
            chunk = order[start : starts[i + 1] if i + 1 < len(starts) else len(order)]
            share = math.ceil(len(chunk) / self.world_size)
            missing = share * self.world_size - len(chunk)
            if missing:
                chunk += (order * math.ceil(missing / len(order)))[:missing]
            yield chunk[self.rank * share : (self.rank + 1) * share]


class EpochLoader(DataLoader):
    """A ``DataLoader`` over a :class:`RankBatchSampler` whose :meth:`set_epoch` reshuffles.

    Example:
        >>> loader = EpochLoader(range(5), batch_sampler=RankBatchSampler(range(5), 3))
        >>> [b.tolist() for b in loader]
        [[0, 1, 2], [3, 4]]
    """

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (same order on every rank)."""
        self.batch_sampler.set_epoch(epoch)  # type: ignore[union-attr]


def side_loaders(
    forget: Dataset,
    retain: Dataset,
    loader: Any,
    runtime: Any,
    *,
    batch_size: int,
    seed: int,
    args: Any,
    indexed: bool = False,
) -> tuple[EpochLoader, EpochLoader]:
    """The Trainer callback's forget loader and critic-tuning loader (over D = retain + forget).

    With several processes each rank loads its share of one global stream
    (:class:`RankBatchSampler`). They batch with ``loader``'s collate function (the
    Trainer's, e.g. padding for text) and follow the Trainer's worker and pin-memory
    settings (``args``). ``indexed``: the tuning items carry their positions in D,
    for the feature cache.
    """
    rank, world = int(getattr(runtime, "rank", 0)), int(getattr(runtime, "world_size", 1))
    device = getattr(runtime, "device", torch.device("cpu"))

    def make(dataset: Dataset, offset: int) -> EpochLoader:
        order = ShuffleSampler(len(dataset), seed + offset)  # type: ignore[arg-type]
        options = loader_options(dataset, device, args.dataloader_num_workers)
        options["pin_memory"] &= bool(getattr(args, "dataloader_pin_memory", True))
        return EpochLoader(
            dataset,
            batch_sampler=RankBatchSampler(order, batch_size, rank=rank, world_size=world),
            collate_fn=getattr(loader, "collate_fn", None),
            generator=torch.Generator().manual_seed(seed),
            **options,
        )

    train: Dataset = ConcatDataset([retain, forget])
    return make(forget, 1), make(IndexedDataset(train) if indexed else train, 2)
