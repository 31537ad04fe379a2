"""Repeated deletion requests on Colored digits: a sequence of requests against one request.

One command (from the repository root, package installed)::

    python benchmarks/sequence.py           # 3 seeds, 5 requests: benchmarks/RESULTS_sequence.md
    python benchmarks/sequence.py --quick   # CI smoke run: one seed, tiny data and epochs

The forget set of one r = 0.5 request of the main benchmark (``benchmarks/run.py``:
same data, model, split and recipe) is cut into K chunks that arrive one after
another (docs/method.md §12). Each sequence keeps a :class:`miu_hooks.Ledger`:
request k forgets the union D_f(k) of chunks 1..k, keeps D_r(k) = D \\ D_f(k),
samples with REWEIGHT against D and calibrates MIU against the original model.
After every request the model is scored against Retrain+REWEIGHT trained on that
request's D_r(k) (Avg. Gap), and its accuracy on every chunk is recorded: a rise
on earlier chunks back towards the original's accuracy is forgetting reversal.

Rows: MIU and ``finetune_reweight`` (the same ledger, cheap baseline); MIU with
each request alone (earlier chunks back in the retain set, calibrated against
the previous output: what ``miu-unlearn`` did before it kept a ledger); MIU and
``finetune_reweight`` with one request holding every chunk; the original model;
Retrain+REWEIGHT on each D_r(k) (the reference). Methods run with the benchmark's
recipe and the library's defaults otherwise, so a rerun after the defaults change
measures the new defaults.
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
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_models import mlp, train_original
from bench_sequence_report import render
from bench_settings import METHODS, QUICK, Settings, base_config, load_data, train_config
from run import _cpu_name
from torch import nn

import miu_hooks
from miu_hooks import Ledger, evaluate, load_original, resolve_run, unlearn
from miu_hooks.atomic import atomic_write_text
from miu_hooks.demo import ColoredSplits
from miu_hooks.evaluation import predict
from miu_hooks.ledger import weights_sha256
from miu_hooks.metrics import avg_gap, tow
from miu_hooks.splits import forget_split, subset

logger = logging.getLogger("sequence")
HERE = Path(__file__).resolve().parent
REF = "retrain_reweight"
LEDGER_ROWS = ("miu", "finetune_reweight")  # rows of bench_settings.METHODS
ALONE = "miu_alone"  # each request alone, as before the ledger


def _config(s: Settings, seed: int, row: str) -> tuple[str, Any]:
    """``(method, config)`` of a METHODS row with the benchmark's recipe (as run.py builds it)."""
    method, changes = {r: (m, ch) for r, m, ch in METHODS}[row]
    is_retrain = method.startswith("retrain")
    base = train_config(s, seed) if is_retrain else base_config(s, seed, method)
    return method, resolve_run(method, base.replace(**changes)).config  # as it runs


