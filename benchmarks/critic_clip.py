"""Critic-gradient clipping (``MIUConfig.mine_max_grad_norm``): ResNet-18 and the benchmark MLP.

    python benchmarks/critic_clip.py           # writes benchmarks/RESULTS_critic_clip.md
    python benchmarks/critic_clip.py --quick --out /tmp/clip.md

Whole MIU runs (library defaults, the collapse guard off so that a diverging run shows
what it does) on Colored digits, half of group 2 forgotten, on ResNet-18, the conv
backbone, a tiny ViT and the benchmark MLP, with the critics' gradients clipped at the
default bound and unclipped (``mine_max_grad_norm=None``, the paper's). Per run: test
accuracy (TA) and forget-group test accuracy (GA), the largest calibration term
(Î_u − Î_o)² of an epoch, whether it stopped with ``NonFiniteLossError``, and the
critics' gradient norms over every tuning step (how often the bound binds).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from bench_models import convnet, mlp, resnet18
from bench_record import add_report_arguments, rerendered, run_meta, write_record
from bench_settings import Settings
from speed_backbones import image_task, tiny_vit
from torch import nn

from miu_hooks import MIUConfig, unlearn
from miu_hooks.engine import MIUHandle
from miu_hooks.errors import NonFiniteLossError

HERE = Path(__file__).resolve().parent
BOUND = MIUConfig().mine_max_grad_norm


def _record_norms(norms: list[float]) -> Callable[[], None]:
    """Record each critic's gradient norm at every tuning step; returns the undo."""
    inner = MIUHandle._clip_critic

    def clip(self: MIUHandle, critic: nn.Module) -> None:
        grads = [p.grad.reshape(-1) for p in critic.parameters() if p.grad is not None]
        norms.append(float(torch.cat(grads).norm()))
        inner(self, critic)

    MIUHandle._clip_critic = clip  # type: ignore[method-assign]

    def undo() -> None:
        MIUHandle._clip_critic = inner  # type: ignore[method-assign]

    return undo


def one_run(task: dict[str, Any], seed: int, bound: float | None) -> dict[str, Any]:
    """One MIU run with the critics clipped at ``bound`` (None: unclipped)."""
    cfg = task["config"]("miu", seed).replace(mine_max_grad_norm=bound)
    calibration: list[float] = []
    norms: list[float] = []

    def on_epoch_end(_epoch: int, logs: dict[str, Any], *_: Any, **__: Any) -> None:
        calibration.append(float(logs.get("miu/calibration", math.nan)))

    model = copy.deepcopy(task["model"])
    undo = _record_norms(norms)
    stopped = None
    try:
        unlearn(model, task["retain"], task["forget"], config=cfg, method="miu", num_groups=4,
                on_epoch_end=on_epoch_end)  # fmt: skip
    except NonFiniteLossError as err:
        stopped = str(err)
    finally:
        undo()
    limit = BOUND if BOUND is not None else math.inf
    return {"seed": seed, "bound": bound, "stopped": stopped, "calibration": calibration,
            "max_calibration": max(calibration, default=math.nan),
            "quality": task["quality"](model), "steps": len(norms),
            "norm_median": statistics.median(norms) if norms else math.nan,
            "norm_max": max(norms, default=math.nan),
            "above_bound": sum(n > limit for n in norms)}  # fmt: skip


def measure(seeds: list[int], s: Settings) -> dict[str, Any]:
    """Both bounds on both backbones, every seed."""
    s16 = dataclasses.replace(s, size=16, digits_copies=1)
    s32 = dataclasses.replace(s, size=32, digits_copies=1)
    builders = {
        "ResNet-18": lambda: image_task(resnet18, dataclasses.replace(s, digits_copies=1)),
        "conv backbone (16 px)": lambda: image_task(convnet, s16),
        "tiny ViT (hidden 64, 32 px)": lambda: image_task(tiny_vit, s32),
        "benchmark MLP": lambda: image_task(lambda sd: mlp(sd, s), s),
    }
    out: dict[str, Any] = {}
    for name, build in builders.items():
        task = build()
        out[name] = {"original": task["quality"](copy.deepcopy(task["model"])), "runs": []}
        for seed in seeds:
            for bound in (BOUND, None):
                got = one_run(task, seed, bound)
                out[name]["runs"].append(got)
                print(f"{name} seed {seed} bound {bound}: TA {got['quality']['TA']:.1f}, "
                      f"max calibration {got['max_calibration']:.3g}, "
                      f"stopped {bool(got['stopped'])}", flush=True)  # fmt: skip
    return out


