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
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

import miu_hooks
from miu_hooks import MIUConfig, attach, unlearn
from miu_hooks.data import IndexedDataset, forward_logits, split_batch
from miu_hooks.datasets import (
    ColoredSplits,
    colored_digits,
    find_fashion_mnist,
    forget_split,
    subset,
)
from miu_hooks.errors import DataError, NonFiniteLossError
from miu_hooks.functional import checked_cross_entropy
from miu_hooks.methods.l1_sparse import DEFAULT_L1_ALPHA
from miu_hooks.methods.salun import DEFAULT_SALUN_RATIO
from miu_hooks.methods.scrub import SCRUB_DEFAULTS
from miu_hooks.metrics import GAP_METRICS, avg_gap, evaluate, tow
from miu_hooks.sampling import GroupReweightSampler
from miu_hooks.unlearn import build_optimizer, build_scheduler

logger = logging.getLogger("benchmark")
HERE = Path(__file__).resolve().parent
REF, REF2 = "retrain_reweight", "retrain"
# (row name, registered method, extra config changes); "original" is evaluated, not run.
METHODS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("retrain", "retrain", {}),
    ("retrain_reweight", "retrain_reweight", {}),
    ("finetune", "finetune", {}),
    ("finetune_reweight", "finetune_reweight", {}),
    ("neggrad", "neggrad", {}),
    ("random_labels", "random_labels", {}),
    ("random_labels_reweight", "random_labels_reweight", {}),
    ("l1_sparse", "l1_sparse", {}),
    ("l1_sparse_reweight", "l1_sparse_reweight", {}),
    ("salun", "salun", {}),
    ("salun_reweight", "salun_reweight", {}),
    ("scrub", "scrub", {}),
    ("scrub_reweight", "scrub_reweight", {}),
    ("miu", "miu", {}),
    ("miu_no_reweight", "miu", {"reweight": False}),  # ablation (--ablation)
)
DEFAULT_ROWS = tuple(row for row, _, _ in METHODS if row != "miu_no_reweight")
METRICS = (*GAP_METRICS[:4], "MIA_AUC", "EO", "GA", "worst_group")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that defines a benchmark run (recorded in RESULTS.md and results.json)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    ratios: tuple[float, ...] = (0.1, 0.5, 0.9)
    datasets: tuple[str, ...] = ("digits", "fashion")
    methods: tuple[str, ...] = DEFAULT_ROWS
    digits_samples: int | None = None
    fashion_samples: int = 3000
    fashion_test_fraction: float = 0.5
    fashion_ratios: tuple[float, ...] = (0.5,)
    forget_group: int = 2
    size: int = 8
    label_noise: float = 0.05
    color_flip: float = 0.2
    hidden: tuple[int, int] = (128, 64)
    batch_size: int = 32
    train_epochs: int = 20
    train_lr: float = 0.05
    unlearn_epochs: int = 5
    unlearn_lr: float = 0.01
    mine_warmup_iters: int = 100
    mine_iters: int = 10
    overhead_epochs: int = 9
    overhead_steps: int = 16
    threads: int = 1


QUICK_ROWS = ("finetune", "neggrad", "random_labels_reweight", "l1_sparse", "salun_reweight",
              "scrub", "miu")  # fmt: skip
QUICK = Settings(
    seeds=(0,), ratios=(0.5,), datasets=("digits",), methods=QUICK_ROWS, digits_samples=600,
    train_epochs=4,
    unlearn_epochs=2, mine_warmup_iters=20, mine_iters=5, overhead_epochs=2, overhead_steps=4,
)  # fmt: skip


def mlp(seed: int, s: Settings) -> nn.Module:
    """Flatten -> 3*size*size -> hidden -> 2, seeded (the same init for Original and Retrain)."""
    torch.manual_seed(seed)
    d, (h1, h2) = 3 * s.size * s.size, s.hidden
    return nn.Sequential(
        nn.Flatten(), nn.Linear(d, h1), nn.ReLU(), nn.Linear(h1, h2), nn.ReLU(), nn.Linear(h2, 2)
    )


def convnet(seed: int) -> nn.Module:
    """A small conv backbone (~0.1M params, 3x16x16 inputs) for the overhead micro-benchmark."""
    torch.manual_seed(seed)

    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 2),
    )  # fmt: skip


