r"""Small Colored-MNIST-style data sets and forget-set splits (METHOD.md §1, §9).

The data sets follow the IRM Colored-MNIST construction on images that need
no download:

1. :math:`y = \mathbb{1}[\text{class} \ge 5]`, flipped with probability
   ``label_noise`` (0.25);
2. colour :math:`c = y`, flipped with probability ``color_flip`` (0.1); the
   image is drawn in the red channel when :math:`c = 0` and in the green
   channel when :math:`c = 1` (the blue channel is always empty);
3. group :math:`g = c + 2y` (``num_sensitive = 2``, four groups).

Colour therefore predicts ``y`` better (90%) than the shape does (75%), and
groups 0 and 3 are the majority groups.

Only torch and numpy are imported at module import; scikit-learn (for
:func:`sklearn.datasets.load_digits`) is imported when a data set is built.
"""

from __future__ import annotations

import glob
import gzip
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from miu_hooks._imports import require
from miu_hooks.errors import DataError, EmptyForgetSetError, EmptyGroupError

__all__ = [
    "ColoredSplits",
    "GroupTensorDataset",
    "colored_digits",
    "find_fashion_mnist",
    "forget_split",
    "subset",
]

FASHION_ENV = "MIU_FASHION_MNIST_DIR"
_FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_FASHION_GLOBS = (
    "/usr/share/datasets/fashion-mnist",
    "/usr/share/dataset-fashion-mnist",
    "/usr/share/*fashion*mnist*",
    "/usr/share/*/*fashion*mnist*",
    "/usr/share/*fashion*mnist*/*",
    "/usr/local/share/*fashion*mnist*",
)


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


@dataclass(frozen=True)
class ColoredSplits:
    """Train, validation and test splits of a coloured data set.

    Attributes:
        train: Training split D (the forget set is drawn from it).
        val: Validation split.
        test: Test split.
        num_groups: |G| = K * S = 4.
        num_sensitive: S = 2 (the colour).
        num_classes: K = 2.
        group_names: Human-readable name of each group id.
        original_labels: Per split (``"train"``, ``"val"``, ``"test"``), the
            source class of each sample (digit 0-9 or Fashion-MNIST class 0-9),
            before thresholding and label noise.
        source: ``"digits"`` or ``"fashion"``.
    """

    train: GroupTensorDataset
    val: GroupTensorDataset
    test: GroupTensorDataset
    num_groups: int = 4
    num_sensitive: int = 2
    num_classes: int = 2
    group_names: tuple[str, ...] = ()
    original_labels: dict[str, Tensor] = field(default_factory=dict, repr=False)
    source: str = "digits"


def _group_names(source: str) -> tuple[str, ...]:
    what = "digit" if source == "digits" else "class"
    return (
        f"y=0 ({what}<5), red",
        f"y=0 ({what}<5), green",
        f"y=1 ({what}>=5), red",
        f"y=1 ({what}>=5), green",
    )


