r"""Colored Digits and Colored Fashion: small Colored-MNIST-style toy data (docs/method.md §9).

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
The forget set is drawn with :func:`miu_hooks.splits.forget_split`.
"""

from __future__ import annotations

import glob
import gzip
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from miu_hooks._imports import require
from miu_hooks.data import GroupTensorDataset
from miu_hooks.errors import ConfigError, DataError

__all__ = ["ColoredSplits", "colored_digits", "find_fashion_mnist"]

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
    r"""Build a Colored-MNIST-style data set with four groups (docs/method.md §9).

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
        ConfigError: A probability, fraction, ``size``, ``max_samples`` or
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
            raise ConfigError(f"{name} must lie in [0, 1]; got {p}")
    for name, p in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"{name} must lie in [0, 1); got {p}")
    if test_fraction + val_fraction >= 1.0:
        raise ConfigError(
            f"test_fraction + val_fraction must be < 1 to leave a training split; "
            f"got {test_fraction} + {val_fraction}"
        )
    if int(size) < 1:
        raise ConfigError(f"size must be a positive number of pixels; got {size}")
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 1:
        raise ConfigError(f"copies must be an integer >= 1; got {copies!r}")
    if max_samples is not None and int(max_samples) < 1:
        raise ConfigError(f"max_samples must be >= 1 or None; got {max_samples}")

    if source == "digits":
        images, classes = _load_sklearn_digits()
    elif source == "fashion":
        images, classes = _load_fashion_mnist(root)
    else:
        raise ConfigError(f"source must be 'digits' or 'fashion'; got {source!r}")

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
