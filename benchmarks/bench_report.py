"""Aggregation over seeds and the Markdown report (RESULTS.md)."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from typing import Any

from bench_settings import METRICS, REF, REF2, Settings, base_config

from miu_hooks import L1SparseConfig, SalUnConfig, SCRUBConfig

SCRUB_DEFAULTS = {k: v for k, v in SCRUBConfig().to_dict().items() if k.startswith("scrub_")}

OVERHEAD_MODELS = (
    ("mlp", "benchmark MLP"),
    ("conv", "conv backbone (3×16×16)"),
    ("resnet18", "ResNet-18 (3×16×16)"),
)


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


def targets(agg: dict, overhead: dict[str, Any]) -> list[list[str]]:
    """The issue's targets with the measured values and a verdict, one row per measurement."""
    ok = lambda b: "**met**" if b else "**not met**"  # noqa: E731
    out: list[list[str]] = []
    for ratio_key, limit, what in (
        ("ratio_cache", 1.10, "cache on"),
        ("ratio_nocache", 1.45, "no cache, as with augmentation"),
    ):
        for key, label in OVERHEAD_MODELS:
            if key in overhead:
                r = overhead[key][ratio_key]
                out.append([f"MIU retain epoch ≤ {limit:.2f}× plain CE, {what} — {label}",
                            f"{r:.2f}×", ok(r <= limit)])  # fmt: skip
    t_all = [t for (d, _r, m), c in agg.items() if d == "digits" and m == "miu"
             for t in c["time_ratio"]]  # fmt: skip
    if t_all:
        t = statistics.median(t_all)
        out.append(["Whole MIU run ≤ 0.25× Retrain+REWEIGHT — benchmark MLP (all digits cells)",
                    f"{t:.2f}× (median of {len(t_all)}, {min(t_all):.2f}–{max(t_all):.2f})",
                    ok(t <= 0.25)])  # fmt: skip
    whole = overhead.get("whole_run_conv")
    if whole:
        rs = whole["ratios"]["miu"]
        t = statistics.median(rs)
        out.append(["Whole MIU run ≤ 0.25× Retrain+REWEIGHT — conv backbone",
                    f"{t:.2f}× (median of {len(rs)}, {min(rs):.2f}–{max(rs):.2f})",
                    ok(t <= 0.25)])  # fmt: skip
    for dataset in ("digits", "fashion"):
        cells = {m: c for (d, r, m), c in agg.items() if d == dataset and r == 0.5}
        if "miu" not in cells:
            continue
        baselines = {m: c for m, c in cells.items()
                     if m not in ("original", REF, REF2) and not m.startswith("miu")}  # fmt: skip
        if baselines:  # a --methods run may have none
            best = min(baselines, key=lambda m: _ms(baselines[m]["gap_rw"])[0])
            miu_gap = _ms(cells["miu"]["gap_rw"])[0]
            best_gap = _ms(baselines[best]["gap_rw"])[0]
            out.append([f"MIU Avg. Gap ≤ best baseline's — {dataset}, r = 0.5",
                        f"MIU {miu_gap:.2f} vs {best} {best_gap:.2f}",
                        ok(miu_gap <= best_gap)])  # fmt: skip
        ga_diff = _ms(cells["miu"]["GA"])[0] - _ms(cells[REF]["GA"])[0]
        out.append([f"MIU GA within 2 points of Retrain+REWEIGHT — {dataset}, r = 0.5",
                    f"{ga_diff:+.2f} points", ok(abs(ga_diff) <= 2)])  # fmt: skip
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def notes(rows: list[dict[str, Any]], s: Settings) -> list[str]:
    """Protocol notes that a reader needs to interpret the tables."""
    res = {d: sorted({r["n_test_forget_group"] for r in rows if r["dataset"] == d})
           for d in dict.fromkeys(r["dataset"] for r in rows)}  # fmt: skip
    grain = "; ".join(f"{d}: {', '.join(str(n) for n in ns)} test samples per seed, one sample "
                      f"= {100 / min(ns):.1f} points" for d, ns in res.items())  # fmt: skip
    cfg = base_config(s, 0)
    return [
        f"- Data: Colored digits from scikit-learn's 1,797 images, {s.digits_copies} noisy "
        f"copies per image (all copies of an image in one split), {s.size}×{s.size} px, label "
        f"noise {s.label_noise}, colour flip {s.color_flip}; Colored Fashion-MNIST: "
        f"{s.fashion_samples} images, half of them test. Model: the MLP "
        f"{3 * s.size * s.size}-{s.hidden[0]}-{s.hidden[1]}-2.",
        f"- Original and Retrain(+REWEIGHT): {s.train_epochs} epochs (METHOD.md §1: 30), SGD "
        f"momentum 0.9, lr {s.train_lr}, cosine, batch {s.batch_size}, last epoch kept (no "
        "best-validation selection). Retrain starts from the Original's initial weights.",
        f"- Seeds {list(s.seeds)}: seed k fixes the data draw (noise, colours, splits), the "
        "forget split, the initial weights (shared by Original, Retrain and Retrain+RW) and "
        "every run's config `seed`. Forget indices per row are in `results.json`.",
        f"- GA is measured on few samples ({grain}), so differences of a few points are "
        "within noise; read the ± columns.",
        "- `neggrad` has no retain pass: REWEIGHT does not apply, so it has one row. Its "
        "gradient ascent is unbounded: where it hits a non-finite loss (†) the row shows the "
        "last finite weights, whose losses may be infinite (then no metric is defined).",
        f"- E = {s.unlearn_epochs} unlearning epochs at lr {s.unlearn_lr} for every method; MIU "
        f"and SCRUB take E_f = {math.ceil(s.unlearn_epochs / 2)} forget epochs (the paper's "
        "E_f / E = 5 / 10). All other settings are the library defaults (METHOD.md §4, §6), "
        f"not tuned: SCRUB {json.dumps(SCRUB_DEFAULTS)}, L1-sparse α0 = {L1SparseConfig.l1_alpha}, "
        f"SalUn ratio {SalUnConfig.salun_ratio}; MIU λ = {cfg.mi_weight}, critics "
        f"{cfg.mine_hidden} wide, mine_lr {cfg.mine_lr}, {cfg.mine_warmup_iters}/"
        f"{cfg.mine_iters} tuning steps, critic_init={cfg.critic_init!r}, "
        f"max_grad_norm={cfg.max_grad_norm}, clip={cfg.clip!r}.",
        *(["- Rows `miu_*` are ablations of MIU, never used for a verdict: without REWEIGHT "
           "(`miu_no_reweight`, the paper's ablate_rw), with independently initialised critics "
           "(`critic_init='independent'`, the reference's behaviour), and with λ = 10 (METHOD.md "
           "§4's CelebA/Waterbirds r = 0.5 value) with shared and independent critics; "
           "rows ending in `_clip`, where present, set `max_grad_norm=1.0` (global-norm clipping "
           "of the forget and retain updates)."]
          if any(r["method"].startswith("miu_") for r in rows) else []),
        "- Wall times are for one process with one torch thread on a shared machine; compare "
        "ratios within a row, not absolute seconds across runs.",
    ]  # fmt: skip


