"""REWEIGHT sampling: draw the retain set with the original group mixture."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, Dataset, Sampler, WeightedRandomSampler

from miu_hooks.errors import ConfigError, DataError
from miu_hooks.functional import group_weights
from miu_hooks.seeding import epoch_generator

__all__ = ["GroupReweightSampler", "ResampledView", "TrainBatchSampler"]


class GroupReweightSampler(Sampler[int]):
    r"""Sample retain indices with replacement, weight :math:`N_g(D)/N_g(D_r)` per group.

    The expected group frequencies of the drawn stream equal the training set's
    :math:`N_g(D)/|D|` (docs/method.md §2). Each epoch is a
    :class:`~torch.utils.data.WeightedRandomSampler` (with replacement) whose
    generator is seeded by :func:`~miu_hooks.seeding.epoch_seed` from the
    generator's initial seed and the epoch (:meth:`set_epoch`), so the stream is
    a pure function of (seed, epoch): every process of a distributed run draws
    the same stream and can take its own shard of it, and a resumed run draws
    what an uninterrupted one would.

    Args:
        retain_groups: LongTensor[N_r], group of each retain sample.
        train_groups: LongTensor[N], group of each training sample (retain ∪ forget).
        num_samples: Draws per epoch (default ``N_r``).
        generator: Source of randomness; a seeded one is created when ``None``.
        num_groups: |G| (default ``max id + 1``).
        seed: Seed of the generator created when ``generator`` is ``None``.
        exclude: Retain positions never drawn (e.g. the collapse guard's held-out
            slice); the weights count the kept retain samples only, so the stream
            still reproduces D's mixture.

    Attributes:
        excluded: LongTensor of the excluded positions (empty when none).

    Example:
        >>> s = GroupReweightSampler(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1, 1]))
        >>> s.weights.tolist()
        [2.0, 1.0, 1.0]
        >>> len(list(s))
        3
        >>> s = GroupReweightSampler(torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1, 1]),
        ...                          exclude=torch.tensor([2]))
        >>> s.weights.tolist(), 2 in list(s)
        ([2.0, 2.0, 0.0], False)
    """

    def __init__(
        self,
        retain_groups: Tensor,
        train_groups: Tensor,
        num_samples: int | None = None,
        generator: torch.Generator | None = None,
        *,
        num_groups: int | None = None,
        seed: int = 0,
        exclude: Tensor | None = None,
    ) -> None:
        retain_groups = torch.as_tensor(retain_groups).long().reshape(-1)
        if retain_groups.numel() == 0:
            raise DataError("GroupReweightSampler needs a non-empty retain set")
        self.excluded = (
            torch.zeros(0, dtype=torch.long)
            if exclude is None
            else torch.as_tensor(exclude, dtype=torch.long).reshape(-1)
        )
        kept = torch.ones(retain_groups.numel(), dtype=torch.bool)
        kept[self.excluded] = False
        self.group_weights = group_weights(train_groups, retain_groups[kept], num_groups)
        self.weights = self.group_weights[retain_groups].double()
        self.weights[self.excluded] = 0.0
        self.num_samples = int(num_samples) if num_samples is not None else len(retain_groups)
        if self.num_samples < 1:
            raise ConfigError(f"num_samples must be >= 1; got {num_samples}")
        if generator is None:
            generator = torch.Generator()
            generator.manual_seed(seed)
        self.generator = generator
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration depend on ``epoch`` (same stream on every process)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def epoch_sampler(self) -> WeightedRandomSampler:
        """Return this epoch's :class:`~torch.utils.data.WeightedRandomSampler`.

        Its generator is seeded from ``generator.initial_seed()`` (the seed at
        construction, or as re-seeded by a launcher that synchronises it) and
        the epoch.
        """
        gen = epoch_generator(int(self.generator.initial_seed()), self.epoch)
        weights: Any = self.weights  # a double tensor; torch annotates Sequence[float]
        return WeightedRandomSampler(weights, self.num_samples, replacement=True, generator=gen)

    def draw(self) -> Tensor:
        """Return this epoch's LongTensor[num_samples] of retain positions."""
        return torch.tensor(list(self.epoch_sampler()), dtype=torch.long)

    def __iter__(self) -> Iterator[int]:
        yield from self.epoch_sampler()

    def state_dict(self) -> dict[str, Any]:
        """Return the epoch and seed, for checkpointing."""
        return {"epoch": self.epoch, "seed": int(self.generator.initial_seed())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        self.epoch = int(state["epoch"])
        self.generator.manual_seed(int(state["seed"]))


class ResampledView(Dataset):
    """A fixed-length view of ``dataset`` whose index map is redrawn by REWEIGHT.

    ``view[i]`` is ``dataset[index_map[i]]``; :meth:`set_epoch` redraws the map
    from the sampler. Any ordinary sampler (including a distributed one) can then
    shuffle the view, which is how the Trainer callback reweights without
    replacing the Trainer's sampler.

    Example:
        >>> base = [(torch.zeros(1), 0, g) for g in (0, 1, 1)]
        >>> view = ResampledView(base, GroupReweightSampler(torch.tensor([0, 1, 1]),
        ...                                                 torch.tensor([0, 0, 1, 1])))
        >>> len(view)
        3
    """

    def __init__(self, dataset: Any, sampler: GroupReweightSampler) -> None:
        self.dataset = dataset
        self.sampler = sampler
        self.index_map = sampler.draw()

    def set_epoch(self, epoch: int) -> None:
        """Redraw the index map for ``epoch``."""
        self.sampler.set_epoch(epoch)
        self.index_map = self.sampler.draw()

    def __len__(self) -> int:
        return int(self.index_map.numel())

    def __getitem__(self, i: int) -> Any:
        return self.dataset[int(self.index_map[i])]

    def __getattr__(self, name: str) -> Any:
        # Forward attributes such as ``column_names`` to the wrapped dataset.
        if name in ("dataset", "sampler", "index_map"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class TrainBatchSampler(BatchSampler):
    """Batches for training passes: never a last batch of one sample after full ones.

    Batches ``sampler``'s indices ``batch_size`` at a time, like
    :class:`~torch.utils.data.BatchSampler`, except that a last batch holding a
    single sample joins the batch before it (``batch_size + 1`` samples): in
    training mode BatchNorm cannot normalise one sample, and a one-sample step
    is noise. Every sample of the epoch is still seen. A set of one sample
    (or ``batch_size=1``) still gives batches of one; ``merge_single=False``
    batches exactly as ``BatchSampler`` does (used under Accelerate's
    multi-process sharding, which evens the last batches itself).

    Args:
        sampler: The index sampler (its ``set_epoch`` is forwarded).
        batch_size: Samples per batch.
        drop_last: Drop a last incomplete batch (as ``BatchSampler``).
        merge_single: Merge a last batch of one into the batch before it.

    Example:
        >>> [len(b) for b in TrainBatchSampler(range(9), 4)]
        [4, 5]
        >>> [len(b) for b in TrainBatchSampler(range(10), 4)], len(TrainBatchSampler(range(9), 4))
        ([4, 4, 2], 2)
    """

    def __init__(
        self,
        sampler: Sampler[int] | Any,
        batch_size: int,
        drop_last: bool = False,
        *,
        merge_single: bool = True,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.merge_single = merge_single

    def set_epoch(self, epoch: int) -> None:
        """Forward ``epoch`` to the index sampler (reshuffle / redraw)."""
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def _merges(self, n: int) -> bool:
        return self.merge_single and not self.drop_last and n > self.batch_size > 1 and (
            n % self.batch_size == 1
        )

    def __iter__(self) -> Iterator[list[int]]:
        if not self.merge_single:
            yield from super().__iter__()
            return
        held: list[int] | None = None
        batch: list[int] = []
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                if held is not None:
                    yield held
                held, batch = batch, []
        if len(batch) == 1 and held is not None and self.batch_size > 1 and not self.drop_last:
            held, batch = held + batch, []
        if held is not None:
            yield held
        if batch and not self.drop_last:
            yield batch

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return super().__len__() - int(self._merges(n))
