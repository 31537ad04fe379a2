"""The embedded demo behind ``miu-unlearn demo``.

1. Builds Colored Digits from scikit-learn's bundled 8x8 digits
   (:func:`miu_hooks.demo.toy_data.colored_digits` with ``seed=0, size=8,
   label_noise=0.05, color_flip=0.2``): y = 1[digit >= 5], drawn in red or
   green, and the colour agrees with y 80% of the time.
2. Trains the original model, a tiny ViT (:func:`miu_hooks.demo.vit.tiny_vit`: 4x4 patches, width
   64, 2 pre-norm encoder layers), on D with AdamW and a one-cycle schedule.
   The original, its initial weights and the data are cached in
   ``$MIU_HOOKS_CACHE`` (default ``~/.cache/miu_hooks``) under
   ``demo-<hash of the settings>/``, written atomically.
3. Forgets 50% of group 2 (y = 1 drawn in red, a minority group), trains
   Retrain+REWEIGHT (and plain Retrain) from the same initial weights on D_r
   with the same recipe, then runs MIU through the same code path as
   ``miu-unlearn`` (:func:`miu_hooks.cli.inputs.prepare` and
   :func:`miu_hooks.cli.run.execute`) with the retrained models as references.
4. Prints the per-group test accuracy of every model and the report location.

The numbers are whatever this run measures; nothing is tuned per run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from miu_hooks.atomic import atomic_write_text
from miu_hooks.cli.report import Console, per_group_markdown
from miu_hooks.demo.vit import tiny_vit

__all__ = ["DemoResult", "cache_root", "run_demo"]

CACHE_ENV = "MIU_HOOKS_CACHE"
ARCH = "miu_hooks.demo:tiny_vit"
DATA: dict[str, Any] = {"seed": 0, "size": 8, "label_noise": 0.05, "color_flip": 0.2}
FORGET: dict[str, Any] = {"forget_groups": (2,), "ratio": 0.5, "seed": 0}
FULL: dict[str, Any] = {
    "train": {"epochs": 20, "lr": 3e-3, "batch_size": 64},
    "miu": {
        "epochs": 5,
        "forget_epochs": 2,
        "lr": 0.01,
        "batch_size": 64,
        "mi_weight": 10.0,
        "mine_hidden": 64,
        "mine_warmup_iters": 50,
        "mine_iters": 5,
        "mine_lr": 0.01,
    },
    "plain_retrain": True,
}
QUICK: dict[str, Any] = {
    "train": {"epochs": 3, "lr": 3e-3, "batch_size": 64},
    "miu": {
        "epochs": 2,
        "forget_epochs": 1,
        "lr": 0.01,
        "batch_size": 64,
        "mi_weight": 10.0,
        "mine_hidden": 32,
        "mine_warmup_iters": 10,
        "mine_iters": 2,
        "mine_lr": 0.01,
    },
    "plain_retrain": False,
}


def cache_root() -> Path:
    """Return the cache root: ``$MIU_HOOKS_CACHE``, else ``$XDG_CACHE_HOME/miu_hooks``.

    Without either variable it is ``~/.cache/miu_hooks``.
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "miu_hooks"


@dataclass(frozen=True)
class DemoResult:
    """Outcome of :func:`run_demo`.

    Attributes:
        out: The report folder.
        report: The contents of its ``report.json``.
        summary: The text printed by ``miu-unlearn demo``.
        cache: The demo's cache folder.
    """

    out: Path
    report: dict[str, Any]
    summary: str
    cache: Path


def _fit(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    sampler: Sampler[int] | None = None,
    progress: Callable[[Any, str], Any],
    desc: str,
) -> nn.Module:
    """Train with cross-entropy, AdamW and a one-cycle schedule (the demo's ERM recipe)."""
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(
        data,
        batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        generator=gen if sampler is None else None,
    )
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    total = epochs * len(loader)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.2)
    model.train()
    for epoch in progress(range(epochs), desc):
        set_epoch = getattr(sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        for x, y, _ in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def _save_split(path: Path, split: Any, names: tuple[str, ...]) -> None:
    from safetensors.torch import save_file

    ids = torch.arange(len(split), dtype=torch.int64)
    tensors = {"inputs": split.inputs, "labels": split.labels, "groups": split.groups, "ids": ids}
    save_file(tensors, str(path), metadata={"group_names": json.dumps(list(names))})


def _build_cache(folder: Path, settings: dict[str, Any], console: Console) -> None:
    """Create the cache folder: data, forget list, initial and original weights."""
    from miu_hooks.demo.toy_data import colored_digits
    from miu_hooks.original import save_weights
    from miu_hooks.splits import forget_split

    if (folder / "settings.json").is_file():
        console.log(f"original model: cached in {folder}")
        return
    splits = colored_digits(**DATA)
    _, forget = forget_split(splits.train, **FORGET)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        for name in ("train", "val", "test"):
            _save_split(tmp / f"{name}.safetensors", getattr(splits, name), splits.group_names)
        with open(tmp / "forget.csv", "w", newline="") as fh:
            csv.writer(fh).writerows([["id"], *([int(i)] for i in forget)])
        torch.manual_seed(0)
        model = tiny_vit()
        save_weights(model, tmp / "init.safetensors")
        start = time.monotonic()
        _fit(model, splits.train, **settings["train"], progress=console.progress, desc="original")
        save_weights(model, tmp / "original" / "model.safetensors", {"arch": ARCH})
        console.log(f"original model: trained in {time.monotonic() - start:.1f} s")
        (tmp / "settings.json").write_text(json.dumps(settings, indent=2))
        if folder.exists():  # a concurrent demo finished first; keep its cache
            return
        os.rename(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _retrain(
    folder: Path, name: str, reweight: bool, settings: dict[str, Any], reuse: bool, console: Console
) -> Path:
    """Train ``name`` from the cached initial weights on D_r; return its weights file."""
    from miu_hooks.cli.data_index import read_data_index
    from miu_hooks.data import GroupTensorDataset
    from miu_hooks.original import load_weights, save_weights
    from miu_hooks.sampling import GroupReweightSampler

    path = folder / name / "model.safetensors"
    if reuse and path.is_file():
        console.log(f"{name}: cached")
        return path
    index = read_data_index(folder / "train.safetensors")
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "train.safetensors"))
    forget = {int(row["id"]) for row in csv.DictReader(open(folder / "forget.csv"))}
    keep = torch.tensor([i for i in range(len(index)) if i not in forget])
    retain = GroupTensorDataset(
        tensors["inputs"][keep], tensors["labels"][keep], tensors["groups"][keep]
    )
    sampler = None
    if reweight:
        sampler = GroupReweightSampler(retain.groups, tensors["groups"], num_groups=4, seed=0)
    model = load_weights(tiny_vit(), folder / "init.safetensors")
    start = time.monotonic()
    _fit(model, retain, **settings["train"], sampler=sampler, progress=console.progress, desc=name)
    console.log(
        f"{name}: trained from the original's initial weights in {time.monotonic() - start:.1f} s"
    )
    return save_weights(model, path, {"arch": ARCH, "method": name})