def base_config(s: Settings, seed: int, **kw: Any) -> MIUConfig:
    """The shared unlearning recipe (library defaults otherwise, see RESULTS.md).

    E_f (MIU's and SCRUB's forget epochs) keeps the paper's proportion E_f / E = 5 / 10.
    """
    opts: dict[str, Any] = dict(
        epochs=s.unlearn_epochs, forget_epochs=math.ceil(s.unlearn_epochs / 2),
        lr=s.unlearn_lr, batch_size=s.batch_size, seed=seed,
        device="cpu", reweight=False, mine_warmup_iters=s.mine_warmup_iters,
        mine_iters=s.mine_iters,
    )  # fmt: skip
    opts.update(kw)
    return MIUConfig(**opts)


def train_config(s: Settings, seed: int) -> MIUConfig:
    """The Original/Retrain recipe: SGD + momentum, cosine, ``train_epochs`` at ``train_lr``."""
    return base_config(s, seed, epochs=s.train_epochs, lr=s.train_lr)


def train_original(model: nn.Module, data: Any, cfg: MIUConfig) -> nn.Module:
    """ERM on D with the Retrain recipe (same optimiser, schedule and batch size)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, generator=gen)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    model.train()
    for _ in range(cfg.epochs):
        for x, y, _g in loader:
            opt.zero_grad(set_to_none=True)
            checked_cross_entropy(model(x), y).backward()
            opt.step()
        sched.step()
    return model


class PhaseTimer:
    """A ``progress`` wrapper timing each pass (first item to exhaustion, loop body included)."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.steps: dict[str, list[int]] = defaultdict(list)

    def __call__(self, it: Iterable[Any], desc: str) -> Iterator[Any]:
        phase = desc.rsplit(" ", 1)[-1] if desc.startswith("epoch ") else desc
        start, n = time.perf_counter(), 0
        for item in it:
            yield item
            n += 1
        self.seconds[phase].append(time.perf_counter() - start)
        self.steps[phase].append(n)


def load_data(name: str, seed: int, s: Settings) -> ColoredSplits:
    """Colored digits (sklearn) or Colored Fashion-MNIST (Debian files), 3 x size x size."""
    kw: dict[str, Any] = dict(seed=seed, size=s.size, label_noise=s.label_noise,
                              color_flip=s.color_flip)  # fmt: skip
    if name == "fashion":
        kw.update(source="fashion", max_samples=s.fashion_samples,
                  test_fraction=s.fashion_test_fraction)  # fmt: skip
    else:
        kw.update(max_samples=s.digits_samples)
    return colored_digits(**kw)


def fashion_available() -> bool:
    try:
        find_fashion_mnist()
    except FileNotFoundError:
        return False
    return True


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
        cfg = (train_config(s, seed) if is_retrain else base_config(s, seed)).replace(**changes)
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


def step_overhead(model_fn: Callable[[int], nn.Module], data: ColoredSplits, s: Settings,
                  seed: int = 0, ratio: float = 0.5) -> dict[str, Any]:  # fmt: skip
    """Median retain-epoch time: plain CE vs MIU (cache on / off), interleaved on the same batches.

    Each repetition runs one epoch of each variant over the same REWEIGHT-sampled
    retain batches; the MIU step is the engine's (``MIUHandle.retain_loss``).
    """
    r_idx, _ = forget_split(data.train, forget_groups=(s.forget_group,), ratio=ratio,
                                seed=seed)  # fmt: skip
    retain = subset(data.train, r_idx)
    sampler = GroupReweightSampler(retain.groups, data.train.groups, num_groups=4, seed=seed)
    loader = DataLoader(IndexedDataset(retain), batch_size=s.batch_size, sampler=sampler)
    batches = [split_batch(raw) for raw in loader][: s.overhead_steps]
    original = model_fn(seed).eval()
    cfg = base_config(s, seed, reweight=True)
    variants: dict[str, Any] = {}
    for name in ("ce", "miu_cache", "miu_nocache"):
        model = copy.deepcopy(original).train()
        opt = build_optimizer(model, cfg)
        handle = None
        if name != "ce":
            handle = attach(model, cfg, num_groups=4, original=copy.deepcopy(original))
            if name == "miu_cache":
                cache_loader = DataLoader(IndexedDataset(retain), batch_size=256)
                handle.build_feature_cache(cache_loader, len(retain))
        variants[name] = (model, opt, handle)
    times: dict[str, list[float]] = defaultdict(list)
    names = list(variants)
    for rep in range(s.overhead_epochs + 1):  # the first repetition is a warm-up
        for name in names[rep % 3 :] + names[: rep % 3]:  # rotate the order: no position bias
            model, opt, handle = variants[name]
            start = time.perf_counter()
            for b in batches:
                logits = forward_logits(model, b.inputs)
                loss = (handle.retain_loss(logits, b) if handle is not None
                        else checked_cross_entropy(logits, b.labels))  # fmt: skip
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            times[name].append(time.perf_counter() - start)
    for _m, _o, handle in variants.values():
        if handle is not None:
            handle.remove()
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    # Paired ratios (the epochs of one repetition ran back to back under the same load).
    paired = {k: statistics.median(a / c for a, c in zip(times[k][1:], times["ce"][1:],
                                                         strict=True))
              for k in ("miu_cache", "miu_nocache")}  # fmt: skip
    params = sum(p.numel() for p in original.parameters())
    head = [m for m in original.modules() if isinstance(m, nn.Linear)][-1]
    macs = linear_macs(original, tuple(batches[0].inputs.shape[1:]))  # type: ignore[union-attr]
    bound = flop_bound(macs, head.in_features, 4, cfg.mine_hidden)
    return dict(steps=len(batches), params=params, macs=macs, flop_bound=bound, epoch_s=med,
                ratio_cache=paired["miu_cache"], ratio_nocache=paired["miu_nocache"],
                reps=s.overhead_epochs)  # fmt: skip


