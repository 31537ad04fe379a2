"""A ledger of repeated deletion requests (docs/method.md §12).

Requests arrive one after another. Request k forgets the union D_f(k) of every
id requested so far, keeps D_r(k) = D minus that union, samples with REWEIGHT
against the original data D, and calibrates against the **original** model,
never an intermediate one. A :class:`Ledger` records what that needs between
requests: the original model (path and sha256), the data's sha256, and one
:class:`LedgerEntry` per request, oldest first. It is plain JSON, written
atomically; ``miu-unlearn`` keeps it as ``ledger.json`` in every output folder.

Only the standard library and numpy are imported here; torch is imported by
:meth:`Ledger.split` (and :func:`~miu_hooks.fingerprints.weights_sha256`) when called.
The digests it records come from :mod:`miu_hooks.fingerprints`, re-exported here.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from miu_hooks.atomic import atomic_write_text
from miu_hooks.errors import DataError, EmptyForgetSetError, LedgerError, OriginalMismatchError
from miu_hooks.fingerprints import (
    check_ids,
    ids_sha256,
    sha256_file,
    sha256_path,
    weights_sha256,
)

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import Dataset

__all__ = [
    "FORMAT",
    "Ledger",
    "LedgerEntry",
    "ids_sha256",
    "sha256_file",
    "sha256_path",
    "weights_sha256",
]

FORMAT = "miu_hooks.ledger/1"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _hex(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _HEX64.match(value):
        raise LedgerError(f"{what} must be a hex sha256, got {value!r}")
    return value


def _field(data: Mapping[str, Any], key: str, where: str) -> str:
    return _hex(data.get(key), f"{where}: {key!r}")


@dataclasses.dataclass(frozen=True)
class LedgerEntry:
    """One served deletion request.

    Attributes:
        ids: Every id of the request, in its order.
        new_ids: The ids not forgotten by an earlier request.
        forget_sha256: sha256 of the forget list (the CSV file; :func:`ids_sha256`
            in the Python API).
        model_in_sha256: sha256 of the model the request started from.
        model_out_sha256: sha256 of the model it produced.
        method: The unlearning method that served it.
        finished_at: ISO 8601 time (UTC) the request was recorded.
        forgotten: Ids forgotten after this request, cumulative.
    """

    ids: tuple[int, ...]
    new_ids: tuple[int, ...]
    forget_sha256: str
    model_in_sha256: str
    model_out_sha256: str
    method: str
    finished_at: str
    forgotten: int

    def to_dict(self) -> dict[str, Any]:
        """Return the entry as a JSON-ready dict (the ``report.json`` and ``ledger.json`` form)."""
        return {**dataclasses.asdict(self), "ids": list(self.ids), "new_ids": list(self.new_ids)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "ledger entry") -> LedgerEntry:
        """Build an entry from :meth:`to_dict`'s form.

        Raises:
            LedgerError: A field is missing or malformed.
        """
        try:
            ids = tuple(int(i) for i in check_ids(data["ids"], "ids"))
            new_ids = tuple(int(i) for i in check_ids(data["new_ids"], "new_ids"))
            method, finished, forgotten = data["method"], data["finished_at"], data["forgotten"]
        except (KeyError, TypeError, DataError) as exc:
            raise LedgerError(f"{where} is malformed ({exc})") from exc
        if not isinstance(method, str) or not isinstance(finished, str):
            raise LedgerError(f"{where}: 'method' and 'finished_at' must be strings")
        if not isinstance(forgotten, int) or not set(new_ids) <= set(ids):
            raise LedgerError(f"{where}: 'forgotten' must be an int and new_ids a subset of ids")
        return cls(
            ids,
            new_ids,
            _field(data, "forget_sha256", where),
            _field(data, "model_in_sha256", where),
            _field(data, "model_out_sha256", where),
            method,
            finished,
            forgotten,
        )


class Ledger:
    """The deletion requests served so far, the original model and the data they refer to.

    Keep one ledger per original model and training set D between requests:
    :meth:`split` gives request k's retain and forget sets (D_f(k) = everything
    forgotten so far plus the new ids), ``unlearn(..., original=...)`` takes the
    **original** model as its calibration reference, and :meth:`add_request`
    records the request afterwards. :meth:`save` and :meth:`load` keep it as JSON.

    Args:
        original_sha256: sha256 of the original model (its safetensors file, or
            :func:`weights_sha256` of an in-memory model).
        original_path: Where the original model's weights lie, if in a file.
        data_sha256: sha256 of the training data D (:func:`sha256_path`), if known.
        requests: Earlier requests, oldest first.

    Example:
        >>> import torch
        >>> from miu_hooks import GroupTensorDataset
        >>> data = GroupTensorDataset(torch.randn(6, 2), torch.tensor([0, 0, 1, 1, 1, 0]),
        ...                           torch.tensor([0, 1, 2, 3, 2, 1]))
        >>> ledger = Ledger.start(torch.nn.Linear(2, 2))
        >>> retain, forget = ledger.split(data, [2])       # request 1: id 2
        >>> _ = ledger.add_request([2], method="miu", model_in_sha256=ledger.original_sha256,
        ...                        model_out_sha256="0" * 64)
        >>> retain, forget = ledger.split(data, [4])       # request 2: ids 2 and 4
        >>> len(retain), len(forget), forget.groups.tolist()
        (4, 2, [2, 2])
    """

    def __init__(
        self,
        original_sha256: str,
        *,
        original_path: str | os.PathLike[str] | None = None,
        data_sha256: str | None = None,
        requests: Iterable[LedgerEntry] = (),
    ) -> None:
        self.original_sha256 = _hex(original_sha256, "original_sha256")
        self.original_path = None if original_path is None else str(original_path)
        self.data_sha256 = None if data_sha256 is None else _hex(data_sha256, "data_sha256")
        self._requests: list[LedgerEntry] = []
        self._forgotten = np.zeros(0, dtype=np.int64)
        for entry in requests:
            self._append(entry)

    @classmethod
    def start(
        cls,
        original: str | os.PathLike[str] | nn.Module,
        *,
        data: str | os.PathLike[str] | None = None,
    ) -> Ledger:
        """Start an empty ledger for ``original`` (a safetensors path or a module).

        Args:
            original: The original model: its weights file (path resolved and
                sha256 recorded) or an in-memory module (:func:`weights_sha256`).
            data: The training data file or folder; its sha256 is recorded.

        Raises:
            FileNotFoundError: ``original`` or ``data`` does not exist.
        """
        data_sha = None if data is None else sha256_path(data)
        if isinstance(original, (str, os.PathLike)):
            path = Path(original).expanduser().resolve()
            return cls(sha256_file(path), original_path=path, data_sha256=data_sha)
        return cls(weights_sha256(original), data_sha256=data_sha)

    @property
    def requests(self) -> tuple[LedgerEntry, ...]:
        """Every request served, oldest first."""
        return tuple(self._requests)

    @property
    def forgotten(self) -> np.ndarray:
        """int64[M]: every id forgotten so far, sorted (a copy)."""
        return self._forgotten.copy()

    def __len__(self) -> int:
        return len(self._requests)

    def __repr__(self) -> str:
        return (
            f"Ledger({len(self)} request(s), {len(self._forgotten)} id(s) forgotten, "
            f"original {self.original_sha256[:12]}…)"
        )

    def new_ids(self, ids: Iterable[int] | np.ndarray) -> np.ndarray:
        """Return the ids of ``ids`` not forgotten yet, in their order.

        Raises:
            DataError: ``ids`` are not unique integers.
        """
        arr = check_ids(ids)
        return arr[~np.isin(arr, self._forgotten)]

    def _append(self, entry: LedgerEntry) -> None:
        union = np.union1d(self._forgotten, np.asarray(entry.new_ids, dtype=np.int64))
        if np.isin(np.asarray(entry.new_ids, dtype=np.int64), self._forgotten).any():
            raise LedgerError(f"request {len(self) + 1} lists as new ids forgotten before")
        if len(union) != entry.forgotten:
            raise LedgerError(
                f"request {len(self) + 1} says {entry.forgotten} ids are forgotten, "
                f"its requests add up to {len(union)}"
            )
        self._requests.append(entry)
        self._forgotten = union.astype(np.int64)

    def add_request(
        self,
        ids: Iterable[int] | np.ndarray,
        *,
        method: str,
        model_in_sha256: str,
        model_out_sha256: str,
        forget_sha256: str | None = None,
        finished_at: str | None = None,
    ) -> LedgerEntry:
        """Record a served request and return its entry.

        Args:
            ids: Every id of the request (earlier ones included; they are kept
                in ``ids`` and left out of ``new_ids``).
            method: The method that served it.
            model_in_sha256: sha256 of the model it started from.
            model_out_sha256: sha256 of the model it produced.
            forget_sha256: sha256 of the forget list; :func:`ids_sha256` of ``ids``
                when not given.
            finished_at: ISO time; now (UTC) when not given.

        Raises:
            EmptyForgetSetError: Every id was forgotten before (nothing to record:
                the model already forgets them) or ``ids`` is empty.
            DataError: ``ids`` are not unique integers.
            LedgerError: A digest is not a hex sha256.
        """
        arr = check_ids(ids)
        new = self.new_ids(arr)
        if len(new) == 0:
            what = (
                f"all {len(arr)} ids of the request were forgotten by earlier requests"
                if len(arr)
                else "the request lists no id"
            )
            raise EmptyForgetSetError(f"{what}: nothing to unlearn")
        where = f"request {len(self) + 1}"
        entry = LedgerEntry(
            ids=tuple(int(i) for i in arr),
            new_ids=tuple(int(i) for i in new),
            forget_sha256=_hex(forget_sha256 or ids_sha256(arr), f"{where} forget_sha256"),
            model_in_sha256=_hex(model_in_sha256, f"{where} model_in_sha256"),
            model_out_sha256=_hex(model_out_sha256, f"{where} model_out_sha256"),
            method=str(method),
            finished_at=finished_at or _now(),
            forgotten=len(np.union1d(self._forgotten, new)),
        )
        self._append(entry)
        return entry

    def retain_mask(
        self, sample_ids: Iterable[int] | np.ndarray, ids: Iterable[int] | np.ndarray = ()
    ) -> np.ndarray:
        """Return bool[N]: True for the samples of D kept, i.e. not in the ledger nor ``ids``.

        Args:
            sample_ids: The id of every sample of D, in order (unique integers).
            ids: A pending request's ids, forgotten too.

        Raises:
            LedgerError: Ids forgotten earlier are not in ``sample_ids`` (other data?).
            DataError: ``ids`` are not in ``sample_ids``, or ids are not unique integers.
        """
        keys = check_ids(sample_ids, "sample ids")
        pending = check_ids(ids)
        missing = self._forgotten[~np.isin(self._forgotten, keys)]
        if len(missing):
            shown = ", ".join(str(v) for v in missing[:10])
            raise LedgerError(
                f"{len(missing)} id(s) forgotten by earlier requests are not in this data "
                f"({shown}): is it the data the ledger was started on?"
            )
        unknown = pending[~np.isin(pending, keys)]
        if len(unknown):
            shown = ", ".join(str(v) for v in unknown[:10])
            raise DataError(f"{len(unknown)} requested id(s) are not in the data: {shown}")
        return ~np.isin(keys, np.union1d(self._forgotten, pending))

    def split(
        self,
        dataset: Dataset,
        ids: Iterable[int] | np.ndarray = (),
        *,
        sample_ids: Sequence[int] | np.ndarray | None = None,
    ) -> tuple[Dataset, Dataset]:
        """Return ``(retain, forget)`` of ``dataset`` for everything forgotten plus ``ids``.

        Args:
            dataset: The training data D, whole (never a retain set).
            ids: The pending request's ids (none: the split of the ledger as it stands).
            sample_ids: The id of every sample of ``dataset``; positions ``0..N-1``
                when not given.

        Returns:
            D_r(k) and D_f(k): :func:`~miu_hooks.splits.subset` for a
            ``TensorDataset`` of ``(inputs, labels, groups)``, else
            :class:`torch.utils.data.Subset`.

        Raises:
            LedgerError: See :meth:`retain_mask`.
            DataError: See :meth:`retain_mask`.
        """
        import torch
        from torch.utils.data import Subset, TensorDataset

        from miu_hooks.splits import subset

        keys = np.arange(len(dataset)) if sample_ids is None else sample_ids  # type: ignore[arg-type]
        mask = self.retain_mask(keys, ids)
        parts = np.nonzero(mask)[0], np.nonzero(~mask)[0]
        if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 3:
            retain, forget = (subset(dataset, torch.from_numpy(p)) for p in parts)
            return retain, forget
        return Subset(dataset, parts[0].tolist()), Subset(dataset, parts[1].tolist())

    def locate_original(self, path: str | os.PathLike[str]) -> Path:
        """Check that ``path`` holds the original model (sha256) and record it as its place.

        Returns:
            The resolved path.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            OriginalMismatchError: Its sha256 differs from the ledger's.
        """
        resolved = Path(path).expanduser().resolve()
        found = sha256_file(resolved)
        if found != self.original_sha256:
            raise OriginalMismatchError(
                f"{resolved} is not the original model of the ledger: sha256 {found[:16]}… "
                f"instead of {self.original_sha256[:16]}…"
            )
        self.original_path = str(resolved)
        return resolved

    def check_data(self, data_sha256: str) -> None:
        """Check that ``data_sha256`` is the ledger's data fingerprint (when it has one).

        Raises:
            LedgerError: The digests differ.
        """
        if self.data_sha256 is not None and data_sha256 != self.data_sha256:
            raise LedgerError(
                f"the data differ from the data of the earlier requests: sha256 "
                f"{data_sha256[:16]}… instead of {self.data_sha256[:16]}…; pass the same "
                "training data D"
            )

    def forgotten_csv(self) -> str:
        """Return every forgotten id as a CSV with the header ``id`` (a valid forget list)."""
        return "id\n" + "".join(f"{int(i)}\n" for i in self._forgotten)

    def to_dict(self) -> dict[str, Any]:
        """Return the ledger as a JSON-ready dict."""
        return {
            "format": FORMAT,
            "original": {"path": self.original_path, "sha256": self.original_sha256},
            "data_sha256": self.data_sha256,
            "forgotten": len(self._forgotten),
            "requests": [e.to_dict() for e in self._requests],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "ledger") -> Ledger:
        """Build a ledger from :meth:`to_dict`'s form, checking it is consistent.

        Raises:
            LedgerError: Unknown format, missing fields, or counts that do not add up.
        """
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            raise LedgerError(f"{where} is not a {FORMAT} ledger (format {found!r})")
        original = data.get("original")
        requests = data.get("requests")
        if not isinstance(original, Mapping) or not isinstance(requests, list):
            raise LedgerError(f"{where} needs an 'original' object and a 'requests' list")
        path = original.get("path")
        if path is not None and not isinstance(path, str):
            raise LedgerError(f"{where}: original path must be a string")
        data_sha = data.get("data_sha256")
        ledger = cls(
            _field(original, "sha256", f"{where} original"),
            original_path=path,
            data_sha256=None if data_sha is None else _field(data, "data_sha256", where),
        )
        for k, entry in enumerate(requests, 1):
            if not isinstance(entry, Mapping):
                raise LedgerError(f"{where} request {k} is not an object")
            ledger._append(LedgerEntry.from_dict(entry, f"{where} request {k}"))
        if data.get("forgotten") != len(ledger._forgotten):
            raise LedgerError(f"{where}: 'forgotten' does not match its requests")
        return ledger

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the ledger to ``path`` as JSON, atomically."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Ledger:
        """Read a ledger written by :meth:`save` (or by ``miu-unlearn``).

        Raises:
            FileNotFoundError: ``path`` does not exist.
            LedgerError: The file is not valid JSON or not a consistent ledger.
        """
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise LedgerError(f"ledger {p} is not valid JSON ({exc})") from exc
        return cls.from_dict(data, f"ledger {p}")