def _fmt(x: float) -> str:
    return f"{x:.3g}" if math.isfinite(x) else str(x)


def render(raw: dict[str, Any]) -> str:
    """The Markdown report of a ``--json`` record."""
    meta, result = raw["meta"], raw["result"]
    lines = [
        "# Critic-gradient clipping",
        "",
        f"Written by `{meta['command']}` on {meta['date']} ({meta['wall_s'] / 60:.1f} min; one "
        f"torch thread; {meta['machine']}, torch {meta['torch']}).",
        "",
        "MIU with the library defaults (5 epochs, 3 forget epochs, batch 32, lr 0.01, the "
        "model clipped at 1.0) on Colored digits (8 px unless named), half of group 2 forgotten; "
        "originals "
        "trained 2 epochs; the collapse guard off, so that each run shows where it ends. "
        f"`clipped`: the critics' gradient norm clipped at {BOUND} at every tuning step (the "
        "default); `unclipped`: `mine_max_grad_norm=None` (the paper's). A run *diverged* when "
        "an epoch's calibration term (Î_u − Î_o)² exceeded 100 or the run stopped with "
        "`NonFiniteLossError`.",
        "",
    ]
    for name, cell in result.items():
        orig = cell["original"]
        lines += [f"## {name} (original: TA {orig['TA']:.1f}, GA {orig['GA']:.1f})", "",
                  "| seed | critics | TA | GA | largest calibration | stopped | tuning steps | "
                  f"median grad norm | largest grad norm | steps above {BOUND} |",
                  "|---:|---|---:|---:|---:|---|---:|---:|---:|---:|"]  # fmt: skip
        for r in cell["runs"]:
            label = "clipped" if r["bound"] is not None else "unclipped"
            lines.append(
                f"| {r['seed']} | {label} | {r['quality']['TA']:.1f} | {r['quality']['GA']:.1f} "
                f"| {_fmt(r['max_calibration'])} | {'yes' if r['stopped'] else 'no'} "
                f"| {r['steps']} | {_fmt(r['norm_median'])} | {_fmt(r['norm_max'])} "
                f"| {r['above_bound']} |"
            )
        summary = []
        for bound, label in ((BOUND, "clipped"), (None, "unclipped")):
            runs = [r for r in cell["runs"] if r["bound"] == bound]
            diverged = sum(bool(r["stopped"]) or not r["max_calibration"] <= 100 for r in runs)
            ta = statistics.median(r["quality"]["TA"] for r in runs)
            summary.append(f"{label}: {diverged} of {len(runs)} runs diverged, median TA {ta:.1f}")
        lines += ["", "; ".join(summary) + ".", ""]
    lines += [f"Raw record: `{meta['json']}`.", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--quick", action="store_true", help="two seeds on 300 images (smoke run)")
    add_report_arguments(p, HERE / "RESULTS_critic_clip.md")
    args = p.parse_args()
    json_path = args.out.with_suffix(".json")
    if rerendered(args, render):
        return
    torch.set_num_threads(1)
    s, seeds = Settings(), args.seeds
    if args.quick:
        s = dataclasses.replace(s, digits_samples=300, digits_copies=1, mine_warmup_iters=10,
                                mine_iters=2)  # fmt: skip
        seeds = seeds[:2]
    start = time.perf_counter()
    result = measure(seeds, s)
    meta = run_meta("critic_clip.py", start, json_path)
    write_record(args.out, json_path, {"meta": meta, "result": result}, render)


if __name__ == "__main__":
    main()
