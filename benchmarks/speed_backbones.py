"""Whole MIU runs on every backbone against FT+REWEIGHT and Retrain+REWEIGHT; warm-up; step cost.

    python benchmarks/speed_backbones.py        # writes benchmarks/RESULTS_speed_backbones.md
    python benchmarks/speed_backbones.py --quick --out /tmp/backbones.md

Whole runs (library defaults, the collapse guard off on every side) of ``miu`` (also with
``tune_features="fresh"``) and ``finetune_reweight`` at the same epochs, and of
``retrain_reweight``, on: the benchmark's MLP (Colored digits, 8 px, batch
32), the tabular tasks of ``benchmarks/speed.py`` (MLP 64-64, batch 256), the conv
backbone and ResNet-18 of ``bench_models``. Repetitions run the methods back to back in an
order rotated per repetition, after one warm-up repetition; the report quotes medians of
paired ratios. Every MIU run also records the seconds of each critic-tuning phase, so the
warm-up is compared with a retain epoch of the same run.

The retain-step table times one epoch of plain CE against the engine's MIU step on the same
batches (``bench_timing.step_overhead``), on the three backbones above and a tiny ViT
(hidden 64, 4 layers, 32 px, built from a transformers config).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from bench_models import convnet, mlp, resnet18, train_original
from bench_record import add_report_arguments, rerendered, run_meta, write_record
from bench_settings import Settings, default_config, load_data, train_config
from bench_timing import PhaseTimer, step_overhead
from speed import make_task, quality
from torch import nn

from miu_hooks import RetrainConfig, TrainConfig, unlearn
from miu_hooks.data import forward_logits
from miu_hooks.engine import MIUHandle
from miu_hooks.errors import NonFiniteLossError
from miu_hooks.splits import forget_split, subset

HERE = Path(__file__).resolve().parent
#: Variant -> (method, config overrides). ``miu, fresh features`` is MIU before the tuning
#: phases reused a row's features (``tune_features="fresh"``), timed in the same repetitions.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "miu": ("miu", {}),
    "miu, fresh features": ("miu", {"tune_features": "fresh"}),
    "finetune_reweight": ("finetune_reweight", {}),
    "retrain_reweight": ("retrain_reweight", {}),
}


@dataclasses.dataclass(frozen=True)
class Task:
    """One whole-run cell: how to build it and how often to run Retrain+REWEIGHT."""

    name: str
    build: Callable[[], dict[str, Any]]
    retrain_reps: int | None = None  # None: every repetition


@contextlib.contextmanager
def tune_timer() -> Iterator[list[tuple[int, float]]]:
    """Record (steps run, seconds) of every ``MIUHandle.tune`` call, in call order."""
    calls: list[tuple[int, float]] = []
    inner = MIUHandle.tune

    def timed(self: MIUHandle, *args: Any, **kwargs: Any) -> int:
        start = time.perf_counter()
        done = inner(self, *args, **kwargs)
        calls.append((done, time.perf_counter() - start))
        return done

    MIUHandle.tune = timed  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        MIUHandle.tune = inner  # type: ignore[method-assign]


def image_task(model_fn: Callable[[int], nn.Module], s: Settings) -> dict[str, Any]:
    """Colored digits (seed 0, r = 0.5 of group 2) and an original trained for 2 epochs.

    Compute does not depend on the weights, so 2 epochs suffice for timing; the
    Retrain recipe is the benchmark's (``train_epochs`` from the same initial weights).
    """
    data = load_data("digits", 0, s)
    r_idx, f_idx = forget_split(data.train, forget_groups=(s.forget_group,), ratio=0.5, seed=0)
    init = model_fn(0)
    original = train_original(copy.deepcopy(init), data.train,
                              train_config(s, 0).replace(epochs=2))  # fmt: skip
    test = data.test

    @torch.no_grad()
    def quality(model: nn.Module) -> dict[str, float]:
        model.eval()
        right = forward_logits(model, test.inputs).argmax(-1) == test.labels
        ga = right[test.groups == s.forget_group].float().mean()
        return {"TA": 100 * float(right.float().mean()), "GA": 100 * float(ga)}

    return {"retain": subset(data.train, r_idx), "forget": subset(data.train, f_idx),
            "init": init, "model": original, "quality": quality,
            "config": lambda method, seed: (train_config(s, seed) if method == "retrain_reweight"
                                            else default_config(s, seed, method, guard=False)),
            "desc": f"Colored digits {s.size} px, batch {s.batch_size}; Retrain+RW "
                    f"{s.train_epochs} epochs (the benchmark's recipe)"}  # fmt: skip


def tabular_task(rows: int, features: int) -> dict[str, Any]:
    """``benchmarks/speed.py``'s task; Retrain+REWEIGHT at the same 5 epochs from a fresh init."""
    task = make_task(rows, features, seed=0)

    def config(method: str, seed: int) -> TrainConfig:
        common = dict(epochs=5, batch_size=256, seed=seed, device="cpu", guard=False)
        if method == "retrain_reweight":
            return RetrainConfig(**common, reinit=True)  # type: ignore[arg-type]
        return default_config(Settings(unlearn_epochs=5, batch_size=256), seed, method,
                              guard=False)  # fmt: skip

    def score(model: nn.Module) -> dict[str, float]:
        got = quality(model, task)
        return {"TA": got["TA"], "GA": got["GA"]}

    return {
        **task,
        "init": task["model"],
        "config": config,
        "quality": score,
        "desc": "Gaussian tabular, MLP 64-64, batch 256; Retrain+RW 5 epochs (reinit)",
    }


