"""Torch-free checks of ``miu-unlearn`` inputs, run before anything heavy is imported.

:func:`prepare` resolves the model source, reads the data index and the forget
list, plans the retain/forget split and checks the output folder. Every
failure raises a :mod:`miu_hooks.cli.errors` type with a one-line message, so
bad input is reported in well under a second and nothing has been written.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from miu_hooks.cli.checks import check_group_names, check_labels_match_groups
from miu_hooks.cli.data_index import Columns, DataIndex, read_data_index
from miu_hooks.cli.errors import (
    ArchitectureError,
    ForgetListError,
    InputNotFoundError,
    OutputError,
)
from miu_hooks.errors import CheckpointError, EmptyForgetSetError, EmptyGroupError, GroupRangeError
from miu_hooks.ledger import sha256_file

if TYPE_CHECKING:
    from miu_hooks.cli.chain import Request

__all__ = [
    "ForgetList",
    "ModelSource",
    "Prepared",
    "SplitPlan",
    "check_output",
    "prepare",
    "read_forget_list",
    "resolve_model_source",
    "sha256_file",
    "work_dir",
]

WEIGHTS_NAME = "model.safetensors"
_INT = re.compile(r"^[+-]?\d+$")
_ARCH = re.compile(r"^[^:]+:[A-Za-z_][A-Za-z0-9_.]*$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights and architecture come from.

    Attributes:
        weights: The safetensors file.
        config_dir: Folder whose ``config.json`` gives the architecture (Hugging Face).
        arch: ``package.module:factory`` (or ``file.py:factory``) building the module.
        shapes: Tensor name -> shape, from the file's header.
    """

    weights: Path
    config_dir: Path | None
    arch: str | None
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, compare=False)

    @property
    def folder(self) -> Path:
        """The folder holding the weights."""
        return self.weights.parent


def _header(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path} is not a valid safetensors file ({exc})") from exc


def resolve_model_source(
    model: str | Path,
    arch: str | None = None,
    *,
    default_config: Path | None = None,
    what: str = "model",
) -> ModelSource:
    """Find the weights and the architecture of ``--model`` (a file or a folder).

    Args:
        model: A ``model.safetensors`` file, or a folder holding one (``save_pretrained``).
        arch: ``package.module:factory``; takes precedence over a ``config.json``.
        default_config: Folder whose ``config.json`` is used when none lies beside
            the weights (references share the model's architecture).
        what: How messages name it (``"reference 'Retrain'"`` for ``--reference``).

    Raises:
        InputNotFoundError: The path, or the folder's ``model.safetensors``, is missing.
        CheckpointError: The file is truncated or not safetensors.
        ArchitectureError: No ``config.json`` and no ``arch``, or a malformed ``arch``.
    """
    path = Path(model).expanduser()
    if not path.exists():
        raise InputNotFoundError(f"{what} not found: {path}")
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if not weights.is_file():
        hint = ""
        if (path / f"{WEIGHTS_NAME}.index.json").exists():
            hint = " (sharded checkpoints are not supported; save with a larger max_shard_size)"
        elif any(path.glob("*.bin")):
            hint = " (only safetensors are read; re-save with safe_serialization=True)"
        raise InputNotFoundError(f"{what}: no {WEIGHTS_NAME} in {path}{hint}")
    shapes = _header(weights)
    if arch is not None:
        if not _ARCH.match(arch):
            raise ArchitectureError(
                f"--arch {arch!r} must look like package.module:factory or path/to/file.py:factory"
            )
        return ModelSource(weights, None, arch, shapes)
    config_dir = weights.parent if (weights.parent / "config.json").is_file() else default_config
    if config_dir is None:
        raise ArchitectureError(
            f"{weights} has no config.json beside it and no --arch was given: safetensors "
            "hold no architecture; pass --arch package.module:factory or a save_pretrained folder"
        )
    return ModelSource(weights, config_dir, None, shapes)


@dataclass(frozen=True)
class ForgetList:
    """The ids of a forget CSV.

    Attributes:
        path: The CSV file.
        ids: int64[M] unique ids, in file order.
        sha256: Hex sha256 of the file.
    """

    path: Path
    ids: np.ndarray
    sha256: str