def colored_digits(
    *,
    seed: int = 0,
    label_noise: float = 0.25,
    color_flip: float = 0.1,
    size: int = 16,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    source: Literal["digits", "fashion"] = "digits",
    max_samples: int | None = None,
    root: str | os.PathLike[str] | None = None,
    copies: int = 1,
) -> ColoredSplits:
    r"""Build a Colored-MNIST-style data set with four groups (METHOD.md §9).

    Images come from scikit-learn's bundled ``load_digits`` (1,797 images of
    8x8, no download) or, with ``source="fashion"``, from Debian's
    ``dataset-fashion-mnist`` files (70,000 images of 28x28; see
    :func:`find_fashion_mnist`). Each image becomes 3 x ``size`` x ``size``
    (bilinear resize) with the shape in the red (colour 0) or green (colour 1)
    channel, scaled to [0, 1] and normalised with mean = std = 0.5, so empty
    channels hold -1.

    .. math::

        y = \mathbb{1}[\text{class} \ge 5] \oplus n,\quad
        n \sim \mathrm{Bernoulli}(\text{label\_noise}),\qquad
        c = y \oplus f,\quad f \sim \mathrm{Bernoulli}(\text{color\_flip}),\qquad
        g = c + 2y.

    Everything (noise, colours, the split) is drawn from one
    :class:`torch.Generator` seeded with ``seed``, so a seed fixes the data set.

    Args:
        seed: Seed of every random draw.
        label_noise: Probability of flipping the thresholded class.
        color_flip: Probability that the colour disagrees with the (noisy) label.
        size: Side of the square output images, in pixels.
        test_fraction: Share of the samples in the test split.
        val_fraction: Share of the samples in the validation split.
        source: ``"digits"`` (scikit-learn) or ``"fashion"`` (Debian files).
        max_samples: Keep a random subset of this many source images first
            (useful with Fashion-MNIST: all 70k at 16x16 take about 215 MB).
        root: Folder holding the Fashion-MNIST ``*-ubyte.gz`` files; found
            automatically when ``None``.
        copies: Samples drawn per source image (default 1). With ``copies > 1``
            each copy is rescaled in intensity with a little pixel noise, and
            gets its own label noise and colour; all copies of one source
            image land in the same split, so the test set shares no image with
            training. This enlarges the 1,797 bundled digits enough for stable
            per-group accuracies.

    Returns:
        A :class:`ColoredSplits` whose splits are :class:`GroupTensorDataset`\ s
        of ``(float32[N, 3, size, size], long[N], long[N])``.

    Raises:
        ValueError: A probability, fraction, ``size``, ``max_samples`` or
            ``source`` is out of range.
        FileNotFoundError: ``source="fashion"`` and the files are not installed.
        ImportError: ``source="digits"`` and scikit-learn is missing.

    Example:
        >>> splits = colored_digits(seed=0)
        >>> x, y, g = splits.train[0]
        >>> tuple(x.shape), x.dtype, splits.num_groups, len(splits.train)
        ((3, 16, 16), torch.float32, 4, 1258)
        >>> len(splits.val), len(splits.test)
        (180, 359)
        >>> bool((splits.train.groups == splits.train.groups % 2 + 2 * splits.train.labels).all())
        True
        >>> splits.group_names[3]
        'y=1 (digit>=5), green'
    """
    for name, p in (("label_noise", label_noise), ("color_flip", color_flip)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1]; got {p}")
    for name, p in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{name} must lie in [0, 1); got {p}")
    if test_fraction + val_fraction >= 1.0:
        raise ValueError(
            f"test_fraction + val_fraction must be < 1 to leave a training split; "
            f"got {test_fraction} + {val_fraction}"
        )
    if int(size) < 1:
        raise ValueError(f"size must be a positive number of pixels; got {size}")
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ValueError(f"copies must be an integer >= 1; got {copies!r}")
    if max_samples is not None and int(max_samples) < 1:
        raise ValueError(f"max_samples must be >= 1 or None; got {max_samples}")

    if source == "digits":
        images, classes = _load_sklearn_digits()
    elif source == "fashion":
        images, classes = _load_fashion_mnist(root)
    else:
        raise ValueError(f"source must be 'digits' or 'fashion'; got {source!r}")

    gen = torch.Generator().manual_seed(int(seed))
    if max_samples is not None and max_samples < len(classes):
        keep = torch.randperm(len(classes), generator=gen)[: int(max_samples)]
        keep = keep.sort().values
        images, classes = images[keep], classes[keep]
    n = len(classes)
    source_of = torch.arange(n)
    if copies > 1:
        source_of = source_of.repeat_interleave(copies)
        images, classes = _jitter(images[source_of], gen), classes[source_of]
    n_all = len(classes)

    y_clean = (classes >= 5).long()
    noise = (torch.rand(n_all, generator=gen) < label_noise).long()
    y = y_clean ^ noise
    flip = (torch.rand(n_all, generator=gen) < color_flip).long()
    colour = y ^ flip
    groups = colour + 2 * y

    inputs = _colourise(images, colour, int(size))

    perm = torch.randperm(n, generator=gen)
    n_test = round(test_fraction * n)
    n_val = round(val_fraction * n)
    split_of = torch.empty(n, dtype=torch.long)
    split_of[perm[:n_test]] = 0
    split_of[perm[n_test : n_test + n_val]] = 1
    split_of[perm[n_test + n_val :]] = 2
    sample_split = split_of[source_of]
    parts = {
        name: (sample_split == code).nonzero().flatten()
        for name, code in (("test", 0), ("val", 1), ("train", 2))
    }
    made = {k: GroupTensorDataset(inputs[v], y[v], groups[v]) for k, v in parts.items()}
    return ColoredSplits(
        train=made["train"],
        val=made["val"],
        test=made["test"],
        group_names=_group_names(source),
        original_labels={k: classes[v] for k, v in parts.items()},
        source=source,
    )


def _jitter(images: Tensor, gen: torch.Generator) -> Tensor:
    """Rescale each image[N, H, W] by 0.8-1.2 and add N(0, 0.05^2) pixel noise."""
    scale = 0.8 + 0.4 * torch.rand(images.shape[0], 1, 1, generator=gen)
    noise = 0.05 * torch.randn(images.shape, generator=gen)
    return (images * scale + noise).clamp_(0.0, 1.0)


