"""Colored digits and Colored Fashion-MNIST: every method under two protocols, one reference.

One command (from the repository root, package installed)::

    python benchmarks/run.py            # full run, writes benchmarks/RESULTS.md (+ results.json)
    python benchmarks/run.py --jobs 2   # the same, two worker processes
    python benchmarks/run.py --quick    # CI smoke run: one seed, r = 0.5, tiny grids

Every method starts from the same Original and sees the same split; Avg. Gap and ToW
are computed against Retrain+REWEIGHT (headline) and against Retrain (docs/method.md
§8.4), both measured in the same run. Two protocols (bench_protocol.py): library
defaults, and a tuned one with the same budget for every method, selected on the
validation set. Wall times are per ``unlearn`` call; the timing sections (MIU's
retain-step overhead, whole runs on a conv net) run unless ``--no-timing``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from bench_models import convnet, mlp, resnet18, train_original
from bench_protocol import run_unit
from bench_report import render
from bench_settings import (
    ABLATION_ROWS,
    GRIDS,
    METHODS,
    QUICK,
    Settings,
    default_config,
    fashion_available,
    load_data,
    train_config,
)
from bench_timing import step_overhead, whole_run

import miu_hooks
from miu_hooks.atomic import atomic_write_text
from miu_hooks.errors import CollapseWarning
from miu_hooks.original import save_weights

logger = logging.getLogger("benchmark")
HERE = Path(__file__).resolve().parent


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


def train_originals(datasets: list[str], s: Settings, folder: Path) -> dict[str, dict[int, Path]]:
    """Train the Original of every (data set, seed) once; return the weights' paths."""
    out: dict[str, dict[int, Path]] = {}
    for name in datasets:
        for seed in s.seeds:
            data, init = load_data(name, seed, s), mlp(seed, s)
            start = time.perf_counter()
            original = train_original(copy.deepcopy(init), data.train, train_config(s, seed))
            path = save_weights(original, folder / f"original-{name}-{seed}.safetensors")
            out.setdefault(name, {})[seed] = path
            logger.info("%s seed=%d original trained in %.1fs", name, seed,
                        time.perf_counter() - start)  # fmt: skip
    return out


def _unit(args: tuple[str, float, Settings, dict[int, Path]]) -> dict[str, Any]:
    """A worker's job: both protocols on one (data set, r)."""
    name, ratio, s, originals = args
    torch.set_num_threads(s.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    _quiet()
    return run_unit(name, ratio, s, originals)


def _quiet() -> None:
    """The guard's warnings are recorded in the rows; keep the log to the progress lines."""
    logging.getLogger("miu_hooks").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=CollapseWarning)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed, r = 0.5, tiny grids (CI)")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="raw results (default: results.json next to RESULTS.md, else --out's name with .json)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per process")
    p.add_argument("--jobs", type=int, default=1, help="worker processes, one (data set, r) each")
    p.add_argument("--no-fashion", action="store_true", help="skip Colored Fashion-MNIST")
    p.add_argument(
        "--protocols",
        nargs="+",
        choices=["default", "tuned"],
        help="run only these protocols (default: both)",
    )
    p.add_argument(
        "--ablation",
        action="store_true",
        help="add MIU rows to the default protocol: without REWEIGHT, independent critics, "
        "λ = 10, the unbounded DV objective (with and without clipping)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        metavar="ROW",
        choices=[row for row, _, _ in METHODS],
        help="run only these rows of METHODS in bench_settings.py (the Original, Retrain and "
        "Retrain+REWEIGHT always run)",
    )
    p.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    p.add_argument("--ratios", type=float, nargs="+", help="override r (both data sets)")
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
        _write(args.out, render(raw, Settings(**fields)))
        logger.info("re-rendered %s from %s", args.out, args.from_json)
        return 0
    _quiet()
    s = dataclasses.replace(QUICK if args.quick else Settings(), threads=args.threads)
    if args.ablation:
        s = dataclasses.replace(s, methods=(*s.methods, *ABLATION_ROWS))
    if args.methods:
        s = dataclasses.replace(s, methods=tuple(args.methods))
    if args.seeds:
        s = dataclasses.replace(s, seeds=tuple(args.seeds))
    if args.ratios:
        s = dataclasses.replace(s, ratios=tuple(args.ratios), fashion_ratios=tuple(args.ratios))
    if args.protocols:
        s = dataclasses.replace(s, protocols=tuple(args.protocols))
    if "tuned" in s.protocols and s.tune_seed not in s.seeds:
        s = dataclasses.replace(s, tune_seed=s.seeds[0])
    torch.set_num_threads(s.threads)
    use_fashion = fashion_available() and not args.no_fashion
    datasets = [d for d in s.datasets if d != "fashion" or use_fashion]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="miu-bench-") as tmp:
        originals = train_originals(datasets, s, Path(tmp))
        units = [(name, ratio, s, originals[name]) for name in datasets
                 for ratio in (s.fashion_ratios if name == "fashion" else s.ratios)]  # fmt: skip
        if args.jobs > 1:
            with ProcessPoolExecutor(max_workers=args.jobs) as pool:
                results = list(pool.map(_unit, units))
        else:
            results = [run_unit(*u) for u in units]
    rows = [r for res in results for r in res["rows"]]
    selection = [x for res in results for x in res["selection"]]
    quality_s = time.perf_counter() - start
    overhead = {} if args.no_timing else measure_overhead(s)
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "miu_hooks": miu_hooks.__version__, "numpy": _version("numpy"),
                "scikit-learn": _version("sklearn")}  # fmt: skip
    setup = dict(settings=dataclasses.asdict(s), datasets=datasets,
                 fashion_installed=fashion_available(), versions=versions,
                 default_config=default_config(s, 0).to_dict(),
                 train_config=train_config(s, 0).to_dict(),
                 grids={k: [list(v[0]), v[1], list(v[2])] for k, v in GRIDS.items()},
                 methods={row: [m, ch] for row, m, ch in METHODS})  # fmt: skip
    cli = sys.argv[1:] if argv is None else argv
    meta = dict(command=" ".join(["python benchmarks/run.py", *cli]),
                date=dt.datetime.now().isoformat(timespec="seconds"), versions=versions,
                device=f"CPU {_cpu_name()}, {os.cpu_count()} cores visible, "
                       f"{torch.get_num_threads()} torch thread(s) x {args.jobs} process(es)",
                total_s=time.perf_counter() - start, quality_s=quality_s,
                load_average=_loadavg(), setup=setup)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    default_json = (args.out.with_name("results.json") if args.out.name == "RESULTS.md"
                    else args.out.with_suffix(".json"))  # fmt: skip
    json_path = args.json or default_json
    raw = dict(meta=meta, overhead=overhead, selection=selection, rows=rows)
    # Raw results first: a report that fails to render can be redone with --from-json.
    _write(json_path, json.dumps(raw, separators=(",", ":"), default=str))
    _write(args.out, render(raw, s))
    logger.info("wrote %s and %s in %.1f min", args.out, json_path, meta["total_s"] / 60)
    return 0


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


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