def whole_run_section(whole: dict[str, Any] | None) -> list[str]:
    """Whole ``unlearn`` runs on the conv backbone: seconds per seed and ratios."""
    if not whole:
        return []
    sec, ratios = whole["seconds"], whole["ratios"]
    rows = [[m, ", ".join(f"{t:.1f}" for t in sec[m]),
             f"{statistics.median(ratios[m]):.2f}×" if m in ratios else "1.00×"]
            for m in ("miu", "finetune_reweight", "retrain_reweight")]  # fmt: skip
    ep = whole["epochs"]
    return [
        "### Whole runs on the conv backbone", "",
        f"Colored digits at {whole['size']} px, |D_r| = {whole['n_retain']}, r = 0.5, "
        f"{whole['params']:,} parameters; one run per seed, order rotated per seed; MIU "
        f"{ep['miu']} epochs, Retrain+REWEIGHT {ep['retrain_reweight']} epochs (their "
        f"epoch ratio alone is {ep['miu'] / ep['retrain_reweight']:.2f}×).", "",
        _table(["method", "seconds per seed", "median ratio to Retrain+RW"], rows), "",
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
        "## Targets (issue 6)", "",
        _table(["target", "measured", "verdict"], tgt), "",
        f"{sum('**met**' in t[2] for t in tgt)} of the {len(tgt)} measurements meet their "
        "target in this run. Nothing was tuned to pass: every method runs the library "
        "defaults (see Notes).", "",
    ]  # fmt: skip
    ov_rows = []
    for key, label in OVERHEAD_MODELS:
        if key not in overhead:
            continue
        o = overhead[key]
        e = o["epoch_s"]
        ov_rows.append([label, f"{o['params']:,}", str(o.get("feature_dim", "-")),
                        f"{o['macs'] / 1e6:.2f}", f"{o['steps']} × {o.get('reps', '-')}",
                        *(f"{1000 * e[k] / o['steps']:.2f}" for k in ("ce", "miu_cache",
                                                                       "miu_nocache")),
                        f"{o['ratio_cache']:.2f}×", f"{o['ratio_nocache']:.2f}×",
                        f"{o['flop_bound']:.2f}× / "
                        f"{o.get('flop_bound_nocache', math.nan):.2f}×"])  # fmt: skip
    hidden = base_config(s, 0).mine_hidden
    out += [] if not ov_rows else [
        "## MIU retain-step overhead (same process, interleaved)", "",
        "Repetitions of one epoch of each variant (plain CE, MIU with the feature cache, MIU "
        f"without) over the same REWEIGHT-sampled retain batches (batch {s.batch_size}), in "
        "rotating order after one warm-up; ms/step are medians, ratios are medians of the "
        "per-repetition ratios (robust to the shared machine's load). The MIU step is the "
        "engine's (`MIUHandle.retain_loss`: CE + λ·(Î_u − sg Î_o)²). Weights are the seeded "
        "initialisation (cost does not depend on them). Batches are built beforehand, so "
        "data loading is in neither column; with real augmentation its cost adds to both "
        "sides and lowers the no-cache ratio.", "",
        _table(["model", "params", "d", "MMAC/sample", "steps × reps", "CE ms/step",
                "MIU ms/step (cache)", "MIU ms/step (no cache)", "ratio (cache)",
                "ratio (no cache)", "arithmetic bound (cache / no cache)"], ov_rows), "",
        f"The arithmetic bound counts only multiply-adds. A critic (hidden {hidden}) costs "
        f"(d + |G|)·{hidden} MACs per sample: about as much as the whole benchmark MLP, so "
        "its step cannot approach 1.10×, whatever the engine does; on the conv backbone and "
        "on ResNet-18 (the paper's backbone, d = 512) the critic is a small fraction of the "
        "step. With the cache, T_o's scores of the cached features are a per-epoch table "
        "lookup, so only T_u runs per step.", "",
    ]  # fmt: skip
    out += [*whole_run_section(overhead.get("whole_run_conv")), *breakdown(rows), ""]
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
