"""Colored Digits / Colored Fashion toy data (docs/method.md §9)."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from miu_hooks.data import GroupTensorDataset
from miu_hooks.demo import ColoredSplits, colored_digits, find_fashion_mnist

pytestmark = pytest.mark.unit

pytest.importorskip("sklearn")

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def splits() -> ColoredSplits:
    return colored_digits(seed=0)


def _all(s: ColoredSplits) -> tuple[torch.Tensor, ...]:
    parts = [getattr(s, k) for k in SPLITS]
    return (
        torch.cat([p.inputs for p in parts]),
        torch.cat([p.labels for p in parts]),
        torch.cat([p.groups for p in parts]),
        torch.cat([s.original_labels[k] for k in SPLITS]),
    )


def _binomial_tol(p: float, n: int, sigmas: float = 4.5) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


# ----------------------------------------------------------------- colored_digits


def test_shapes_dtypes_and_metadata(splits: ColoredSplits) -> None:
    assert (len(splits.train), len(splits.val), len(splits.test)) == (1258, 180, 359)
    for name in SPLITS:
        ds = getattr(splits, name)
        assert isinstance(ds, GroupTensorDataset)
        x, y, g = ds.tensors
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 16, 16)
        assert y.dtype == torch.long and g.dtype == torch.long
        assert ds.groups is g and ds.labels is y and ds.inputs is x
        assert len(splits.original_labels[name]) == len(ds)
        assert x.min() >= -1.0 and x.max() <= 1.0
        assert set(y.unique().tolist()) <= {0, 1}
        assert set(g.unique().tolist()) == {0, 1, 2, 3}
    assert (splits.num_groups, splits.num_sensitive, splits.num_classes) == (4, 2, 2)
    assert len(splits.group_names) == 4
    assert splits.group_names[0] == "y=0 (digit<5), red"
    assert splits.source == "digits"
    x, y, g = splits.train[5]
    assert x.shape == (3, 16, 16) and y.ndim == 0 and g.ndim == 0


def test_splits_partition_the_source(splits: ColoredSplits) -> None:
    _, _, _, orig = _all(splits)
    assert len(orig) == 1797
    # same class histogram as sklearn's load_digits (each class ~180)
    counts = torch.bincount(orig, minlength=10)
    assert counts.sum() == 1797 and counts.min() >= 170


def test_deterministic_per_seed() -> None:
    a, b, c = colored_digits(seed=3), colored_digits(seed=3), colored_digits(seed=4)
    for name in SPLITS:
        for ta, tb in zip(getattr(a, name).tensors, getattr(b, name).tensors, strict=True):
            assert torch.equal(ta, tb)
        assert torch.equal(a.original_labels[name], b.original_labels[name])
    assert not torch.equal(a.train.groups, c.train.groups)


def test_group_is_colour_plus_two_y_and_matches_lit_channel(splits: ColoredSplits) -> None:
    x, y, g, _ = _all(splits)
    colour = g % 2
    assert torch.equal(g, colour + 2 * y)
    lit = (x > -1.0).flatten(2).any(-1)  # [N, 3]: which channel carries the image
    assert torch.equal(lit[:, 0], colour == 0)  # red
    assert torch.equal(lit[:, 1], colour == 1)  # green
    assert not lit[:, 2].any()  # blue is always empty
    assert (lit.sum(1) == 1).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_label_noise_and_colour_flip_rates(seed: int) -> None:
    s = colored_digits(seed=seed)
    _, y, g, orig = _all(s)
    n = len(y)
    noise = (y != (orig >= 5).long()).float().mean().item()
    flip = (g % 2 != y).float().mean().item()
    assert abs(noise - 0.25) < _binomial_tol(0.25, n)
    assert abs(flip - 0.10) < _binomial_tol(0.10, n)
    # majority groups are 0 and 3 (colour agrees with y), minority groups 1 and 2
    freq = torch.bincount(g, minlength=4).float() / n
    assert freq[0] > 0.35 and freq[3] > 0.35
    assert freq[1] < 0.1 and freq[2] < 0.1


def test_rates_follow_arguments() -> None:
    s = colored_digits(seed=0, label_noise=0.0, color_flip=0.0)
    _, y, g, orig = _all(s)
    assert torch.equal(y, (orig >= 5).long())
    assert torch.equal(g % 2, y)
    assert set(g.unique().tolist()) == {0, 3}


@pytest.mark.parametrize("size", [8, 28])
def test_size(size: int) -> None:
    s = colored_digits(seed=0, size=size, test_fraction=0.5, val_fraction=0.0)
    assert s.train.inputs.shape[1:] == (3, size, size)
    assert len(s.val) == 0
    assert len(s.train) + len(s.test) == 1797


def test_max_samples() -> None:
    s = colored_digits(seed=0, max_samples=100)
    assert len(s.train) + len(s.val) + len(s.test) == 100


@pytest.mark.parametrize(
    "kwargs",
    [
        {"label_noise": 1.5},
        {"color_flip": -0.1},
        {"test_fraction": 0.6, "val_fraction": 0.4},
        {"test_fraction": 1.0},
        {"size": 0},
        {"max_samples": 0},
        {"source": "cifar"},
    ],
)
def test_invalid_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        colored_digits(**kwargs)


# ----------------------------------------------------------------- Fashion-MNIST


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_reader_on_synthetic_idx_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    assert find_fashion_mnist(tmp_path) == tmp_path
    s = colored_digits(seed=0, source="fashion", root=tmp_path, size=14)
    _, y, g, orig = _all(s)
    assert len(y) == 60 and s.train.inputs.shape[1:] == (3, 14, 14)
    expected = torch.cat([torch.arange(40) % 10, torch.arange(20) % 10])
    assert torch.equal(orig.sort().values, expected.sort().values)
    assert torch.equal(g, g % 2 + 2 * y)
    assert s.group_names[3] == "y=1 (class>=5), green"


def test_fashion_missing_raises_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        colored_digits(source="fashion", root=tmp_path)


@pytest.mark.slow
def test_fashion_installed() -> None:
    try:
        find_fashion_mnist()
    except FileNotFoundError:
        pytest.skip("Debian dataset-fashion-mnist is not installed")
    s = colored_digits(seed=0, source="fashion", max_samples=2000)
    _, y, _, orig = _all(s)
    assert len(y) == 2000
    assert abs((y != (orig >= 5).long()).float().mean().item() - 0.25) < _binomial_tol(0.25, 2000)
