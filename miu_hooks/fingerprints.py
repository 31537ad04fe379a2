"""Digests that identify models, data and id lists (sha256), and id-list checks.

Used by :mod:`miu_hooks.ledger` and ``miu-unlearn`` to recognise the original
model, the training data and each forget list across deletion requests. Only
the standard library and numpy are imported; torch by :func:`weights_sha256`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from miu_hooks.errors import DataError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["check_ids", "ids_sha256", "sha256_file", "sha256_path", "weights_sha256"]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Return the hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_path(path: str | os.PathLike[str]) -> str:
    """Return the sha256 of a file, or of a folder's files (names and contents).

    A folder (e.g. a ``datasets`` ``save_to_disk`` folder) hashes, in sorted
    order, every file's path relative to the folder and that file's sha256, so
    renaming, adding, removing or changing any file changes the digest.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "a.txt").write_text("1")
        >>> before = sha256_path(d)
        >>> _ = (d / "a.txt").write_text("2")
        >>> before != sha256_path(d), len(before)
        (True, 64)
    """
    p = Path(path)
    if not p.is_dir():
        return sha256_file(p)
    digest = hashlib.sha256(b"folder\0")
    for item in sorted(q for q in p.rglob("*") if q.is_file()):
        digest.update(item.relative_to(p).as_posix().encode() + b"\0")
        digest.update(sha256_file(item).encode() + b"\0")
    return digest.hexdigest()


def weights_sha256(model: nn.Module) -> str:
    """Return a sha256 of ``model``'s ``state_dict`` (names, dtypes, shapes and bytes).

    For in-memory models; a model saved to a file is identified by the file's
    sha256 (:func:`sha256_file`) instead, which is what ``miu-unlearn`` records.

    Example:
        >>> import torch
        >>> a = torch.nn.Linear(2, 2)
        >>> b = torch.nn.Linear(2, 2)
        >>> _ = b.load_state_dict(a.state_dict())
        >>> weights_sha256(a) == weights_sha256(b)
        True
    """
    import torch

    digest = hashlib.sha256(b"state_dict\0")
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}\0{t.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_ids(ids: Iterable[int] | np.ndarray, what: str = "ids") -> np.ndarray:
    """Return ``ids`` as int64[M], checking they are unique integers.

    Raises:
        DataError: Not a flat sequence of integers, or an id repeats.

    Example:
        >>> check_ids([4, 7]).tolist()
        [4, 7]
    """
    arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{what} must be a flat sequence of integers; got {arr.dtype}{arr.shape}")
    arr = arr.astype(np.int64)
    uniq, counts = np.unique(arr, return_counts=True)
    if (counts > 1).any():
        shown = ", ".join(str(v) for v in uniq[counts > 1][:10])
        raise DataError(f"{what} must be unique; repeated: {shown}")
    return arr


def ids_sha256(ids: Iterable[int] | np.ndarray) -> str:
    r"""Return the sha256 of ``ids`` written as a forget CSV (``id`` header, one id a line).

    The Python API's stand-in for the forget file's sha256 that ``miu-unlearn``
    records: the same ids in the same order as the file ``id\n4\n7\n``
    give that file's digest.

    Example:
        >>> import hashlib
        >>> ids_sha256([4, 7]) == hashlib.sha256(b"id\n4\n7\n").hexdigest()
        True
    """
    text = "id\n" + "".join(f"{int(i)}\n" for i in check_ids(ids))
    return hashlib.sha256(text.encode()).hexdigest()