def tasks(s: Settings, quick: bool) -> list[Task]:
    """The whole-run cells (smaller data with ``--quick``)."""
    s8 = s
    s16 = dataclasses.replace(s, size=16, digits_copies=1)
    sres = dataclasses.replace(s, digits_copies=1)
    s32 = dataclasses.replace(s, size=32, digits_copies=1)
    rows = (1_000, 20) if quick else (5_000, 20)
    big = (2_000, 40) if quick else (30_000, 40)
    return [
        Task("benchmark MLP", lambda: image_task(lambda sd: mlp(sd, s8), s8)),
        Task(f"MLP 64-64, {rows[0] // 1000}k x {rows[1]}", lambda: tabular_task(*rows)),
        Task(f"MLP 64-64, {big[0] // 1000}k x {big[1]}", lambda: tabular_task(*big)),
        Task("conv backbone", lambda: image_task(convnet, s16)),
        Task("tiny ViT (hidden 64, 32 px)", lambda: image_task(tiny_vit, s32), retrain_reps=1),
        Task("ResNet-18", lambda: image_task(resnet18, sres), retrain_reps=1),
    ]


def one_run(task: dict[str, Any], variant: str, seed: int) -> dict[str, Any]:
    """Seconds of one whole ``unlearn`` run, per phase, its tuning phases (MIU), its TA/GA."""
    method, extra = VARIANTS[variant]
    model = copy.deepcopy(task["init"] if method == "retrain_reweight" else task["model"])
    cfg = task["config"](method, seed).replace(**extra)
    timer = PhaseTimer()
    stopped = None
    with tune_timer() as calls:
        start = time.perf_counter()
        try:
            unlearn(model, task["retain"], task["forget"], config=cfg, method=method,
                    num_groups=4, progress=timer)  # fmt: skip
        except NonFiniteLossError as err:  # recorded, and left out of the ratios
            stopped = str(err)
        wall = time.perf_counter() - start
    return {
        "wall_s": wall,
        "phases": dict(timer.seconds),
        "tune": calls,
        "stopped": stopped,
        "epochs": cfg.epochs,
        "quality": task["quality"](model),
    }


def whole_runs(cells: list[Task], reps: int) -> dict[str, Any]:
    """Per task: the runs of every method and repetition (repetition 0 is a warm-up)."""
    out: dict[str, Any] = {}
    for cell in cells:
        task = cell.build()
        runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for rep in range(reps + 1):
            order = [m for m in VARIANTS if m != "retrain_reweight"
                     or cell.retrain_reps is None or 1 <= rep <= cell.retrain_reps]  # fmt: skip
            k = rep % len(order)
            line = []
            for method in order[k:] + order[:k]:
                got = one_run(task, method, seed=rep)
                line.append(f"{method} {got['wall_s']:.2f}s")
                if rep:
                    runs[method].append({**got, "rep": rep})
            print(f"{cell.name} rep {rep}: " + ", ".join(line), flush=True)
        out[cell.name] = {"runs": dict(runs), "desc": task["desc"],
                          "n_retain": len(task["retain"]), "n_forget": len(task["forget"]),
                          "params": sum(p.numel() for p in task["model"].parameters())}  # fmt: skip
    return out