def chunks(forget_idx: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Cut the forget set into ``k`` requests (a seeded shuffle, then equal parts)."""
    order = np.random.default_rng(1000 + seed).permutation(forget_idx)
    return [np.sort(c) for c in np.array_split(order, k)]


class Scorer:
    """Scores models after request k against Retrain+REWEIGHT on D_r(k)."""

    def __init__(self, data: ColoredSplits, parts: list[np.ndarray], s: Settings) -> None:
        self.data, self.parts, self.s = data, parts, s
        self.refs: list[dict[str, float]] = []

    def split(self, k: int) -> tuple[Any, Any]:
        """D_r(k), D_f(k) of request k (1-based), straight from the chunks."""
        mask = np.isin(np.arange(len(self.data.train)), np.concatenate(self.parts[:k]))
        return (subset(self.data.train, torch.from_numpy(np.nonzero(~mask)[0])),
                subset(self.data.train, torch.from_numpy(np.nonzero(mask)[0])))  # fmt: skip

    def score(self, model: nn.Module, k: int, row: str, wall: float | None) -> dict[str, Any]:
        retain, forget = self.split(k)
        rep = evaluate(model, retain=retain, forget=forget, test=self.data.test,
                       val=self.data.val, num_groups=4, num_sensitive=2,
                       forget_groups=[self.s.forget_group])  # fmt: skip
        metrics = dict(rep)
        if row == REF:
            self.refs.append(metrics)
        ref = self.refs[k - 1]
        chunk_acc = []
        for part in self.parts:
            p = predict(model, subset(self.data.train, torch.from_numpy(part)))
            chunk_acc.append(100.0 * float((p.preds == p.labels).float().mean()))
        return dict(row=row, request=k, metrics=metrics, per_group=rep.per_group,
                    gap=avg_gap(metrics, ref), tow=tow(metrics, ref), chunk_acc=chunk_acc,
                    wall_s=wall, n_forget=len(forget), n_retain=len(retain))  # fmt: skip


def _timed(model: nn.Module, retain: Any, forget: Any, cfg: Any, method: str,
           original: nn.Module | None = None, val: Any = None) -> float:  # fmt: skip
    """Run ``unlearn`` (in place) and return its wall time in seconds.

    ``val`` is the collapse guard's held-out set (as in run.py), so that no retain
    sample is held out of training.
    """
    start = time.perf_counter()
    unlearn(model, retain, forget, config=cfg, method=method, original=original, num_groups=4,
            val=val)  # fmt: skip
    return time.perf_counter() - start


def run_seed(seed: int, s: Settings, k_requests: int, rows: tuple[str, ...]) -> dict[str, Any]:
    """Every sequence on one seed: records per (row, request) and each ledger."""
    data = load_data("digits", seed, s)
    init = mlp(seed, s)
    original = train_original(copy.deepcopy(init), data.train, train_config(s, seed))
    frozen = load_original(original)  # the calibration reference of every ledger request
    _, forget_idx = forget_split(data.train, forget_groups=(s.forget_group,), ratio=0.5,
                                 seed=seed)  # fmt: skip
    parts = chunks(forget_idx.numpy(), k_requests, seed)
    scorer = Scorer(data, parts, s)
    records: list[dict[str, Any]] = []
    ref_method, ref_cfg = _config(s, seed, REF)
    for k in range(1, k_requests + 1):  # references first: Gap needs them
        retain, forget = scorer.split(k)
        model = copy.deepcopy(init)
        wall = _timed(model, retain, forget, ref_cfg, ref_method, val=data.val)
        records.append(scorer.score(model, k, REF, wall))
        logger.info("seed=%d request %d: %s trained in %.1fs", seed, k, REF, wall)
    # The original does not change: scored once, after the last request.
    records.append(scorer.score(original, k_requests, "original", None))
    ledgers: dict[str, Any] = {}
    for row in rows:
        if row == ALONE:
            continue
        method, cfg = _config(s, seed, row)
        model, ledger = copy.deepcopy(original), Ledger.start(original)
        for k, part in enumerate(parts, 1):
            retain, forget = ledger.split(data.train, part.tolist())
            expect = scorer.split(k)
            if (len(retain), len(forget)) != (len(expect[0]), len(expect[1])):
                raise RuntimeError(f"the ledger's split of request {k} is not the union")
            model_in = weights_sha256(model)
            wall = _timed(model, retain, forget, cfg, method, frozen, val=data.val)
            ledger.add_request(part.tolist(), method=method, model_in_sha256=model_in,
                               model_out_sha256=weights_sha256(model))  # fmt: skip
            records.append(scorer.score(model, k, row, wall))
            logger.info("seed=%d request %d: %s %.1fs Gap %.2f", seed, k, row, wall,
                        records[-1]["gap"])  # fmt: skip
        ledgers[row] = ledger.to_dict()
        once = copy.deepcopy(original)
        retain, forget = scorer.split(k_requests)
        wall = _timed(once, retain, forget, cfg, method, frozen, val=data.val)
        records.append(scorer.score(once, k_requests, f"{row}_once", wall))
    if ALONE in rows:
        method, cfg = _config(s, seed, "miu")
        model = copy.deepcopy(original)
        for k, part in enumerate(parts, 1):
            keep = np.setdiff1d(np.arange(len(data.train)), part)
            retain = subset(data.train, torch.from_numpy(keep))
            forget = subset(data.train, torch.from_numpy(part))
            # calibrates against its input
            wall = _timed(model, retain, forget, cfg, method, val=data.val)
            records.append(scorer.score(model, k, ALONE, wall))
    for r in records:
        r["seed"] = seed
    return dict(seed=seed, chunks=[p.tolist() for p in parts], records=records,
                ledgers=ledgers)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed, tiny data and epochs (CI)")
    p.add_argument("--requests", type=int, default=5, help="requests K the forget set is cut into")
    p.add_argument("--seeds", type=int, nargs="+", help="override the seeds [0 1 2]")
    p.add_argument("--no-baseline", action="store_true", help="skip the finetune_reweight rows")
    p.add_argument("--no-alone", action="store_true", help="skip MIU with each request alone")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS_sequence.md")
    p.add_argument("--json", type=Path, help="raw results [--out with .json]")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--from-json", type=Path, help="re-render --out from a results JSON, no runs")
    args = p.parse_args(argv)
    if args.requests < 2:
        p.error("--requests must be at least 2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.from_json:
        raw = json.loads(args.from_json.read_text())
        atomic_write_text(args.out, render(raw["seeds"], raw["meta"]))
        logger.info("re-rendered %s from %s", args.out, args.from_json)
        return 0
    logging.getLogger("miu_hooks").setLevel(logging.WARNING)
    s = dataclasses.replace(QUICK if args.quick else Settings(), threads=args.threads)
    if args.seeds:
        s = dataclasses.replace(s, seeds=tuple(args.seeds))
    rows = tuple(r for r in (*LEDGER_ROWS, ALONE)
                 if not (args.no_baseline and r == "finetune_reweight")
                 and not (args.no_alone and r == ALONE))  # fmt: skip
    torch.set_num_threads(s.threads)
    start = time.perf_counter()
    seeds = [run_seed(seed, s, args.requests, rows) for seed in s.seeds]
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "miu_hooks": miu_hooks.__version__, "numpy": np.__version__}  # fmt: skip
    cli = sys.argv[1:] if argv is None else argv
    meta = dict(
        command=" ".join(["python benchmarks/sequence.py", *cli]),
        date=dt.datetime.now().isoformat(timespec="seconds"), versions=versions,
        device=f"CPU {_cpu_name()}, {os.cpu_count()} cores visible, "
               f"{torch.get_num_threads()} torch thread(s)",
        total_s=time.perf_counter() - start, requests=args.requests, rows=list(rows),
        settings=dataclasses.asdict(s),
        configs={row: _config(s, 0, row)[1].to_dict() for row in (*LEDGER_ROWS, REF)},
    )  # fmt: skip
    json_path = args.json or args.out.with_suffix(".json")
    # Raw results first, then the report; both atomically.
    atomic_write_text(json_path, json.dumps(dict(meta=meta, seeds=seeds), default=str))
    atomic_write_text(args.out, render(seeds, meta))
    logger.info("wrote %s and %s in %.1f min", args.out, json_path, meta["total_s"] / 60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
