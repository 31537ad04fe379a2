"""Forget-set construction and subsets (docs/method.md §1), and the shared data container."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from miu_hooks.data import GroupTensorDataset
from miu_hooks.demo import ColoredSplits, colored_digits
from miu_hooks.errors import DataError, EmptyForgetSetError, EmptyGroupError
from miu_hooks.splits import forget_split, subset

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def splits() -> ColoredSplits:
    pytest.importorskip("sklearn")
    return colored_digits(seed=0)


# ----------------------------------------------------------------- forget_split


@pytest.mark.parametrize("ratio", [0.1, 0.5, 0.9])
def test_forget_split_sizes_and_partition(splits: ColoredSplits, ratio: float) -> None:
    groups = splits.train.groups
    pool = int((groups == 3).sum())
    retain, forget = forget_split(splits.train, forget_groups=(3,), ratio=ratio, seed=0)
    assert len(forget) == math.floor(ratio * pool)
    assert (groups[forget] == 3).all()
    assert retain.dtype == torch.long and forget.dtype == torch.long
    assert torch.equal(retain, retain.sort().values) and torch.equal(forget, forget.sort().values)
    assert not set(retain.tolist()) & set(forget.tolist())
    assert torch.equal(torch.cat([retain, forget]).sort().values, torch.arange(len(groups)))
    # every other group is untouched
    for g in (0, 1, 2):
        assert int((groups[retain] == g).sum()) == int((groups == g).sum())


def test_forget_split_deterministic_and_seeded(splits: ColoredSplits) -> None:
    a = forget_split(splits.train, ratio=0.5, seed=7)
    b = forget_split(splits.train.groups, ratio=0.5, seed=7)
    c = forget_split(splits.train.groups.tolist(), ratio=0.5, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_forget_split_multi_group_pool_is_union() -> None:
    groups = torch.tensor([0] * 10 + [1] * 6 + [2] * 4 + [3] * 10)
    retain, forget = forget_split(groups, forget_groups=(1, 2), ratio=0.5, seed=0)
    assert len(forget) == 5
    assert set(groups[forget].tolist()) <= {1, 2}
    assert len(retain) == 25


def test_forget_split_reads_generic_datasets() -> None:
    groups = torch.tensor([0, 3, 3, 3, 1, 3])
    ds = TensorDataset(torch.zeros(6, 2), torch.zeros(6, dtype=torch.long), groups)
    sub = Subset(ds, [1, 2, 3, 4])
    retain, forget = forget_split(sub, ratio=0.5, seed=0)
    assert len(forget) == 1 and len(retain) == 3
    assert int(groups[torch.tensor(sub.indices)][forget]) == 3


def test_forget_split_errors() -> None:
    groups = torch.tensor([0, 0, 1, 3, 3])
    with pytest.raises(EmptyForgetSetError):
        forget_split(groups, forget_groups=(2,), ratio=0.5)  # empty pool
    with pytest.raises(EmptyForgetSetError):
        forget_split(groups, forget_groups=(3,), ratio=0.1)  # floor(0.2) == 0
    with pytest.raises(EmptyGroupError, match=r"\[3\]"):
        forget_split(groups, forget_groups=(3,), ratio=1.0)
    with pytest.raises(ValueError, match="ratio"):
        forget_split(groups, ratio=1.5)
    with pytest.raises(ValueError, match="forget_groups"):
        forget_split(groups, forget_groups=())
    assert issubclass(EmptyForgetSetError, ValueError)


# ----------------------------------------------------------------- subset


def test_subset_keeps_groups(splits: ColoredSplits) -> None:
    retain, forget = forget_split(splits.train, ratio=0.5, seed=0)
    d_r, d_f = subset(splits.train, retain), subset(splits.train, forget)
    assert isinstance(d_r, GroupTensorDataset) and isinstance(d_f, GroupTensorDataset)
    assert len(d_r) + len(d_f) == len(splits.train)
    assert torch.equal(d_f.groups, splits.train.groups[forget])
    assert torch.equal(d_r.inputs, splits.train.inputs[retain])
    assert torch.equal(subset(splits.train, retain.tolist()).labels, d_r.labels)


def test_subset_rejects_other_datasets() -> None:
    ds = TensorDataset(torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(DataError, match="Subset"):
        subset(ds, [0])
    with pytest.raises(DataError):
        subset(Subset(ds, [0, 1]), [0])  # type: ignore[arg-type]


def test_group_tensor_dataset_length_mismatch() -> None:
    with pytest.raises(DataError, match="same length"):
        GroupTensorDataset(torch.zeros(3, 2), torch.zeros(3), torch.zeros(2))