def read_forget_list(path: str | Path, id_column: str = "id") -> ForgetList:
    r"""Read and check a forget CSV: header with ``id_column``, unique integer ids.

    Duplicate ids are an error (not de-duplicated): a repeated id usually means
    the list was built from the wrong key, so it is reported, first ten shown.

    Raises:
        InputNotFoundError: The file does not exist.
        ForgetListError: Unreadable, no header/id column, non-integer or repeated ids.
        EmptyForgetSetError: The file has a header but no id.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "f.csv")
        >>> _ = open(p, "w").write("id,note\n4,a\n7,b\n")
        >>> read_forget_list(p).ids.tolist()
        [4, 7]
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputNotFoundError(f"forget list not found: {p}")
    try:
        raw = p.read_bytes()
        reader = csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline=""))
        rows = [(reader.line_num, [c.strip() for c in row]) for row in reader if any(row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ForgetListError(f"cannot read forget list {p}: {exc}") from exc
    if not rows:
        raise ForgetListError(
            f"forget list {p} is empty: expected a header line naming {id_column!r}"
        )
    header = rows[0][1]
    if id_column not in header:
        if all(_INT.match(c) for c in header if c):
            raise ForgetListError(
                f"forget list {p} has no header line (first line is {','.join(header)!r}); "
                f"add a first line naming the columns, e.g. {id_column!r}"
            )
        raise ForgetListError(
            f"forget list {p} has no {id_column!r} column (columns: {', '.join(header)}); "
            "choose one with --id-column"
        )
    col = header.index(id_column)
    values = [(line, row[col] if col < len(row) else "") for line, row in rows[1:]]
    if not values:
        raise EmptyForgetSetError(f"forget list {p} lists no ids: there is nothing to unlearn")
    bad = [(line, v) for line, v in values if not _INT.match(v)]
    if bad:
        shown = ", ".join(f"line {line}: {v!r}" for line, v in bad[:10])
        raise ForgetListError(f"forget list {p}: {len(bad)} id(s) are not integers ({shown})")
    ids = np.array([int(v) for _, v in values], dtype=np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        pairs = zip(uniq[counts > 1][:10], counts[counts > 1][:10], strict=True)
        dups = ", ".join(f"{v} (x{c})" for v, c in pairs)
        raise ForgetListError(f"forget list {p}: ids must be unique; repeated: {dups}")
    return ForgetList(p, ids, hashlib.sha256(raw).hexdigest())


@dataclass(frozen=True)
class SplitPlan:
    """Positions of the forget and retain samples, and per-group counts.

    Attributes:
        forget: int64[M] sorted positions of D_f in the data.
        retain: int64[N - M] sorted positions of D_r.
        num_groups: |G|.
        counts: ``{group: (in D, in D_f, in D_r)}`` for every group id.
    """

    forget: np.ndarray
    retain: np.ndarray
    num_groups: int
    counts: dict[int, tuple[int, int, int]]


def plan_split(
    data: DataIndex, forget: ForgetList, num_groups: int, names: Sequence[str] = ()
) -> SplitPlan:
    """Match the forget ids against the data and check the split (docs/integrations.md §9).

    Ids are matched against the data's ``ids`` column, or against row positions
    ``0..N-1`` when the data has none.

    Raises:
        ForgetListError: Ids not in the data, or the list covers the whole data.
        EmptyGroupError: A group would keep no retain sample.
    """
    keys = data.ids if data.ids is not None else np.arange(len(data), dtype=np.int64)
    order = np.argsort(keys, kind="stable")
    where = np.searchsorted(keys, forget.ids, sorter=order).clip(0, max(len(keys) - 1, 0))
    found = keys[order[where]] == forget.ids if len(keys) else np.zeros(len(forget.ids), bool)
    if not found.all():
        unknown = ", ".join(str(v) for v in forget.ids[~found][:10])
        space = (
            f"its 'ids' ({data.keys['id']})" if data.ids is not None else f"rows 0..{len(keys) - 1}"
        )
        raise ForgetListError(
            f"{int((~found).sum())} id(s) of {forget.path} are not in {data.path} "
            f"(matched against {space}): {unknown}"
        )
    positions = np.sort(order[where])
    if len(positions) == len(keys):
        raise ForgetListError(
            f"{forget.path} lists all {len(keys)} samples: nothing would be left to keep"
        )
    mask = np.ones(len(keys), bool)
    mask[positions] = False
    total = np.bincount(data.groups, minlength=num_groups)
    gone = np.bincount(data.groups[positions], minlength=num_groups)
    counts = {g: (int(total[g]), int(gone[g]), int(total[g] - gone[g])) for g in range(num_groups)}
    emptied = [g for g, (n, f, _) in counts.items() if n and f == n]
    if emptied:
        what = ", ".join(f"{g} ({group_name(g, names)}: all {counts[g][0]})" for g in emptied)
        raise EmptyGroupError(
            f"the forget list removes every sample of group {what}; REWEIGHT needs at least "
            "one retain sample per group"
        )
    return SplitPlan(positions.astype(np.int64), np.nonzero(mask)[0], num_groups, counts)


def group_name(group: int, names: Sequence[str] = (), num_sensitive: int = 2) -> str:
    """Return the display name of ``group`` (``names[group]`` or ``g2 (y=1, s=0)``)."""
    if group < len(names):
        return names[group]
    return f"g{group} (y={group // num_sensitive}, s={group % num_sensitive})"


def work_dir(out: Path) -> Path:
    """Return the hidden work folder of output folder ``out`` (kept for ``--resume``)."""
    return out.parent / f".{out.name}.partial"


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output(out: str | Path, inputs: Iterable[Path], *, overwrite: bool = False) -> Path:
    """Check that ``out`` can be written without touching any input; return it resolved.

    Raises:
        OutputError: ``out`` is, or contains, an input (or its folder); exists and
            is not empty without ``overwrite``; or its location is not writable.
    """
    target = Path(out).expanduser().resolve()
    for item in inputs:
        resolved = item.expanduser().resolve()
        if target == resolved or target in resolved.parents:
            raise OutputError(
                f"output folder {target} holds the input {resolved}: refusing to overwrite an "
                "input; choose another --out"
            )
    if target.exists() and not target.is_dir():
        raise OutputError(f"output {target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputError(f"output folder {target} exists and is not empty; pass --overwrite")
    base = _nearest_existing(target.parent)
    try:
        if not base.is_dir():
            raise NotADirectoryError(f"{base} is not a folder")
        os.rmdir(tempfile.mkdtemp(prefix=".miu-probe-", dir=base))
    except OSError as exc:
        raise OutputError(f"output folder {target} is not writable ({exc})") from exc
    if target.is_dir():
        _check_replaceable(target)
    return target


def _check_replaceable(target: Path) -> None:
    """Rename an existing output folder away and back: the run's last step does that rename.

    An immutable or busy folder (``chattr +i``, a mount point) cannot be swapped
    out, which would otherwise be found only after the whole run.
    """
    probe = target.parent / f".{target.name}.miu-probe-{os.getpid()}"
    try:
        os.rename(target, probe)
    except OSError as exc:
        raise OutputError(
            f"output folder {target} exists but cannot be replaced ({exc}); choose another --out"
        ) from exc
    try:
        os.rename(probe, target)
    except OSError as exc:  # pragma: no cover - the rename just worked the other way
        raise OutputError(f"could not move {probe} back to {target} ({exc}); rename it") from exc


@dataclass(frozen=True)
class Prepared:
    """Every checked input of a run; built by :func:`prepare`.

    Attributes:
        model: The model source.
        data: The training data D (D_f and D_r are subsets of it).
        forget: The forget list.
        plan: The split.
        out: The output folder (resolved; not created yet).
        test: Optional test set (TA, EO, GA, per-group accuracy, MIA negatives).
        val: Optional held-out set for MIA (the test set otherwise).
        references: ``{name: source}`` of retrained checkpoints for Gap and ToW.
        group_names: Display name of every group id.
        forget_groups: The forgotten group(s) (Y_f x S_f) that EO and GA refer to.
        request: This request against the ledger of earlier ones (the union of
            every forgotten id is what ``plan`` splits off; the original model).
    """

    model: ModelSource
    data: DataIndex
    forget: ForgetList
    plan: SplitPlan
    out: Path
    test: DataIndex | None = None
    val: DataIndex | None = None
    references: Mapping[str, ModelSource] = field(default_factory=dict)
    group_names: tuple[str, ...] = ()
    forget_groups: tuple[int, ...] = ()
    request: Request | None = None


def prepare(
    *,
    model: str | Path,
    data: str | Path,
    forget: str | Path,
    out: str | Path,
    arch: str | None = None,
    id_column: str = "id",
    test: str | Path | None = None,
    val: str | Path | None = None,
    references: Mapping[str, str | Path] | None = None,
    columns: Columns | None = None,
    split: str | None = None,
    num_groups: int | None = None,
    num_sensitive: int = 2,
    group_names: Sequence[str] = (),
    forget_groups: Sequence[int] = (),
    overwrite: bool = False,
    original: str | Path | None = None,
) -> Prepared:
    """Check every input of a run without importing torch (see the module docstring).

    EO and GA compare the forgotten group(s) with the rest (docs/method.md §5). They
    default to the group holding the most forget ids (the lowest id on ties):
    the paper's forget sets are dominated by one group, and with several groups
    Y_f x S_f may cover every (y, s) cell, leaving EO undefined.

    When ``model`` is an earlier output (its folder holds ``ledger.json``), the
    split forgets every id of its ledger too, and ``original`` (``--original``)
    says where the ledger's original model lies now
    (:func:`miu_hooks.cli.chain.plan_request`).

    Raises:
        MIUError: One of the :mod:`miu_hooks.cli.errors` types, naming the problem.
        NothingToForget: Every id was forgotten by an earlier request.
    """
    from miu_hooks.cli.chain import plan_request

    source = resolve_model_source(model, arch)
    refs = {
        name: resolve_model_source(
            path, arch, default_config=source.config_dir, what=f"--reference {name!r}"
        )
        for name, path in (references or {}).items()
    }
    index = read_data_index(data, columns, split=split)
    evals = {  # a DatasetDict folder: FOLDER:split, else its "test" / "validation" split
        k: read_data_index(v, columns, default_split=d) if v is not None else None
        for k, v, d in (("test", test, "test"), ("val", val, "validation"))
    }
    forget_list = read_forget_list(forget, id_column)
    for what, idx in (("data", index), *evals.items()):
        if idx is not None:
            check_labels_match_groups(idx, num_sensitive, what)
    every = [index] + [e for e in evals.values() if e is not None]
    low = min(int(e.groups.min()) if len(e) else 0 for e in every)
    high = max(int(e.groups.max()) if len(e) else -1 for e in every) + 1
    if low < 0 or (num_groups is not None and high > num_groups):
        raise GroupRangeError(
            f"group ids must lie in [0, {num_groups or high}); found {low}..{high - 1}"
        )
    check_group_names(group_names, num_groups or high)
    names = tuple(group_names) or index.group_names
    request = plan_request(source, index, forget_list, original=original, arch=arch)
    plan = plan_split(index, request.union, num_groups or high, names)
    names = tuple(group_name(g, names, num_sensitive) for g in range(plan.num_groups))
    bad = [g for g in forget_groups if not 0 <= g < plan.num_groups]
    if bad:
        raise GroupRangeError(f"--forget-groups {bad} outside [0, {plan.num_groups})")
    dominant = max(plan.counts, key=lambda g: (plan.counts[g][1], -g))
    chosen = tuple(sorted(set(forget_groups))) or (dominant,)
    inputs = [source.weights, source.folder, index.path, forget_list.path]
    inputs += [s.weights for s in refs.values()] + [e.path for e in every[1:]]
    inputs += [request.original.weights, request.original.folder]
    target = check_output(out, inputs, overwrite=overwrite)
    return Prepared(
        source,
        index,
        forget_list,
        plan,
        target,
        evals["test"],
        evals["val"],
        refs,
        names,
        chosen,
        request,
    )