def linear_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates per sample of the Linear and Conv2d layers (forward)."""
    total = 0

    def count(module: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        w = module.weight  # type: ignore[union-attr]
        spatial = out[0, 0].numel() if isinstance(module, nn.Conv2d) else 1
        total += w.numel() * spatial

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if isinstance(m, (nn.Linear, nn.Conv2d))]  # fmt: skip
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    return total


def flop_bound(model_macs: int, feature_dim: int, num_groups: int, hidden: int) -> float:
    """Arithmetic-only MIU/CE retain-step ratio: 1 + (4 critic forwards + 1 backward) / 3 model.

    A CE step is ~3 model forwards (forward + backward); MIU adds T_u and T_o on the
    joint and marginal groups (4 forwards) and T_u's backward to z (~2 forwards).
    """
    critic = (feature_dim + num_groups) * hidden + hidden
    return 1.0 + 6.0 * critic / (3.0 * model_macs)


# -- aggregation and report ------------------------------------------------------------------------
def _ms(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _pm(values: list[float], digits: int = 1) -> str:
    m, sd = _ms(values)
    return "-" if math.isnan(m) else f"{m:.{digits}f} ± {sd:.{digits}f}"


def aggregate(rows: list[dict[str, Any]]) -> dict[tuple[str, float, str], dict[str, Any]]:
    """Per (dataset, r, method): lists over seeds of every metric, gap, ToW and timing."""
    out: dict[tuple[str, float, str], dict[str, Any]] = {}
    ref_wall = {(r["dataset"], r["seed"], r["ratio"]): r["wall_s"] for r in rows
                if r["method"] == REF}  # fmt: skip
    for r in rows:
        cell = out.setdefault((r["dataset"], r["ratio"], r["method"]), defaultdict(list))
        for k in METRICS:
            cell[k].append(r["metrics"][k])
        for k in ("gap_rw", "tow_rw", "gap_rt", "tow_rt"):
            cell[k].append(r[k])
        if r["wall_s"] is not None:
            cell["wall_s"].append(r["wall_s"])
            cell["time_ratio"].append(r["wall_s"] / ref_wall[(r["dataset"], r["seed"], r["ratio"])])
        for g, acc in (r.get("per_group") or {}).items():
            cell[f"g{g}"].append(acc)
        cell["diverged"].append(bool(r.get("diverged")))
    return out


def breakdown(rows: list[dict[str, Any]]) -> list[str]:
    """Median seconds per phase of MIU's run vs Retrain+REWEIGHT (digits, all cells)."""
    miu = [r for r in rows if r["method"] == "miu" and r["dataset"] == "digits"]
    ref = [r for r in rows if r["method"] == REF and r["dataset"] == "digits"]
    if not miu or not ref:
        return []
    med = lambda xs: statistics.median(xs)  # noqa: E731
    phase = lambda r, k: sum(r["phases"].get(k, []))  # noqa: E731
    cache = med([phase(r, "caching original features") for r in miu])
    forget, retain = med([phase(r, "forget") for r in miu]), med([phase(r, "retain") for r in miu])
    tune = med([r["wall_s"] - sum(sum(v) for v in r["phases"].values()) for r in miu])
    total, ref_total = med([r["wall_s"] for r in miu]), med([r["wall_s"] for r in ref])
    ref_retain = med([phase(r, "retain") for r in ref])
    ideal = miu[0]["config"]["epochs"] / ref[0]["config"]["epochs"]
    return [
        "### Where MIU's wall time goes (digits, median over cells, seconds)", "",
        _table(["MIU total", "feature cache", "critic tuning + setup", "forget passes",
                "retain passes", "Retrain+RW total", "Retrain+RW retain passes"],
               [[f"{v:.2f}" for v in (total, cache, tune, forget, retain, ref_total,
                                       ref_retain)]]), "",
        f"With E = {miu[0]['config']['epochs']} MIU epochs against "
        f"{ref[0]['config']['epochs']} Retrain epochs over the same retain set, a run with "
        f"*zero* overhead (no tuning, no forget pass, retain step = CE step) would already "
        f"cost {ideal:.2f}× Retrain+REWEIGHT.",
    ]  # fmt: skip


