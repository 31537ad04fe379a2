r"""Forget-set construction and in-memory subsets (docs/method.md §1).

:func:`forget_split` draws the forget set D_f from chosen groups of a training
set D (the retain set is the rest), and :func:`subset` takes samples of a
:class:`~miu_hooks.data.GroupTensorDataset` while keeping its ``groups`` and
``labels``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from miu_hooks.data import GroupTensorDataset, dataset_groups
from miu_hooks.errors import ConfigError, DataError, EmptyForgetSetError, EmptyGroupError

__all__ = ["forget_split", "subset"]


def _as_groups(dataset_or_groups: Dataset | Tensor | Sequence[int] | np.ndarray) -> Tensor:
    if isinstance(dataset_or_groups, Tensor):
        return dataset_or_groups.long().reshape(-1)
    if isinstance(dataset_or_groups, (np.ndarray, list, tuple)):
        return torch.as_tensor(np.asarray(dataset_or_groups), dtype=torch.long).reshape(-1)
    return dataset_groups(dataset_or_groups)  # type: ignore[arg-type]


def forget_split(
    dataset_or_groups: Dataset | Tensor | Sequence[int] | np.ndarray,
    *,
    forget_groups: Sequence[int] = (3,),
    ratio: float = 0.5,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    r"""Split training indices into retain and forget sets (docs/method.md §1).

    Pools every index whose group is in ``forget_groups`` and draws
    :math:`\lfloor r \cdot |\text{pool}| \rfloor` of them uniformly without
    replacement (a :class:`torch.Generator` seeded with ``seed``). The draw is
    D_f; every other index is D_r. With several forget groups the pool is their
    union, so per-group counts vary between seeds.

    Args:
        dataset_or_groups: A data set (its groups are read with
            :func:`miu_hooks.data.dataset_groups`) or LongTensor[N] of group ids.
        forget_groups: Group ids g = s + y * S forming the pool.
        ratio: r, the fraction of the pool that is forgotten, in [0, 1].
        seed: Seed of the draw.

    Returns:
        ``(retain_indices, forget_indices)``: sorted, disjoint LongTensors that
        together cover ``range(N)``.

    Raises:
        ConfigError: ``ratio`` lies outside [0, 1] or ``forget_groups`` is empty.
        EmptyForgetSetError: The draw is empty (empty pool, or r * |pool| < 1).
        EmptyGroupError: The draw removes every sample of a group.

    Example:
        >>> groups = torch.tensor([0, 3, 3, 1, 3, 2, 3, 0])
        >>> retain, forget = forget_split(groups, forget_groups=(3,), ratio=0.5, seed=0)
        >>> len(forget), bool((groups[forget] == 3).all())
        (2, True)
        >>> sorted(retain.tolist() + forget.tolist()) == list(range(8))
        True
    """
    ratio = float(ratio)
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(
            f"ratio is the fraction of the forget group to remove, in [0, 1]; got {ratio}"
        )
    wanted = torch.as_tensor(list(forget_groups), dtype=torch.long).reshape(-1)
    if wanted.numel() == 0:
        raise ConfigError("forget_groups is empty; pass at least one group id, e.g. (3,)")
    groups = _as_groups(dataset_or_groups)
    pool = torch.nonzero(torch.isin(groups, wanted)).reshape(-1)
    k = math.floor(ratio * len(pool))
    if k == 0:
        present = sorted(set(groups.tolist()))
        raise EmptyForgetSetError(
            f"the forget set is empty: groups {wanted.tolist()} hold {len(pool)} samples and "
            f"floor({ratio} * {len(pool)}) = 0; groups present are {present}. "
            f"Raise ratio or choose other forget_groups"
        )
    gen = torch.Generator().manual_seed(int(seed))
    forget = pool[torch.randperm(len(pool), generator=gen)[:k]].sort().values
    mask = torch.ones(len(groups), dtype=torch.bool)
    mask[forget] = False
    retain = torch.nonzero(mask).reshape(-1)
    before = torch.unique(groups)
    after = torch.unique(groups[retain])
    emptied = [int(g) for g in before if not bool((after == g).any())]
    if emptied:
        raise EmptyGroupError(
            f"forgetting {k} samples leaves group(s) {emptied} with no retain sample "
            f"(ratio={ratio}); REWEIGHT needs N_g(D_r) > 0 for every group. Use ratio < 1"
        )
    return retain, forget


def subset(dataset: TensorDataset, indices: Tensor | Sequence[int]) -> GroupTensorDataset:
    """Return the samples ``indices`` of ``dataset`` as a :class:`GroupTensorDataset`.

    Unlike :class:`torch.utils.data.Subset`, the result holds its own
    (indexed) tensors and keeps ``.groups`` and ``.labels``.

    Args:
        dataset: A :class:`TensorDataset` of ``(inputs, labels, groups, ...)``;
            tensors after the third are dropped.
        indices: LongTensor[M] or sequence of positions.

    Returns:
        A :class:`GroupTensorDataset` of M samples.

    Raises:
        DataError: ``dataset`` is not a TensorDataset with at least 3 tensors.

    Example:
        >>> data = GroupTensorDataset(torch.zeros(6, 2), torch.tensor([0, 1, 1, 0, 1, 1]),
        ...                           torch.tensor([0, 3, 3, 1, 3, 2]))
        >>> retain, forget = forget_split(data, forget_groups=(3,), ratio=0.5)
        >>> d_f = subset(data, forget)
        >>> len(d_f) == len(forget), d_f.groups.unique().tolist()
        (True, [3])
    """
    if not isinstance(dataset, TensorDataset) or len(dataset.tensors) < 3:
        raise DataError(
            f"subset() needs a TensorDataset of (inputs, labels, groups); got "
            f"{type(dataset).__name__}. Use torch.utils.data.Subset for other data sets"
        )
    idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    inputs, labels, groups = dataset.tensors[:3]
    return GroupTensorDataset(inputs[idx], labels[idx], groups[idx])