def _colourise(images: Tensor, colour: Tensor, size: int) -> Tensor:
    """Turn float images[N, H, W] in [0, 1] into normalised float32[N, 3, size, size]."""
    x = images.float().unsqueeze(1)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        ).clamp_(0.0, 1.0)
    out = torch.zeros(len(x), 3, size, size, dtype=torch.float32)
    out[torch.arange(len(x)), colour] = x[:, 0]
    return out.sub_(0.5).div_(0.5)


def _load_sklearn_digits() -> tuple[Tensor, Tensor]:
    sk_datasets = require("sklearn.datasets", extra="demo")
    bunch = sk_datasets.load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0)
    classes = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return images, classes


def find_fashion_mnist(root: str | os.PathLike[str] | None = None) -> Path:
    """Return the folder holding Debian's ``dataset-fashion-mnist`` idx files.

    Looks in ``root``, then in ``$MIU_FASHION_MNIST_DIR``, then under
    ``/usr/share`` (``apt-get install dataset-fashion-mnist``). A folder
    qualifies when it holds the four ``*-ubyte`` files, gzipped or not.

    Args:
        root: Folder to use instead of searching.

    Returns:
        The folder.

    Raises:
        FileNotFoundError: No folder holds the four files.

    Example:
        >>> try:
        ...     folder = find_fashion_mnist()
        ... except FileNotFoundError as err:
        ...     folder = None
        ...     assert "dataset-fashion-mnist" in str(err)
    """
    candidates: list[str] = []
    if root is not None:
        candidates.append(os.fspath(root))
    else:
        if os.environ.get(FASHION_ENV):
            candidates.append(os.environ[FASHION_ENV])
        for pattern in _FASHION_GLOBS:
            candidates.extend(sorted(glob.glob(pattern)))
    for cand in candidates:
        folder = Path(cand)
        if folder.is_dir() and all(_idx_file(folder, f) is not None for f in _FASHION_FILES):
            return folder
    where = os.fspath(root) if root is not None else f"${FASHION_ENV} or /usr/share"
    raise FileNotFoundError(
        f"Fashion-MNIST idx files ({', '.join(f + '.gz' for f in _FASHION_FILES)}) "
        f"not found in {where}; install them with 'apt-get install dataset-fashion-mnist' "
        f"(list them with 'dpkg -L dataset-fashion-mnist'), set {FASHION_ENV}, or use "
        f"source='digits'"
    )


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    alt = sorted(folder.glob(stem.replace("-idx", ".idx") + "*"))  # e.g. train-images.idx3-ubyte
    return alt[0] if alt else None


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte idx file")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != math.prod(dims):
        raise DataError(f"{path} holds {arr.size} values; its header says {dims}")
    return arr.reshape(dims)


def _load_fashion_mnist(root: str | os.PathLike[str] | None) -> tuple[Tensor, Tensor]:
    folder = find_fashion_mnist(root)
    arrays = []
    for stem in _FASHION_FILES:
        path = _idx_file(folder, stem)
        if path is None:  # pragma: no cover - find_fashion_mnist checked it
            raise FileNotFoundError(f"{folder / stem}.gz is missing")
        arrays.append(_read_idx(path))
    images = np.concatenate([arrays[0], arrays[2]])
    classes = np.concatenate([arrays[1], arrays[3]]).astype(np.int64)
    return torch.from_numpy(images.astype(np.float32) / 255.0), torch.from_numpy(classes)


def _as_groups(dataset_or_groups: Dataset | Tensor | Sequence[int] | np.ndarray) -> Tensor:
    if isinstance(dataset_or_groups, Tensor):
        return dataset_or_groups.long().reshape(-1)
    if isinstance(dataset_or_groups, (np.ndarray, list, tuple)):
        return torch.as_tensor(np.asarray(dataset_or_groups), dtype=torch.long).reshape(-1)
    from miu_hooks.data import dataset_groups

    return dataset_groups(dataset_or_groups)  # type: ignore[arg-type]


def forget_split(
    dataset_or_groups: Dataset | Tensor | Sequence[int] | np.ndarray,
    *,
    forget_groups: Sequence[int] = (3,),
    ratio: float = 0.5,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    r"""Split training indices into retain and forget sets (METHOD.md §1).

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
        ValueError: ``ratio`` lies outside [0, 1] or ``forget_groups`` is empty.
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
        raise ValueError(
            f"ratio is the fraction of the forget group to remove, in [0, 1]; got {ratio}"
        )
    wanted = torch.as_tensor(list(forget_groups), dtype=torch.long).reshape(-1)
    if wanted.numel() == 0:
        raise ValueError("forget_groups is empty; pass at least one group id, e.g. (3,)")
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
        >>> splits = colored_digits(seed=0)
        >>> retain, forget = forget_split(splits.train, ratio=0.5)
        >>> d_f = subset(splits.train, forget)
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