def targets(agg: dict, overhead: dict[str, Any], dataset: str = "digits") -> list[list[str]]:
    """The issue's targets at r = 0.5, with the measured values and a verdict."""
    cells = {m: c for (d, r, m), c in agg.items() if d == dataset and r == 0.5}
    if "miu" not in cells:
        return []
    baselines = {m: c for m, c in cells.items()
                 if m not in ("original", REF, REF2, "miu", "miu_no_reweight")}  # fmt: skip
    best_name = min(baselines, key=lambda m: _ms(baselines[m]["gap_rw"])[0])
    miu_gap, best_gap = _ms(cells["miu"]["gap_rw"])[0], _ms(baselines[best_name]["gap_rw"])[0]
    ga_diff = _ms(cells["miu"]["GA"])[0] - _ms(cells[REF]["GA"])[0]
    # Wall time does not depend on r much: use every cell of the data set (more samples).
    t_all = [t for (d, _r, m), c in agg.items() if d == dataset and m == "miu"
             for t in c["time_ratio"]]  # fmt: skip
    t_ratio = statistics.median(t_all)
    mlp_ov = overhead["mlp"]
    ok = lambda b: "**met**" if b else "**not met**"  # noqa: E731
    return [
        ["MIU retain epoch ≤ 1.10× plain CE (cache on)", f"{mlp_ov['ratio_cache']:.2f}×",
         ok(mlp_ov["ratio_cache"] <= 1.10)],
        ["(same, conv backbone — context)", f"{overhead['conv']['ratio_cache']:.2f}×",
         ok(overhead["conv"]["ratio_cache"] <= 1.10)],
        ["Whole MIU run ≤ 0.25× Retrain+REWEIGHT",
         f"{t_ratio:.2f}× (median of {len(t_all)} runs, {min(t_all):.2f}–{max(t_all):.2f})",
         ok(t_ratio <= 0.25)],
        ["MIU Avg. Gap ≤ best baseline's (r = 0.5)",
         f"MIU {miu_gap:.2f} vs {best_name} {best_gap:.2f}", ok(miu_gap <= best_gap)],
        ["MIU GA within 2 points of Retrain+REWEIGHT (r = 0.5)", f"{ga_diff:+.2f} points",
         ok(abs(ga_diff) <= 2)],
    ]  # fmt: skip


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def notes(rows: list[dict[str, Any]], s: Settings) -> list[str]:
    """Protocol notes that a reader needs to interpret the tables."""
    res = {d: sorted({r["n_test_forget_group"] for r in rows if r["dataset"] == d})
           for d in dict.fromkeys(r["dataset"] for r in rows)}  # fmt: skip
    grain = "; ".join(f"{d}: {', '.join(str(n) for n in ns)} test samples per seed, one sample "
                      f"= {100 / min(ns):.1f} points" for d, ns in res.items())  # fmt: skip
    return [
        f"- Seeds {list(s.seeds)}: seed k fixes the data draw (noise, colours, splits), the "
        "forget split, the initial weights (shared by Original, Retrain and Retrain+RW) and "
        "every run's `MIUConfig.seed`. Forget indices per row are in `results.json`.",
        f"- GA is measured on few samples ({grain}), so differences of a few points are "
        "within noise; read the ± columns.",
        "- `neggrad` has no retain pass: REWEIGHT does not apply, so it has one row. Its "
        "gradient ascent is unbounded: where it hits a non-finite loss (†) the row shows the "
        "last finite weights, whose losses may be infinite (then no metric is defined).",
        f"- E = {s.unlearn_epochs} unlearning epochs for every method; MIU and SCRUB take "
        f"E_f = {math.ceil(s.unlearn_epochs / 2)} forget epochs (the paper's E_f / E = 5 / 10). "
        "All other settings are the library defaults (METHOD.md §4, §6), not tuned: "
        f"SCRUB {json.dumps(SCRUB_DEFAULTS)}, L1-sparse α0 = {DEFAULT_L1_ALPHA}, SalUn "
        f"ratio {DEFAULT_SALUN_RATIO}, MIU λ = 1, critics 512 wide (`MIUConfig.extra` empty).",
        "- Wall times are for one process with one torch thread on a shared machine; compare "
        "ratios within a row, not absolute seconds across runs.",
    ]  # fmt: skip


