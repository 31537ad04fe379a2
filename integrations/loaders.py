"""Loader plumbing shared by the Trainer and Accelerate integrations.

* :func:`batch_sampler_chain`, :func:`index_sampler` and :func:`replace_index_sampler`
  walk a (possibly Accelerate-prepared) ``DataLoader`` down to the sampler that
  draws the indices, and swap it. This is the one walker both integrations use:
  ``prepare_miu`` checks that the retain loader samples with REWEIGHT, and the
  Trainer callback puts the REWEIGHT sampler into the Trainer's loader.
* :class:`EndingLoader` lets ``prepare_miu``'s critic tuning stop in the middle
  of a prepared loader without leaving it registered with Accelerate.
* :class:`RankBatchSampler` and :class:`EpochLoader` are the loaders of the
  Trainer callback's own passes (forget steps, critic tuning), one global
  stream cut into per-rank shares.

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
from collections.abc import Iterable, Iterator
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, Sampler

from miu_hooks.errors import ConfigError

__all__ = [
    "EndingLoader",
    "EpochLoader",
    "RankBatchSampler",
    "batch_sampler_chain",
    "index_sampler",
    "replace_index_sampler",
]

_MAX_DEPTH = 8  # a guard against cyclic references; real chains have at most 3 levels


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
    is plain batching without ``drop_last``.

    Raises:
        ConfigError: ``batch_size`` or ``world_size`` is below 1, or ``rank`` is
            not in ``[0, world_size)``.

    Example:
        >>> list(RankBatchSampler(range(10), 2, rank=1, world_size=2))
        [[2, 3], [6, 7], [9]]
        >>> list(RankBatchSampler(range(5), 2, rank=1, world_size=2))
        [[2, 3], [0]]
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

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / (self.batch_size * self.world_size))

    def __iter__(self) -> Any:
        order = list(self.sampler)
        step = self.batch_size * self.world_size
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            share = math.ceil(len(chunk) / self.world_size)
            missing = share * self.world_size - len(chunk)
            if missing:
                chunk += (order * math.ceil(missing / len(order)))[:missing]
            yield chunk[self.rank * share : (self.rank + 1) * share]


class EpochLoader(DataLoader):
    """A ``DataLoader`` over a :class:`RankBatchSampler` whose :meth:`set_epoch` reshuffles.

    Example:
        >>> loader = EpochLoader(range(4), batch_sampler=RankBatchSampler(range(4), 3))
        >>> [b.tolist() for b in loader]
        [[0, 1, 2], [3]]
    """

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (same order on every rank)."""
        self.batch_sampler.set_epoch(epoch)  # type: ignore[union-attr]
