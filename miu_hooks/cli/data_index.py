"""Torch-free reading of ``miu-unlearn`` data files: labels, groups and ids only.

Three formats are accepted, told apart by the path:

* a ``.safetensors`` file with the tensors ``inputs``, ``labels``, ``groups`` and,
  optionally, ``ids`` (metadata ``group_names``: a JSON list of names);
* a ``.csv`` manifest with the columns ``path,label,group[,id]``; image paths are
  relative to the manifest's folder;
* a folder written by ``datasets.Dataset.save_to_disk`` (the optional
  ``datasets`` package), columns ``image`` (or ``img``/``pixel_values``/``inputs``)
  or ``input_ids`` (tokenized text, with ``attention_mask`` when present),
  ``label`` (or ``labels``), ``group`` (or ``groups``) and optionally ``id`` (or
  ``ids``). A ``DatasetDict`` folder gives one split: ``PATH:split``, else the
  caller's default (``train`` for the data, ``test``, ``validation``), else its
  only split.

Column and tensor names can be overridden (``--input-key`` and friends). This
module reads only what the checks need, with numpy, so that bad input is
reported before torch is imported; the inputs themselves are loaded by
:mod:`miu_hooks.cli.load`.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from miu_hooks.cli.errors import InputNotFoundError, MissingDependencyError
from miu_hooks.errors import DataError

__all__ = ["Columns", "DataIndex", "is_text", "read_data_index"]

Kind = Literal["tensors", "manifest", "datasets"]
_DEFAULTS: dict[str, dict[str, str]] = {
    "tensors": {"input": "inputs", "label": "labels", "group": "groups", "id": "ids"},
    "manifest": {"input": "path", "label": "label", "group": "group", "id": "id"},
    "datasets": {"input": "image", "label": "label", "group": "group", "id": "id"},
}
_IMAGE_COLUMNS = ("image", "img", "pixel_values", "inputs")
# Other names a datasets folder's column may have when its key is not given.
_DATASETS_ALTERNATIVES = {
    "input": (*_IMAGE_COLUMNS, "input_ids"),  # input_ids: tokenized text (cli/text.py)
    "label": ("label", "labels"),
    "group": ("group", "groups"),
    "id": ("id", "ids"),
}
_INT = re.compile(r"^[+-]?\d+$")


@dataclass(frozen=True)
class Columns:
    """Names of the input, label, group and id columns; ``None`` means the format's default.

    Attributes:
        input: Inputs tensor / image-path column / image column.
        label: Label column.
        group: Group-id column.
        id: Sample-id column (optional in the data).
    """

    input: str | None = None
    label: str | None = None
    group: str | None = None
    id: str | None = None

    def resolve(self, kind: Kind) -> dict[str, str]:
        """Return the four names for ``kind``, defaults filled in."""
        given = {"input": self.input, "label": self.label, "group": self.group, "id": self.id}
        return {k: v if v is not None else _DEFAULTS[kind][k] for k, v in given.items()}


@dataclass(frozen=True)
class DataIndex:
    """What the checks need from a data set, without its inputs.

    Attributes:
        path: The file or folder.
        kind: ``"tensors"``, ``"manifest"`` or ``"datasets"``.
        keys: Resolved column names (``input``, ``label``, ``group``, ``id``).
        labels: int64[N] labels.
        groups: int64[N] group ids.
        ids: int64[N] unique sample ids, or ``None`` (row positions are used).
        group_names: Names stored with the data (safetensors metadata), if any.
        paths: Image paths of a manifest (resolved), else empty.
        handle: The loaded ``datasets.Dataset`` for ``kind="datasets"``.
        split: The split of a ``DatasetDict`` folder, else ``None``.
    """

    path: Path
    kind: Kind
    keys: dict[str, str]
    labels: np.ndarray
    groups: np.ndarray
    ids: np.ndarray | None = None
    group_names: tuple[str, ...] = ()
    paths: tuple[Path, ...] = ()
    handle: Any = field(default=None, repr=False, compare=False)
    split: str | None = None

    def __len__(self) -> int:
        return len(self.groups)


def split_suffix(path: str | Path) -> tuple[Path, str | None]:
    """Split ``FOLDER:split`` into the folder and the split (``None`` when there is none).

    The suffix counts only when ``path`` itself does not exist and the part before
    the last ``:`` is a folder, so a file name holding ``:`` is read as it is.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> split_suffix(f"{d}:test") == (Path(d), "test"), split_suffix(d) == (Path(d), None)
        (True, True)
    """
    text = str(path)
    p = Path(text).expanduser()
    head, sep, tail = text.rpartition(":")
    if not p.exists() and sep and tail and "/" not in tail and Path(head).expanduser().is_dir():
        return Path(head).expanduser(), tail
    return p, None


def is_text(index: DataIndex) -> bool:
    """Whether ``index`` is a ``datasets`` folder whose input column holds token-id sequences.

    Example:
        >>> index = DataIndex(Path("d"), "datasets", {"input": "input_ids"}, np.zeros(1),
        ...                   np.zeros(1), handle=[{"input_ids": [2, 7, 3]}])
        >>> is_text(index)
        True
    """
    if index.kind != "datasets" or index.handle is None or len(index) == 0:
        return False
    first = np.asarray(index.handle[0][index.keys["input"]])
    return first.ndim == 1 and first.size > 0 and np.issubdtype(first.dtype, np.integer)


def read_data_index(
    path: str | Path,
    columns: Columns | None = None,
    *,
    split: str | None = None,
    default_split: str = "train",
) -> DataIndex:
    """Read labels, groups and ids of a data file or folder, checking their shape.

    Args:
        path: A ``.safetensors`` file, a ``.csv`` manifest or a ``save_to_disk`` folder;
            ``FOLDER:split`` names the split of a ``DatasetDict`` folder.
        columns: Column-name overrides.
        split: Split of a ``DatasetDict`` folder when ``path`` names none.
        default_split: The split taken when neither names one (else the folder's only
            split; a folder of several splits without ``default_split`` is refused).

    Returns:
        The :class:`DataIndex`.

    Raises:
        InputNotFoundError: ``path`` (or an image of a manifest) does not exist.
        DataError: The format is unknown, or a column is missing or malformed.
        MissingDependencyError: A ``datasets`` folder without the ``datasets`` package.

    Example:
        >>> import tempfile, os
        >>> from safetensors.numpy import save_file
        >>> p = os.path.join(tempfile.mkdtemp(), "d.safetensors")
        >>> save_file({"inputs": np.zeros((3, 2), np.float32), "labels": np.array([0, 1, 1]),
        ...            "groups": np.array([0, 3, 2])}, p)
        >>> idx = read_data_index(p)
        >>> len(idx), idx.groups.tolist(), idx.ids
        (3, [0, 3, 2], None)
    """
    p, named = split_suffix(path)
    cols = columns or Columns()
    if not p.exists():
        raise InputNotFoundError(f"data not found: {p}")
    if p.is_dir():
        return _datasets_index(p, cols, named or split, default_split)
    if p.suffix.lower() == ".csv":
        return _manifest_index(p, cols.resolve("manifest"))
    if p.suffix.lower() == ".safetensors":
        return _tensors_index(p, cols.resolve("tensors"))
    raise DataError(
        f"{p}: unsupported data format; use a .safetensors file (inputs, labels, groups[, ids]), "
        "a .csv manifest (path,label,group[,id]) or a datasets save_to_disk folder"
    )


def _int_column(values: Any, what: str, path: Path) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{path}: {what} must be one value per sample; got shape {arr.shape}")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise DataError(f"{path}: {what} must be integers; found fractional or NaN values")
    elif arr.dtype.kind not in "iub":
        raise DataError(f"{path}: {what} must be integers; got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _unique_ids(ids: np.ndarray, path: Path) -> np.ndarray:
    values, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dups = ", ".join(str(v) for v in values[counts > 1][:10])
        raise DataError(f"{path}: sample ids must be unique; repeated: {dups}")
    return ids


def _missing(path: Path, what: str, key: str, present: list[str], option: str) -> DataError:
    return DataError(
        f"{path} has no {what} column {key!r} (found: {', '.join(present) or 'none'}); "
        f"name it with {option}"
    )


def _tensors_index(path: Path, keys: dict[str, str]) -> DataIndex:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            present = sorted(f.keys())
            meta = f.metadata() or {}
            for what in ("input", "label", "group"):
                if keys[what] not in present:
                    raise _missing(path, what, keys[what], present, f"--{what}-key")
            n = int(f.get_slice(keys["input"]).get_shape()[0])
            cols = {
                w: f.get_tensor(keys[w]) for w in ("label", "group", "id") if keys[w] in present
            }
    except DataError:
        raise
    except Exception as exc:  # safetensors raises its own error types
        raise DataError(f"{path} is not a readable safetensors data file ({exc})") from exc
    labels = _int_column(cols["label"], "labels", path)
    groups = _int_column(cols["group"], "groups", path)
    ids = _unique_ids(_int_column(cols["id"], "ids", path), path) if "id" in cols else None
    for what, arr in (("labels", labels), ("groups", groups), ("ids", ids)):
        if arr is not None and len(arr) != n:
            raise DataError(f"{path}: {len(arr)} {what} for {n} inputs")
    names: tuple[str, ...] = ()
    if "group_names" in meta:
        try:
            names = tuple(str(x) for x in json.loads(meta["group_names"]))
        except (ValueError, TypeError):
            names = ()
    return DataIndex(path, "tensors", keys, labels, groups, ids, group_names=names)


def _parse_int_cells(rows: list[tuple[int, str]], what: str, path: Path) -> np.ndarray:
    bad = [(line, v) for line, v in rows if not _INT.match(v)]
    if bad:
        shown = ", ".join(f"line {line}: {v!r}" for line, v in bad[:10])
        raise DataError(f"{path}: column {what!r} must hold integers; {len(bad)} do not ({shown})")
    return np.array([int(v) for _, v in rows], dtype=np.int64)


def _manifest_index(path: Path, keys: dict[str, str]) -> DataIndex:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = [h.strip() for h in reader.fieldnames or []]
            records = [
                (reader.line_num, {k.strip(): (v or "").strip() for k, v in r.items() if k})
                for r in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read manifest {path}: {exc}") from exc
    for what in ("input", "label", "group"):
        if keys[what] not in header:
            raise _missing(path, what, keys[what], header, f"--{what}-key")
    if not records:
        raise DataError(f"manifest {path} lists no samples")
    column = {w: [(line, r.get(keys[w], "")) for line, r in records] for w in keys}
    labels = _parse_int_cells(column["label"], keys["label"], path)
    groups = _parse_int_cells(column["group"], keys["group"], path)
    ids = None
    if keys["id"] in header:
        ids = _unique_ids(_parse_int_cells(column["id"], keys["id"], path), path)
    paths = tuple((path.parent / v).resolve() for _, v in column["input"])
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise InputNotFoundError(
            f"manifest {path}: {len(missing)} image file(s) not found: {', '.join(missing[:10])}"
        )
    return DataIndex(path, "manifest", keys, labels, groups, ids, paths=paths)


def _datasets_index(path: Path, cols: Columns, split: str | None, default_split: str) -> DataIndex:
    from miu_hooks._imports import is_available

    if not is_available("datasets"):
        raise MissingDependencyError(
            f"{path} is a folder: reading a datasets save_to_disk folder needs the 'datasets' "
            "package (pip install datasets); or pass a .safetensors file or a .csv manifest"
        )
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError and its own errors
        raise DataError(f"{path} is not a datasets save_to_disk folder ({exc})") from exc
    name = None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        name = split or (default_split if default_split in ds else None)
        if name is None and len(splits) == 1:
            name = splits[0]
        if name is None or name not in ds:
            asked = f"no split {name!r}" if name is not None else f"no split {default_split!r}"
            raise DataError(
                f"{path} has {asked} (splits: {', '.join(splits) or 'none'}); "
                f"name one as {path}:SPLIT"
            )
        ds = ds[name]
    elif split is not None:
        raise DataError(f"{path} is a single datasets table, not a DatasetDict: it has no splits")
    present = list(ds.column_names)
    given = {"input": cols.input, "label": cols.label, "group": cols.group, "id": cols.id}
    keys = cols.resolve("datasets")
    for what, options in _DATASETS_ALTERNATIVES.items():
        if given[what] is None and keys[what] not in present:
            keys[what] = next((c for c in options if c in present), keys[what])
    for what in ("input", "label", "group"):
        if keys[what] not in present:
            raise _missing(path, what, keys[what], present, f"--{what}-key")
    labels = _int_column(ds[keys["label"]], "labels", path)
    groups = _int_column(ds[keys["group"]], "groups", path)
    ids = None
    if keys["id"] in present:
        ids = _unique_ids(_int_column(ds[keys["id"]], "ids", path), path)
    return DataIndex(path, "datasets", keys, labels, groups, ids, handle=ds, split=name)