def render(rows: list[dict[str, Any]], overhead: dict[str, Any], s: Settings, meta: dict) -> str:
    agg = aggregate(rows)
    tgt = targets(agg, overhead)
    out = [
        "# Benchmark results", "",
        f"Written by `{meta['command']}` on {meta['date']} in {meta['total_s'] / 60:.1f} min "
        f"({meta['device']}; torch {meta['versions']['torch']}).",
        "Mean ± std over seeds; every metric ×100 (METHOD.md §5). Gap/ToW columns score every "
        "row against the **same** reference of its seed: Retrain+REWEIGHT (headline) and plain "
        "Retrain (METHOD.md §8.4). Time: median wall time of the `unlearn` call; ratio: median "
        "per-seed ratio to Retrain+REWEIGHT. `†k`: the run stopped with `NonFiniteLossError` "
        "in k seeds and its last finite weights are scored (metrics that are undefined for "
        "them are left out of the mean).", "",
        "## Targets (issue 6), Colored digits (quality at r = 0.5)", "",
        _table(["target", "measured", "verdict"], tgt), "",
        f"MIU meets {sum('**met**' in t[2] for i, t in enumerate(tgt) if i != 1)} of the 4 "
        "targets in this run (the conv row is context, not a target). Nothing was tuned "
        "to pass: see Notes for the settings.", "",
    ]  # fmt: skip
    ov_rows = []
    for key, label in (("mlp", "benchmark MLP"), ("conv", "conv backbone (3×16×16)")):
        o = overhead[key]
        e = o["epoch_s"]
        ov_rows.append([label, f"{o['params']:,}", f"{o['macs'] / 1e6:.2f}", str(o["steps"]),
                        *(f"{1000 * e[k] / o['steps']:.2f}" for k in ("ce", "miu_cache",
                                                                       "miu_nocache")),
                        f"{o['ratio_cache']:.2f}×", f"{o['ratio_nocache']:.2f}×",
                        f"{o['flop_bound']:.2f}×"])  # fmt: skip
    out += [
        "## MIU retain-step overhead (same process, interleaved)", "",
        f"{s.overhead_epochs} repetitions of one epoch of each variant over the same "
        f"{overhead['mlp']['steps']} REWEIGHT-sampled retain batches (batch {s.batch_size}), "
        "in rotating order; ms/step are medians, ratios are medians of the per-repetition "
        "ratios (robust to the shared machine's load). The MIU step is the engine's "
        "(`MIUHandle.retain_loss`: CE + λ·(Î_u − sg Î_o)²).", "",
        _table(["model", "params", "MMAC/sample", "steps/epoch", "CE ms/step",
                "MIU ms/step (cache)", "MIU ms/step (no cache)", "ratio (cache)",
                "ratio (no cache)", "arithmetic bound"], ov_rows), "",
        f"The arithmetic bound counts only multiply-adds: MIU's critics (hidden "
        f"{base_config(s, 0).mine_hidden}) cost as much as the benchmark MLP itself, so no "
        "engine change can bring its step near 1.10×; on a backbone that dominates the step "
        "(the conv row, as with ResNet-18 in the paper) the cached step is within the target.",
        "", *breakdown(rows), "",
    ]  # fmt: skip
    head = ["method", *METRICS, "Gap vs Retrain+RW", "ToW vs Retrain+RW", "Gap vs Retrain",
            "ToW vs Retrain", "time s", "time / Retrain+RW"]  # fmt: skip
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        for ratio in sorted({r for d, r, _ in agg if d == dataset}):
            table = []
            for method in dict.fromkeys(r["method"] for r in rows):
                c = agg.get((dataset, ratio, method))
                if c is None:
                    continue
                wall = f"{statistics.median(c['wall_s']):.2f}" if c["wall_s"] else "-"
                tr = f"{statistics.median(c['time_ratio']):.2f}" if c["time_ratio"] else "-"
                n_div = sum(c["diverged"])
                label = f"{method} †{n_div}" if n_div else method
                table.append([label, *(_pm(c[k]) for k in METRICS),
                              *(_pm(c[k], 2) for k in ("gap_rw", "tow_rw", "gap_rt", "tow_rt")),
                              wall, tr])  # fmt: skip
            n = sorted({r["n_forget"] for r in rows if r["dataset"] == dataset
                        and r["ratio"] == ratio})  # fmt: skip
            out += [f"## {dataset}, r = {ratio} (|D_f| = {', '.join(map(str, n))} per seed)", "",
                    _table(head, table), ""]  # fmt: skip
        pg = [[m, *(_pm(c[f"g{g}"]) for g in range(4))] for (d, r, m), c in agg.items()
              if d == dataset and r == 0.5]  # fmt: skip
        out += [f"### {dataset}, r = 0.5: test accuracy per group (forget group "
                f"{s.forget_group})", "",
                _table(["method", *(f"g{g} (y={g // 2}, s={g % 2})" for g in range(4))], pg),
                ""]  # fmt: skip
    setup = [f"{k}: {json.dumps(v, default=str)}" for k, v in meta["setup"].items()]
    out += ["## Notes", "", *notes(rows, s), "", "## Setup", "", "```", *setup, "```", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed, r = 0.5, few epochs (CI)")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    p.add_argument("--json", type=Path, default=None, help="raw results (default: next to --out)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--no-fashion", action="store_true", help="skip Colored Fashion-MNIST")
    p.add_argument("--ablation", action="store_true", help="add MIU without REWEIGHT")
    p.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    p.add_argument("--ratios", type=float, nargs="+", help="override r (digits)")
    p.add_argument("--from-json", type=Path, help="re-render --out from a results.json, no runs")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.from_json:
        raw = json.loads(args.from_json.read_text())
        fields = {k: tuple(v) if isinstance(v, list) else v
                  for k, v in raw["meta"]["setup"]["settings"].items()}  # fmt: skip
        args.out.write_text(render(raw["rows"], raw["overhead"], Settings(**fields), raw["meta"]))
        logger.info("re-rendered %s from %s", args.out, args.from_json)
        return 0
    logging.getLogger("miu_hooks").setLevel(logging.WARNING)  # MIA winners etc. stay in the JSON
    s = dataclasses.replace(QUICK if args.quick else Settings(), threads=args.threads)
    if args.ablation:
        s = dataclasses.replace(s, methods=(*s.methods, "miu_no_reweight"))
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
    digits = load_data("digits", 0, s)
    overhead = {"mlp": step_overhead(lambda sd: mlp(sd, s), digits, s)}
    conv_data = dataclasses.replace(s, size=16)
    overhead["conv"] = step_overhead(convnet, load_data("digits", 0, conv_data), conv_data)
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "miu_hooks": miu_hooks.__version__, "numpy": _version("numpy"),
                "scikit-learn": _version("sklearn")}  # fmt: skip
    setup = dict(settings=dataclasses.asdict(s), datasets=datasets,
                 fashion_installed=fashion_available(), versions=versions,
                 unlearn_config=base_config(s, 0).to_dict(),
                 train_config=train_config(s, 0).to_dict(),
                 methods={row: [m, ch] for row, m, ch in METHODS})  # fmt: skip
    meta = dict(command="python benchmarks/run.py" + (" --quick" if args.quick else ""),
                date=dt.datetime.now().isoformat(timespec="seconds"), versions=versions,
                device=f"CPU {_cpu_name()}, {os.cpu_count()} cores visible, "
                       f"{torch.get_num_threads()} torch thread(s)",
                total_s=time.perf_counter() - start, setup=setup)  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(rows, overhead, s, meta))
    json_path = args.json or args.out.with_name("results.json")
    json_path.write_text(json.dumps(dict(meta=meta, overhead=overhead, rows=rows),
                                    separators=(",", ":"), default=str))  # fmt: skip
    logger.info("wrote %s and %s in %.1f min", args.out, json_path, meta["total_s"] / 60)
    return 0


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
