"""The ``miu-unlearn`` run: load, evaluate, unlearn (resumably), report, write atomically.

:func:`execute` takes inputs checked by :func:`miu_hooks.cli.inputs.prepare`.
Its work lives in a hidden folder beside the output, ``.<out>.partial/``:
``run.json`` (the inputs' fingerprint), ``before.json``, ``previous.json`` and
``reference-*.json`` (finished evaluations) and ``unlearn_state.safetensors``
(the last finished epoch, written atomically by :func:`miu_hooks.unlearn`). An interruption keeps
that folder and ``resume=True`` continues from the last finished phase or
epoch, giving the same weights as an uninterrupted run (CPU, same seed). On
success the output folder appears in one rename and the work folder is
removed; on any other error the work folder is removed too, so nothing partial
is left.

Every output carries the ledger of deletion requests (:mod:`miu_hooks.cli.chain`):
a run on an earlier output forgets every id of its ledger too and calibrates
against the ledger's original model, which the report shows as ``original``
(the input model is ``previous``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from miu_hooks.atomic import atomic_write_folder, atomic_write_text
from miu_hooks.cli.chain import FORGOTTEN_FILE, LEDGER_FILE, Request, ledger_report, plan_request
from miu_hooks.cli.data_index import DataIndex
from miu_hooks.cli.inputs import Prepared, sha256_file, work_dir
from miu_hooks.cli.load import image_settings, load_dataset, load_model
from miu_hooks.cli.preflight import preflight
from miu_hooks.cli.report import Console, dump_json, plot_groups, render_markdown
from miu_hooks.cli.text import pad_token_id
from miu_hooks.config import TrainConfig
from miu_hooks.data import GroupTensorDataset
from miu_hooks.errors import CheckpointError, CollapseWarning
from miu_hooks.evaluation import evaluate, predict
from miu_hooks.guard import GuardOutcome
from miu_hooks.ledger import Ledger
from miu_hooks.methods import resolve_run
from miu_hooks.metrics import accuracy, avg_gap, per_group_accuracy, tow
from miu_hooks.original import save_weights
from miu_hooks.precision import resolve_precision, tf32_matmul
from miu_hooks.runtime import resolve_device
from miu_hooks.splits import subset
from miu_hooks.unlearn import unlearn

__all__ = ["RunResult", "evaluate_model", "execute", "torch_threads", "work_dir"]

PLOT_NOTE = "groups.png skipped: matplotlib is not installed (pip install 'miu-hooks[plot]')"


@dataclass(frozen=True)
class RunResult:
    """What a finished run produced.

    Attributes:
        out: The output folder.
        report: The contents of ``report.json``.
        files: Names of the files written into ``out``.
        notes: Remarks shown to the user (e.g. a skipped plot).
    """

    out: Path
    report: dict[str, Any]
    files: list[str]
    notes: list[str]


def _take(data: Dataset, positions: np.ndarray) -> Dataset:
    if isinstance(data, GroupTensorDataset):
        return subset(data, torch.from_numpy(positions))
    return Subset(data, positions.tolist())


def evaluate_model(
    model: nn.Module,
    *,
    retain: Dataset,
    forget: Dataset,
    test: Dataset | None,
    val: Dataset | None,
    num_groups: int,
    num_sensitive: int,
    forget_groups: tuple[int, ...] | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> dict[str, Any]:
    """Return the metrics of ``model`` as a JSON-ready dict.

    With a test set this is :func:`miu_hooks.evaluation.evaluate` (RA, FA, TA, MIA,
    EO, GA, per-group test accuracy; EO and GA for ``forget_groups``, by default
    the groups present in ``forget``). Without one, only RA, FA and the per-group
    accuracy on the retain set are computed.
    """
    if test is not None:
        rep = evaluate(
            model,
            retain=retain,
            forget=forget,
            test=test,
            val=val,
            num_groups=num_groups,
            num_sensitive=num_sensitive,
            forget_groups=forget_groups,
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=collate_fn,
        )
        return rep.to_dict()
    opts: dict[str, Any] = {"batch_size": batch_size, "num_workers": num_workers,
                            "collate_fn": collate_fn}  # fmt: skip
    r_pred, r_lab, r_grp, _ = predict(model, retain, name="retain", **opts)
    f_pred, f_lab, _, _ = predict(model, forget, name="forget", **opts)
    per_group = per_group_accuracy(r_pred, r_lab, r_grp, num_groups)
    return {
        "RA": accuracy(r_pred, r_lab),
        "FA": accuracy(f_pred, f_lab),
        "per_group": {str(k): v for k, v in per_group.items()},
    }


def _cached(path: Path, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    if path.is_file():
        cached: dict[str, Any] = json.loads(path.read_text())
        return cached
    value = compute()
    atomic_write_text(path, json.dumps(value))
    return value


def _fingerprint(
    prep: Prepared, request: Request, config: TrainConfig, method: str
) -> dict[str, Any]:
    def data_id(index: DataIndex | None) -> str | None:
        if index is None:
            return None
        p = index.path
        named = sha256_file(p) if p.is_file() else str(p.resolve())
        return named if index.split is None else f"{named}:{index.split}"

    return {
        "model_sha256": request.model_sha256,
        "forget_sha256": prep.forget.sha256,
        "ledger": request.ledger.to_dict(),
        "data": request.ledger.data_sha256,
        "test": data_id(prep.test),
        "val": data_id(prep.val),
        "references": {k: sha256_file(s.weights) for k, s in prep.references.items()},
        "method": method,
        "config": config.to_dict(),
    }


def _open_work(work: Path, fingerprint: dict[str, Any], resume: bool, console: Console) -> None:
    run_file = work / "run.json"
    if work.exists() and resume:
        try:
            saved = json.loads(run_file.read_text())
        except (OSError, ValueError):
            saved = None
        if saved is None:  # interrupted before run.json was written: nothing to keep
            shutil.rmtree(work)
            console.log("the interrupted run had not started; starting from the beginning")
            work.mkdir(parents=True)
            atomic_write_text(run_file, json.dumps(fingerprint))
            return
        if saved != json.loads(json.dumps(fingerprint)):
            raise CheckpointError(
                f"the interrupted run in {work} used other inputs or settings; rerun without "
                "--resume to start over, or with the same options to continue it"
            )
        console.log(f"resuming the interrupted run in {work}")
        return
    if work.exists():
        console.log(f"discarding the interrupted run in {work} (pass --resume to continue it)")
        shutil.rmtree(work)
    elif resume:
        console.log("nothing to resume: starting from the beginning")
    work.mkdir(parents=True)
    atomic_write_text(run_file, json.dumps(fingerprint))


def _gaps(models: Mapping[str, Any], refs: list[str], names: list[str]) -> dict[str, Any]:
    return {
        m: {
            f"vs {r}": {"avg_gap": avg_gap(models[m], models[r]), "tow": tow(models[m], models[r])}
            for r in refs
        }
        for m in names
    }


def execute(
    prep: Prepared,
    *,
    config: TrainConfig,
    method: str = "miu",
    feature_module: str | None = None,
    image_size: int | None = None,
    threads: int | None = None,
    resume: bool = False,
    console: Console | None = None,
) -> RunResult:
    """Run ``method`` on the prepared inputs and write the output folder.

    Args:
        prep: Checked inputs (:func:`miu_hooks.cli.inputs.prepare`).
        config: The run's config (resolved for ``method`` here; any method's config class).
        method: A registered method name (``available_methods()``).
        feature_module: Head override for the feature tap (dotted name).
        image_size: Side of image inputs (manifest or ``datasets`` images).
        threads: ``torch.set_num_threads`` for the run, when given.
        resume: Continue the interrupted run of the same output folder.
        console: Messages and progress bars.

    Returns:
        The :class:`RunResult`.

    Raises:
        MIUError: Bad weights, data or numbers (NaN/Inf); nothing is left behind.
        KeyboardInterrupt: Interrupted; the work folder is kept for ``resume``.
    """
    method, _, config = resolve_run(method, config)  # record what runs (e.g. reweight: true)
    device = resolve_device(config.device)
    config = config.replace(precision=resolve_precision(config.precision, device))
    with torch_threads(threads), tf32_matmul(device):
        return _execute(prep, config, method, feature_module, image_size, resume, console)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (when given), then restore it."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _execute(
    prep: Prepared,
    config: TrainConfig,
    method: str,
    feature_module: str | None,
    image_size: int | None,
    resume: bool,
    console: Console | None,
) -> RunResult:
    console = console or Console(quiet=True)
    start_time = time.monotonic()
    plan, num_sensitive = prep.plan, config.num_sensitive
    work = work_dir(prep.out)
    request = prep.request or plan_request(prep.model, prep.data, prep.forget)
    fingerprint = _fingerprint(prep, request, config, method)
    phases = console.steps(["load", "evaluate original", "unlearn", "evaluate", "write"], "run")
    next(phases)
    model = load_model(prep.model, seed=config.seed)
    # A later request calibrates against the ledger's original, not the model it starts from.
    original = load_model(request.original, seed=config.seed) if request.continued else None
    refs = {name: load_model(src, seed=config.seed) for name, src in prep.references.items()}
    side, mode = image_settings(prep.model, image_size)
    pad = pad_token_id(prep.model)  # tokenized text is padded with the model's pad id
    data = load_dataset(prep.data, side=side, mode=mode, pad_id=pad)
    test, val = (
        load_dataset(i, side=side, mode=mode, pad_id=pad) if i else None
        for i in (prep.test, prep.val)
    )
    retain, forget = _take(data, plan.retain), _take(data, plan.forget)
    collate = getattr(data, "collate", None)  # text: each batch padded to its longest
    device = resolve_device(config.device)

    def measure(net: nn.Module) -> Callable[[], dict[str, Any]]:
        return lambda: evaluate_model(
            net.to(device),
            retain=retain,
            forget=forget,
            test=test,
            val=val,
            num_groups=plan.num_groups,
            num_sensitive=num_sensitive,
            forget_groups=prep.forget_groups,
            num_workers=config.num_workers,
            collate_fn=collate,
        )

    evals = {k: (d, i) for k, d, i in (("--test", test, prep.test), ("--val", val, prep.val))
             if d is not None and i is not None}  # fmt: skip
    preflight(model, retain, forget, config, method=method, num_groups=plan.num_groups,
              feature_module=feature_module, evals=evals, collate_fn=collate)  # fmt: skip
    _open_work(work, fingerprint, resume, console)
    done = False
    try:
        next(phases)
        reference = model if original is None else original
        models = {"original": _cached(work / "before.json", measure(reference))}
        if original is not None:
            models["previous"] = _cached(work / "previous.json", measure(model))
        for i, (name, ref) in enumerate(refs.items()):
            models[name] = _cached(work / f"reference-{i}.json", measure(ref))
        next(phases)
        net = model  # retrain* re-initialises it (seeded) unless reinit=False
        guard: list[GuardOutcome] = []
        guard_notes: list[str] = []
        with (
            console.counter(config.epochs, f"{method} epochs") as show,
            _guard_messages(console, guard_notes),
        ):
            unlearn(
                net,
                retain,
                forget,
                config=config,
                method=method,
                num_groups=plan.num_groups,
                feature_module=feature_module,
                original=original,
                val=val,
                state_dir=work,
                resume=True,
                on_epoch_end=lambda epoch, _logs: show(epoch + 1),  # right after --resume
                on_guard=guard.append,
                progress=console.progress,
                collate_fn=collate,
            )
        if guard and guard[0].fired:
            console.log(f"warning: {guard[0].message}")
        next(phases)
        models["unlearned"] = measure(net)()
        report = _report(prep, fingerprint, config, method, models, list(refs), start_time)
        report["guard"] = (
            guard[0].to_dict()
            if guard
            else {"enabled": False, "reason": guard_notes[-1] if guard_notes else "guard=False"}
        )
        next(phases)
        notes: list[str] = []
        meta = {
            "format": "pt",
            "method": method,
            "config": config.to_json(),
            "input_sha256": fingerprint["model_sha256"],
            "forget_sha256": prep.forget.sha256,
            "original_sha256": request.ledger.original_sha256,
            "miu_hooks_version": report["miu_hooks_version"],
        }
        ledger: list[Ledger] = []

        def write_model(path: Path) -> None:
            save_weights(net.cpu(), path, meta)
            ledger.append(request.finish(method, path))  # hashes the file just written
            report.update(ledger_report(ledger[0], request))

        def plot(path: Path) -> bool:
            if plot_groups(report, path):
                return True
            notes.append(PLOT_NOTE)
            return False

        writers: dict[str, Callable[[Path], Any]] = {
            "model.safetensors": write_model,  # first: the ledger records its sha256
            LEDGER_FILE: lambda p: ledger[0].save(p),
            FORGOTTEN_FILE: lambda p: p.write_text(ledger[0].forgotten_csv()),
            "report.json": lambda p: p.write_text(dump_json(report)),
            "groups.png": plot,  # before report.md, which lists a skipped plot
            "report.md": lambda p: p.write_text(render_markdown(report, notes)),
        }
        if prep.model.config_dir is not None:
            config_json = prep.model.config_dir / "config.json"
            writers["config.json"] = lambda p: shutil.copyfile(config_json, p)
        files = atomic_write_folder(prep.out, writers)
        next(phases, None)
        done = True
        return RunResult(prep.out, report, files, notes)
    except KeyboardInterrupt:
        raise
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        if done:
            shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def _guard_messages(console: Console, notes: list[str]) -> Iterator[None]:
    """Show the guard's messages on the console (not as raw log lines or warnings).

    A guard that cannot run (too small a retain set) says why on the console and in
    ``notes``; its warning when it fires is printed from the outcome by the caller.
    """

    class _Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage().replace("pass val=", "pass --val")
            notes.append(message)
            console.log(f"note: {message}")

    log = logging.getLogger("miu_hooks.guard")
    handler, propagate = _Forward(level=logging.WARNING), log.propagate
    log.addHandler(handler)
    log.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CollapseWarning)
            yield
    finally:
        log.removeHandler(handler)
        log.propagate = propagate


def _report(
    prep: Prepared,
    fingerprint: dict[str, Any],
    config: TrainConfig,
    method: str,
    models: dict[str, Any],
    refs: list[str],
    start_time: float,
) -> dict[str, Any]:
    from miu_hooks import __version__

    plan = prep.plan
    ordered = {k: models[k] for k in ("original", "previous", "unlearned", *refs) if k in models}
    return {
        "miu_hooks_version": __version__,
        "method": method,
        "config": config.to_dict(),
        "inputs": {
            "model": str(prep.model.weights),
            "model_sha256": fingerprint["model_sha256"],
            "forget": str(prep.forget.path),
            "forget_sha256": prep.forget.sha256,
            "data": str(prep.data.path),
            "test": str(prep.test.path) if prep.test else None,
            "val": str(prep.val.path) if prep.val else None,
            "references": {
                k: {"path": str(s.weights), "sha256": fingerprint["references"][k]}
                for k, s in prep.references.items()
            },
        },
        "forgotten": len(plan.forget),
        "forget_groups": list(prep.forget_groups),
        "groups": {
            "num_groups": plan.num_groups,
            "names": list(prep.group_names),
            "counts": {
                str(g): dict(zip(("total", "forget", "retain"), c, strict=True))
                for g, c in plan.counts.items()
            },
        },
        "evaluated_on": "test" if prep.test is not None else "retain",
        "references": refs,
        "models": ordered,
        "gaps": _gaps(ordered, refs, [k for k in ordered if k not in refs]) if prep.test else {},
        "output": str(prep.out),
        "wall_s": round(time.monotonic() - start_time, 3),
    }
