"""Colored-digits benchmark: every method with and without REWEIGHT against one reference.

One command (from the repository root, package installed)::

    python benchmarks/run.py            # full run, writes benchmarks/RESULTS.md (+ results.json)
    python benchmarks/run.py --quick    # CI smoke run: one seed, r = 0.5, few epochs

Every method starts from the same original model and sees the same split; Avg. Gap
and ToW are computed against Retrain+REWEIGHT (headline) and against Retrain
(METHOD.md §8.4), both measured in the same run. Wall times are per ``unlearn``
call; the MIU retain-step overhead is timed in the same process by interleaving
plain cross-entropy steps and MIU steps on the same batches (cache on and off).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from bench_models import convnet, mlp, resnet18, train_original
from bench_report import render
from bench_settings import (
    ABLATION_ROWS,
    METHODS,
    METRICS,
    QUICK,
    REF,
    REF2,
    Settings,
    base_config,
    fashion_available,
    load_data,
    train_config,
)
from bench_timing import PhaseTimer, step_overhead, whole_run
from torch import nn

import miu_hooks
from miu_hooks import resolve_run, unlearn
from miu_hooks.atomic import atomic_write_text
from miu_hooks.demo import ColoredSplits
from miu_hooks.errors import DataError, NonFiniteLossError
from miu_hooks.evaluation import evaluate
from miu_hooks.metrics import avg_gap, tow
from miu_hooks.splits import forget_split, subset

logger = logging.getLogger("benchmark")
HERE = Path(__file__).resolve().parent


def run_cell(name: str, seed: int, ratio: float, original: nn.Module, init: nn.Module,
             data: ColoredSplits, s: Settings) -> list[dict[str, Any]]:  # fmt: skip
    """All methods on one (dataset, seed, r): metrics, timings and the split."""
    retain_idx, forget_idx = forget_split(
        data.train, forget_groups=(s.forget_group,), ratio=ratio, seed=seed
    )
    retain, forget = subset(data.train, retain_idx), subset(data.train, forget_idx)
    common = dict(retain=retain, forget=forget, test=data.test, val=data.val, num_groups=4,
                  num_sensitive=2, forget_groups=[s.forget_group])  # fmt: skip
    orig_report = evaluate(original, **common)
    rows = [dict(method="original", metrics=dict(orig_report), per_group=orig_report.per_group,
                 wall_s=None)]  # fmt: skip
    for row, method, changes in METHODS:
        if row not in s.methods and row not in (REF, REF2):
            continue
        is_retrain = method.startswith("retrain")
        model = copy.deepcopy(init if is_retrain else original)
        base = train_config(s, seed) if is_retrain else base_config(s, seed, method)
        cfg = resolve_run(method, base.replace(**changes)).config  # recorded as it runs
        timer = PhaseTimer()
        start, diverged = time.perf_counter(), None
        try:
            unlearn(model, retain, forget, config=cfg, method=method, num_groups=4,
                    progress=timer)  # fmt: skip
        except NonFiniteLossError as exc:  # e.g. NegGrad's unbounded ascent
            diverged = str(exc)
            logger.warning("%s seed=%d r=%.1f %s diverged: %s", name, seed, ratio, row, exc)
        wall = time.perf_counter() - start
        try:  # a diverged model is scored as it stands (its last finite weights)
            report = evaluate(model, **common)
            metrics, per_group = dict(report), report.per_group
        except DataError as exc:  # non-finite losses: no metric is defined
            logger.warning("%s %s cannot be evaluated: %s", name, row, exc)
            metrics, per_group = {k: math.nan for k in METRICS}, {}
        rows.append(dict(method=row, metrics=metrics, per_group=per_group, wall_s=wall,
                         phases=dict(timer.seconds), steps=dict(timer.steps),
                         config=cfg.to_dict(), diverged=diverged))  # fmt: skip
        logger.info("%s seed=%d r=%.1f %-24s %.2fs GA=%.1f", name, seed, ratio, row, wall,
                    metrics["GA"])  # fmt: skip
    refs = {r["method"]: r["metrics"] for r in rows if r["method"] in (REF, REF2)}
    for r in rows:
        r.update(dataset=name, seed=seed, ratio=ratio,
                 gap_rw=avg_gap(r["metrics"], refs[REF]), tow_rw=tow(r["metrics"], refs[REF]),
                 gap_rt=avg_gap(r["metrics"], refs[REF2]), tow_rt=tow(r["metrics"], refs[REF2]),
                 n_retain=len(retain), n_forget=len(forget),
                 n_test_forget_group=orig_report.counts["test"][s.forget_group],
                 forget_indices=forget_idx.tolist())  # fmt: skip
    return rows


def measure_overhead(s: Settings) -> dict[str, Any]:
    """Retain-step overhead on three backbones, and whole runs on the conv backbone."""
    logger.info("timing the retain step (MLP, conv, ResNet-18) and whole conv runs")
    overhead = {"mlp": step_overhead(lambda sd: mlp(sd, s), load_data("digits", 0, s), s)}
    s16 = dataclasses.replace(s, size=16, digits_copies=1)
    data16 = load_data("digits", 0, s16)
    overhead["conv"] = step_overhead(convnet, data16, s16)
    overhead["resnet18"] = step_overhead(resnet18, data16, s16, steps=s.resnet_overhead_steps,
                                         reps=s.resnet_overhead_epochs)  # fmt: skip
    overhead["whole_run_conv"] = whole_run(convnet, s, size=16)
    return overhead


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed, r = 0.5, few epochs (CI)")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="raw results (default: results.json next to RESULTS.md, else --out's name with .json)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--no-fashion", action="store_true", help="skip Colored Fashion-MNIST")
    p.add_argument(
        "--ablation",
        action="store_true",
        help="add MIU rows: without REWEIGHT, independent critics, λ = 10",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        metavar="ROW",
        choices=[row for row, _, _ in METHODS],
        help="run only these rows of METHODS in bench_settings.py (Retrain and "
        "Retrain+REWEIGHT always run)",
    )
    p.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    p.add_argument("--ratios", type=float, nargs="+", help="override r (digits)")
    p.add_argument(
        "--no-timing",
        action="store_true",
        help="skip the overhead and whole-run timings (quality tables only)",
    )
    p.add_argument("--from-json", type=Path, help="re-render --out from a results.json, no runs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.from_json:
        raw = json.loads(args.from_json.read_text())
        fields = {k: tuple(v) if isinstance(v, list) else v
                  for k, v in raw["meta"]["setup"]["settings"].items()}  # fmt: skip
        _write(args.out, render(raw["rows"], raw["overhead"], Settings(**fields), raw["meta"]))
        logger.info("re-rendered %s from %s", args.out, args.from_json)
        return 0
    logging.getLogger("miu_hooks").setLevel(logging.WARNING)  # MIA winners etc. stay in the JSON
    s = dataclasses.replace(QUICK if args.quick else Settings(), threads=args.threads)
    if args.ablation:
        s = dataclasses.replace(s, methods=(*s.methods, *ABLATION_ROWS))
    if args.methods:
        s = dataclasses.replace(s, methods=tuple(args.methods))
    if args.seeds:
        s = dataclasses.replace(s, seeds=tuple(args.seeds))
    if args.ratios:
        s = dataclasses.replace(s, ratios=tuple(args.ratios))
    torch.set_num_threads(s.threads)
    use_fashion = fashion_available() and not args.no_fashion
    datasets = [d for d in s.datasets if d != "fashion" or use_fashion]
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    for name in datasets:
        ratios = s.fashion_ratios if name == "fashion" else s.ratios
        for seed in s.seeds:
            data = load_data(name, seed, s)
            init = mlp(seed, s)
            t0 = time.perf_counter()
            original = train_original(copy.deepcopy(init), data.train, train_config(s, seed))
            took = time.perf_counter() - t0
            logger.info("%s seed=%d original trained in %.1fs", name, seed, took)
            for ratio in ratios:
                rows += run_cell(name, seed, ratio, original, init, data, s)
    overhead = {} if args.no_timing else measure_overhead(s)
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "miu_hooks": miu_hooks.__version__, "numpy": _version("numpy"),
                "scikit-learn": _version("sklearn")}  # fmt: skip
    setup = dict(settings=dataclasses.asdict(s), datasets=datasets,
                 fashion_installed=fashion_available(), versions=versions,
                 unlearn_config=base_config(s, 0).to_dict(),
                 train_config=train_config(s, 0).to_dict(),
                 methods={row: [m, ch] for row, m, ch in METHODS})  # fmt: skip
    cli = sys.argv[1:] if argv is None else argv
    meta = dict(command=" ".join(["python benchmarks/run.py", *cli]),
                date=dt.datetime.now().isoformat(timespec="seconds"), versions=versions,
                device=f"CPU {_cpu_name()}, {os.cpu_count()} cores visible, "
                       f"{torch.get_num_threads()} torch thread(s)",
                total_s=time.perf_counter() - start, setup=setup)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    default_json = (args.out.with_name("results.json") if args.out.name == "RESULTS.md"
                    else args.out.with_suffix(".json"))  # fmt: skip
    json_path = args.json or default_json
    # Raw results first: a report that fails to render can be redone with --from-json.
    _write(json_path, json.dumps(dict(meta=meta, overhead=overhead, rows=rows),
                                 separators=(",", ":"), default=str))  # fmt: skip
    _write(args.out, render(rows, overhead, s, meta))
    logger.info("wrote %s and %s in %.1f min", args.out, json_path, meta["total_s"] / 60)
    return 0


def _write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, then rename)."""
    atomic_write_text(path, text)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except Exception:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