def run_demo(
    *,
    quick: bool = False,
    out: str | Path | None = None,
    threads: int | None = 1,
    reuse_retrain: bool = False,
    console: Console | None = None,
) -> DemoResult:
    """Run the demo described in the module docstring and write its report folder.

    Args:
        quick: Tiny settings (3 training epochs, 2 MIU epochs, no plain Retrain) for tests.
        out: Report folder; default ``<cache>/demo-<hash>/report`` (replaced each run).
        threads: ``torch.set_num_threads``; 1 is fastest for these tiny models.
        reuse_retrain: Reuse retrained models cached by an earlier run.
        console: Messages and progress bars.

    Returns:
        The :class:`DemoResult`.
    """
    from miu_hooks.cli.run import torch_threads

    with torch_threads(threads):
        return _run_demo(quick, out, reuse_retrain, console or Console(quiet=True))


def _run_demo(
    quick: bool, out: str | Path | None, reuse_retrain: bool, console: Console
) -> DemoResult:
    from miu_hooks import __version__
    from miu_hooks.cli.inputs import prepare
    from miu_hooks.cli.run import execute
    from miu_hooks.config import MIUConfig

    start = time.monotonic()
    settings = {
        "data": DATA,
        "forget": FORGET,
        **(QUICK if quick else FULL),
        "arch": ARCH,
        "version": __version__,
        "torch": torch.__version__.split("+")[0],
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_root() / f"demo-{key}"
    console.log(
        "miu-unlearn demo: Colored Digits (8x8, label noise 0.05, colour flip 0.2); "
        "forgetting 50% of group 2 (y=1 drawn in red)"
    )
    _build_cache(folder, settings, console)
    refs = {"Retrain+REWEIGHT": ("retrain_reweight", True)}
    if settings["plain_retrain"]:
        refs["Retrain"] = ("retrain", False)
    ref_paths = {
        label: _retrain(folder, name, rw, settings, reuse_retrain, console)
        for label, (name, rw) in refs.items()
    }
    config = MIUConfig(**settings["miu"], device="cpu", seed=0)
    config_file = folder / "miu.json"
    # Rewritten when stale: the printed command reads it, and a cache from an older
    # version may hold settings this version no longer accepts.
    if not config_file.is_file() or config_file.read_text() != config.to_json():
        atomic_write_text(config_file, config.to_json())
    prep = prepare(
        model=folder / "original" / "model.safetensors",
        arch=ARCH,
        data=folder / "train.safetensors",
        forget=folder / "forget.csv",
        test=folder / "test.safetensors",
        val=folder / "val.safetensors",
        references=ref_paths,
        out=out or folder / "report",
        overwrite=True,
    )
    console.log(f"MIU: {config.epochs} epochs via the miu-unlearn pipeline")
    result = execute(prep, config=config, method="miu", console=console)
    report = result.report
    summary = _summary(report, prep, config_file, time.monotonic() - start)
    return DemoResult(result.out, report, summary, folder)


def _summary(report: dict[str, Any], prep: Any, config_file: Path, wall: float) -> str:
    from miu_hooks.evaluation import format_table

    models = report["models"]
    rows = {"Original": models["original"], "MIU": models["unlearned"]}
    rows.update({k: models[k] for k in report["references"]})
    ref = {"Retrain+REWEIGHT": models["Retrain+REWEIGHT"]}
    command = (
        f"miu-unlearn -m {prep.model.weights} --arch {ARCH} -d {prep.data.path} "
        f"-f {prep.forget.path} --test {prep.test.path} --val {prep.val.path} "
        f"--reference Retrain+REWEIGHT={prep.references['Retrain+REWEIGHT'].weights} "
        f"--config {config_file} --threads 1 -o miu-out"
    )
    return "\n".join(
        [
            f"Per-group test accuracy (%), after forgetting {report['forgotten']} samples "
            "of group 2:",
            per_group_markdown(rows, report["groups"]["names"]),
            "",
            "Metrics (x100; Gap/ToW against Retrain+REWEIGHT, the group-robust exact unlearning):",
            format_table(rows, references=ref),
            "",
            f"Report: {Path(report['output']) / 'report.md'}   (demo wall time {wall:.0f} s)",
            f"Cache:  {config_file.parent}",
            f"Same run with the CLI:\n  {command}",
        ]
    )