def tiny_vit(seed: int) -> nn.Module:
    """A ViT for 32 px inputs (patch 4: 64 tokens; hidden 64, 4 layers, 4 heads), from a config."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=64,
                    num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                    num_labels=2)  # fmt: skip
    return ViTForImageClassification(cfg)


def step_table(s: Settings) -> dict[str, Any]:
    """Retain-step overhead (``bench_timing.step_overhead``) on four backbones."""
    s16 = dataclasses.replace(s, size=16, digits_copies=1)
    data16 = load_data("digits", 0, s16)
    out = {"benchmark MLP": step_overhead(lambda sd: mlp(sd, s), load_data("digits", 0, s), s)}
    s32 = dataclasses.replace(s, size=32, digits_copies=1)
    out["tiny ViT (hidden 64, 32 px)"] = step_overhead(tiny_vit, load_data("digits", 0, s32), s32)
    out["conv backbone"] = step_overhead(convnet, data16, s16)
    out["ResNet-18"] = step_overhead(resnet18, data16, s16, steps=s.resnet_overhead_steps,
                                     reps=s.resnet_overhead_epochs)  # fmt: skip
    return out


# -- report ------------------------------------------------------------------------------------
def _med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _done(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in runs if not r.get("stopped")]


def _paired(runs: dict[str, list[dict[str, Any]]], a: str, b: str) -> list[float]:
    """Ratios of ``a``'s seconds to ``b``'s within each repetition both completed."""
    by_rep = {r["rep"]: r["wall_s"] for r in _done(runs.get(b, []))}
    return [r["wall_s"] / by_rep[r["rep"]] for r in _done(runs.get(a, [])) if r["rep"] in by_rep]


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]  # fmt: skip


def warmup_stats(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Median seconds of MIU's phases, and its warm-up in retain epochs of the same run."""
    warm = [r["tune"][0][1] for r in runs if r["tune"]]
    steps = [r["tune"][0][0] for r in runs if r["tune"]]
    later = [sum(t for _n, t in r["tune"][1:]) for r in runs]
    epoch = [_med(r["phases"].get("retain", [])) for r in runs]
    forget = [sum(r["phases"].get("forget", [])) for r in runs]
    in_epochs = [w / e for w, e in zip(warm, epoch, strict=True) if e > 0]
    return {"warmup_s": _med(warm), "warmup_steps": _med(steps), "later_tune_s": _med(later),
            "retain_epoch_s": _med(epoch), "forget_s": _med(forget),
            "warmup_epochs": _med(in_epochs)}  # fmt: skip


