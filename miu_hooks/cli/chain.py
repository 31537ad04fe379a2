"""Repeated deletion requests in ``miu-unlearn``: the ledger carried by every output.

Every output folder holds ``ledger.json`` (:class:`miu_hooks.ledger.Ledger`:
the original model's path and sha256, the data's sha256, one entry per
request) and ``forgotten.csv`` (every id forgotten so far). When ``--model``
is such a folder, :func:`plan_request` continues its ledger (docs/method.md
§12): the run forgets the union of every earlier request and the new ids,
keeps the rest of the data, and calibrates against the original model named
in the ledger (``--original`` when it has moved; its sha256 must match). A
first request starts a ledger whose original is the input model.

Torch-free, like :mod:`miu_hooks.cli.inputs`: everything is checked before a
model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from miu_hooks.cli.data_index import DataIndex
from miu_hooks.cli.errors import InputNotFoundError, NothingToForget
from miu_hooks.cli.inputs import ForgetList, ModelSource, resolve_model_source
from miu_hooks.errors import LedgerError
from miu_hooks.ledger import Ledger, sha256_file, sha256_path

__all__ = [
    "FORGOTTEN_FILE",
    "LEDGER_FILE",
    "Request",
    "ledger_report",
    "plan_request",
]

LEDGER_FILE = "ledger.json"
FORGOTTEN_FILE = "forgotten.csv"


@dataclass(frozen=True)
class Request:
    """One deletion request against the ledger of the earlier ones.

    Attributes:
        ledger: The earlier requests (empty for a first request); this one is
            added by :meth:`finish` once its model is written.
        original: The original model: the calibration reference.
        request: This request's forget list.
        new_ids: Its ids that no earlier request forgot.
        union: Every id to forget (earlier requests and this one), sorted.
        model_sha256: sha256 of the input model's weights file.
        continued: Whether the input model is a previous output with a ledger.
    """

    ledger: Ledger
    original: ModelSource
    request: ForgetList
    new_ids: np.ndarray
    union: ForgetList
    model_sha256: str
    continued: bool

    def finish(self, method: str, model_out: Path) -> Ledger:
        """Return a copy of the ledger with this request recorded (``model_out`` is hashed)."""
        ledger = Ledger.from_dict(self.ledger.to_dict())
        ledger.add_request(
            self.request.ids,
            method=method,
            model_in_sha256=self.model_sha256,
            model_out_sha256=sha256_file(model_out),
            forget_sha256=self.request.sha256,
        )
        return ledger


def plan_request(
    model: ModelSource,
    data: DataIndex,
    forget: ForgetList,
    *,
    original: str | Path | None = None,
    arch: str | None = None,
) -> Request:
    """Read the ledger of ``model``'s folder (if any) and plan this request against it.

    Args:
        model: The input model; a previous output when its folder holds ``ledger.json``.
        data: The training data D (its sha256 must be the ledger's).
        forget: This request's ids.
        original: Where the ledger's original model lies now (``--original``).
        arch: ``--arch``, for the original model.

    Raises:
        NothingToForget: Every id was forgotten by an earlier request.
        LedgerError: The ledger is unreadable, names other data, or does not
            match the model beside it; or ``original`` is given without a ledger.
        InputNotFoundError: The original model is not where the ledger says.
        OriginalMismatchError: The original model's file has another sha256.
    """
    ledger_file = model.folder / LEDGER_FILE
    data_sha = sha256_path(data.path)
    model_sha = sha256_file(model.weights)
    if not ledger_file.is_file():
        if original is not None:
            raise LedgerError(
                f"--original applies when --model is an earlier miu-unlearn output (a folder with "
                f"{LEDGER_FILE}); {model.folder} has none, so the input model is the original"
            )
        ledger = Ledger(model_sha, original_path=model.weights.resolve(), data_sha256=data_sha)
        return Request(ledger, model, forget, forget.ids, forget, model_sha, continued=False)
    ledger = Ledger.load(ledger_file)
    if ledger.requests and ledger.requests[-1].model_out_sha256 != model_sha:
        raise LedgerError(
            f"{model.weights} is not the model its {LEDGER_FILE} records (sha256 "
            f"{model_sha[:16]}…): the folder was changed after its run"
        )
    if ledger.data_sha256 is None:
        raise LedgerError(f"{ledger_file} records no data sha256")
    ledger.check_data(data_sha)
    new = ledger.new_ids(forget.ids)
    if len(new) == 0:
        raise NothingToForget(
            f"all {len(forget.ids)} ids of {forget.path} were forgotten by earlier requests "
            f"(see {model.folder / FORGOTTEN_FILE}): nothing to do, nothing written; "
            f"{model.weights} already is the model without them"
        )
    where = original if original is not None else ledger.original_path
    if where is None:
        raise LedgerError(f"{ledger_file} names no original model file; pass --original PATH")
    if not Path(where).expanduser().exists():
        raise InputNotFoundError(
            f"original model not found: {where} (named in {ledger_file}); pass --original PATH "
            "where it lies now"
        )
    source = resolve_model_source(where, arch, default_config=model.config_dir)
    ledger.locate_original(source.weights)
    union = np.union1d(ledger.forgotten, forget.ids).astype(np.int64)
    return Request(
        ledger,
        source,
        forget,
        new,
        ForgetList(forget.path, union, forget.sha256),
        model_sha,
        continued=True,
    )


def ledger_report(ledger: Ledger, request: Request) -> dict[str, Any]:
    """Return the ``report.json`` fields of a finished request's ledger."""
    data = ledger.to_dict()
    return {
        "original": data["original"],
        "forgotten": data["forgotten"],
        "request": {
            "number": len(ledger),
            "ids": len(request.request.ids),
            "new_ids": len(request.new_ids),
            "continued": request.continued,
        },
        "ledger": data["requests"],
    }