def render(raw: dict[str, Any]) -> str:
    """The Markdown report of a ``--json`` record."""
    meta, whole, steps = raw["meta"], raw["whole"], raw["steps"]
    lines = [
        "# Speed on every backbone: whole runs, critic warm-up, retain step",
        "",
        f"Written by `{meta['command']}` on {meta['date']} ({meta['wall_s'] / 60:.1f} min; one "
        f"torch thread; {meta['machine']}, torch {meta['torch']}; {meta['reps']} repetitions "
        "after one warm-up, the methods of a repetition back to back in a rotated order; the "
        "machine may be shared, so compare the paired ratios, not seconds across runs).",
        "",
        "## Whole runs",
        "",
        "`unlearn(...)` with each method's library defaults at the task's epochs (5; MIU's "
        "forget epochs 3), the collapse guard off on every side (a guard that stops a run "
        "early would shorten what is timed; it costs both unlearning methods the same). "
        '`miu, fresh features`: MIU with `tune_features="fresh"`, a model forward for '
        "every tuning step, as before tuning phases reused a row's features. × columns: "
        "medians of the ratios within a repetition.",
        "",
    ]
    rows, verdicts, qrows, stops = [], [], [], []
    fresh = "miu, fresh features"
    for name, cell in whole.items():
        runs = cell["runs"]
        sec = {m: _med([r["wall_s"] for r in _done(runs.get(m, []))]) for m in VARIANTS}
        stops += [f"- {name}, {v}, repetition {r['rep']}: {r['stopped']}"
                  for v in VARIANTS for r in runs.get(v, []) if r.get("stopped")]  # fmt: skip
        ft = _med(_paired(runs, "miu", "finetune_reweight"))
        ft_fresh = _med(_paired(runs, fresh, "finetune_reweight"))
        gain = _med(_paired(runs, fresh, "miu"))
        rt = _med(_paired(runs, "miu", "retrain_reweight"))
        n_rt = len(runs.get("retrain_reweight", []))
        rows.append([name, f"{cell['params']:,}", str(cell["n_retain"]),
                     f"{sec['miu']:.2f}", f"{sec[fresh]:.2f}", f"{sec['finetune_reweight']:.2f}",
                     f"{sec['retrain_reweight']:.2f}" + ("" if n_rt == len(runs["miu"])
                                                         else f" ({n_rt} run)"),
                     f"{ft:.2f}×", f"{ft_fresh:.2f}×", f"{gain:.2f}×", f"{rt:.2f}×"])  # fmt: skip
        target = 1.2 if name in ("conv backbone", "ResNet-18") else 1.5
        verdicts.append(f"- {name}: {ft:.2f}× FT+RW (target ≤ {target}×: "
                        f"{'met' if ft <= target else 'not met'})")  # fmt: skip
        qrows.append([name] + [
            f"{_med([r['quality'][k] for r in _done(runs.get(v, []))]):.1f}"
            for v in VARIANTS for k in ("TA", "GA")])  # fmt: skip
    lines += _table(["task", "params", "|D_r|", "MIU s", "MIU fresh s", "FT+RW s",
                     "Retrain+RW s", "MIU × FT+RW", "MIU fresh × FT+RW", "fresh ÷ MIU",
                     "MIU × Retrain+RW"], rows)  # fmt: skip
    lines += ["", "Tasks: " + "; ".join(f"{n}: {c['desc']}" for n, c in whole.items()) + ".",
              "", "Runs that stopped with `NonFiniteLossError` (left out of the seconds and "
              "ratios): " + ("none." if not stops else ""), "", *stops, *([""] if stops else []),
              "Targets (whole MIU run against FT+RW of the same epochs):", "", *verdicts,
              "", "What the runs computed (median test accuracy TA and forget-group test "
              "accuracy GA over the repetitions, %; the originals were trained 2 epochs, "
              "enough for timing, so these are not the benchmark's numbers):", ""]  # fmt: skip
    lines += _table(["task"] + [f"{v}: {k}" for v in VARIANTS for k in ("TA", "GA")], qrows)
    lines += [
        "",
        "## Critic warm-up against a retain epoch",
        "",
        "Seconds of MIU's phases in the same runs (medians): the warm-up (first tuning "
        "phase), the later tuning phases together, the forget passes together, one "
        "retain epoch. Target: a warm-up costs at most about one retain epoch.",
        "",
    ]
    wrows = []
    for name, cell in whole.items():
        for variant in ("miu", fresh):
            w = warmup_stats(_done(cell["runs"][variant]))
            wrows.append([name, variant, f"{w['warmup_steps']:.0f}", f"{w['warmup_s']:.2f}",
                          f"{w['later_tune_s']:.2f}", f"{w['forget_s']:.2f}",
                          f"{w['retain_epoch_s']:.2f}", f"{w['warmup_epochs']:.2f}",
                          "met" if w["warmup_epochs"] <= 1.2 else "not met"])  # fmt: skip
    lines += _table(["task", "variant", "warm-up steps", "warm-up s", "later tuning s",
                     "forget s", "retain epoch s", "warm-up / epoch", "≈ 1 epoch"],
                    wrows)  # fmt: skip
    lines += [
        "",
        "## Retain step",
        "",
        "One epoch of plain CE against the engine's MIU step (`MIUHandle.retain_loss`, "
        "with and without the feature cache) over the same REWEIGHT-sampled batches of "
        "Colored digits (batch 32), interleaved; ratios are medians of the per-repetition "
        "ratios. The arithmetic bound counts the multiply-adds of Linear and Conv2d "
        "layers only (not attention's products). Target (cached): ≤ 1.10× on the tiny "
        "ViT and on ResNet-18.",
        "",
    ]
    srows = []
    for name, o in steps.items():
        srows.append([name, f"{o['params']:,}", str(o["feature_dim"]),
                      f"{o['macs'] / 1e6:.2f}", f"{o['steps']} × {o['reps']}",
                      f"{o['epoch_s']['ce'] / o['steps'] * 1e3:.2f}",
                      f"{o['epoch_s']['miu_cache'] / o['steps'] * 1e3:.2f}",
                      f"{o['ratio_cache']:.2f}×", f"{o['ratio_nocache']:.2f}×",
                      f"{o['flop_bound']:.2f}× / {o['flop_bound_nocache']:.2f}×"])  # fmt: skip
    lines += _table(["backbone", "params", "d", "MMAC/sample", "steps × reps", "CE ms/step",
                     "MIU ms/step (cache)", "ratio (cache)", "ratio (no cache)",
                     "bound (cache / no cache)"], srows)  # fmt: skip
    lines += ["", f"Raw seconds per run and phase: `{meta['json']}`.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (after one warm-up)")
    p.add_argument("--quick", action="store_true", help="small data, one repetition (a smoke run)")
    add_report_arguments(p, HERE / "RESULTS_speed_backbones.md")
    args = p.parse_args()
    json_path = args.out.with_suffix(".json")
    if rerendered(args, render):
        return
    torch.set_num_threads(1)
    s = Settings()
    reps = args.reps
    if args.quick:
        s = dataclasses.replace(
            s,
            digits_samples=300,
            digits_copies=1,
            train_epochs=2,
            overhead_epochs=1,
            overhead_steps=2,
            resnet_overhead_epochs=1,
            resnet_overhead_steps=1,
            mine_warmup_iters=10,
            mine_iters=2,
        )
        reps = 1
    start = time.perf_counter()
    whole = whole_runs(tasks(s, args.quick), reps)
    steps = step_table(s)
    meta = run_meta("speed_backbones.py", start, json_path, reps=reps)
    write_record(args.out, json_path, {"meta": meta, "whole": whole, "steps": steps}, render)


if __name__ == "__main__":
    main()
