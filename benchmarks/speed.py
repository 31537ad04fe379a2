"""Whole-run wall time of MIU against a REWEIGHT fine-tune of the same epochs.

    python benchmarks/speed.py                 # writes benchmarks/RESULTS_speed.md
    python benchmarks/speed.py --reps 3 --out /tmp/speed.md

Two synthetic tabular tasks (Gaussian features whose mean depends on the label and
on a sensitive bit, 4 groups; an MLP 64-64; half of group 2 forgotten) are unlearned
with ``unlearn(..., config=MIUConfig(epochs=5, forget_epochs=3, batch_size=256,
seed=s))`` and with ``method="finetune_reweight"`` at the same settings. One torch
thread; the variants of a repetition run back to back in an order rotated per
repetition, and the report quotes medians and per-repetition paired ratios
(the machine may be shared: ratios measured side by side are what to compare).

Variants of MIU (each only where this version of the library has the setting):
the defaults, and the opt-in settings of docs/method.md §4 (``critic_width="feature"``,
``mine_warmup_tol``, ``tune_original="warmup"``) alone and together. Run the same
script with another checkout's interpreter to time that version's defaults
(``--label`` names the column).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from miu_hooks import MIUConfig, TrainConfig, unlearn
from miu_hooks.atomic import atomic_write_text
from miu_hooks.data import GroupTensorDataset

HERE = Path(__file__).resolve().parent
TASKS = {"5k x 20": (5_000, 20), "30k x 40": (30_000, 40)}
#: Opt-in settings measured where the library has them (name -> MIUConfig overrides).
OPT_IN: dict[str, dict[str, Any]] = {
    "miu critic_width=feature": {"critic_width": "feature"},
    "miu mine_warmup_tol=0.02": {"mine_warmup_tol": 0.02},
    "miu tune_original=warmup": {"tune_original": "warmup"},
    "miu all three": {"critic_width": "feature", "mine_warmup_tol": 0.02,
                      "tune_original": "warmup"},
}  # fmt: skip


def make_task(rows: int, features: int, seed: int) -> dict[str, Any]:
    """Retain and forget sets of a 4-group tabular task and a briefly trained MLP 64-64."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (rows,), generator=gen)
    s = (torch.rand(rows, generator=gen) < torch.where(y == 1, 0.7, 0.3)).long()
    groups = s + 2 * y
    x = torch.randn(rows, features, generator=gen)
    x[:, 0] += 1.5 * y - 0.75
    x[:, 1] += 1.0 * s - 0.5
    pool = torch.nonzero(groups == 2).reshape(-1)
    pool = pool[torch.randperm(pool.numel(), generator=gen)]
    forget_idx = pool[: pool.numel() // 2]
    keep = torch.ones(rows, dtype=torch.bool)
    keep[forget_idx] = False
    retain_idx = torch.nonzero(keep).reshape(-1)
    retain = GroupTensorDataset(x[retain_idx], y[retain_idx], groups[retain_idx])
    forget = GroupTensorDataset(x[forget_idx], y[forget_idx], groups[forget_idx])
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(features, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 2))  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for idx in torch.randperm(rows, generator=gen).split(256):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return {"retain": retain, "forget": forget, "model": model.eval()}


def _fields() -> set[str]:
    return {f.name for f in dataclasses.fields(MIUConfig)}


def variants(include_opt_in: bool) -> dict[str, tuple[str, dict[str, Any]]]:
    """Name -> (method, MIUConfig overrides) of every variant this library supports."""
    out: dict[str, tuple[str, dict[str, Any]]] = {
        "finetune_reweight": ("finetune_reweight", {}),
        "miu": ("miu", {}),
    }
    if include_opt_in:
        have = _fields()
        for name, extra in OPT_IN.items():
            if set(extra) <= have:
                out[name] = ("miu", extra)
    return out


def time_run(task: dict[str, Any], method: str, extra: dict[str, Any], seed: int) -> float:
    """Seconds of one whole ``unlearn`` run (the defaults, guard included)."""
    model = copy.deepcopy(task["model"])
    common = {"epochs": 5, "batch_size": 256, "seed": seed, "device": "cpu"}
    cfg: TrainConfig = (MIUConfig(forget_epochs=3, **common, **extra) if method == "miu"
                        else TrainConfig(**common))  # fmt: skip
    start = time.perf_counter()
    unlearn(model, task["retain"], task["forget"], config=cfg, method=method, num_groups=4)
    return time.perf_counter() - start


def child_times(python: str, task_name: str, rep: int) -> dict[str, float]:
    """Seconds of MIU's and FT+RW's defaults under another interpreter (another checkout)."""
    cmd = [python, str(Path(__file__).resolve()), "--child", task_name, "--child-rep", str(rep)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(reps: int, include_opt_in: bool, before_python: str | None = None) -> dict[str, Any]:
    """Per task: seconds per variant and repetition (one warm-up repetition dropped).

    With ``before_python``, each repetition also runs the defaults of MIU and
    FT+RW under that interpreter (variants ``before: ...``), right after this
    version's, so that both versions are timed under the same load.
    """
    out: dict[str, Any] = {}
    names = variants(include_opt_in)
    for task_name, (rows, feats) in TASKS.items():
        task = make_task(rows, feats, seed=0)
        times: dict[str, list[float]] = defaultdict(list)
        order = list(names)
        for rep in range(reps + 1):
            k = rep % len(order)
            got: dict[str, float] = {}
            for name in order[k:] + order[:k]:
                method, extra = names[name]
                got[name] = time_run(task, method, extra, seed=rep)
            if before_python is not None:
                got.update({f"before: {n}": t for n, t in
                            child_times(before_python, task_name, rep).items()})  # fmt: skip
            if rep:  # the first repetition warms caches and allocators up
                for name, t in got.items():
                    times[name].append(t)
            print(f"{task_name} rep {rep}: " + ", ".join(f"{n} {t:.2f}s" for n, t in got.items()),
                  flush=True)  # fmt: skip
        out[task_name] = {"rows": rows, "features": feats, "n_retain": len(task["retain"]),
                          "n_forget": len(task["forget"]), "seconds": dict(times)}  # fmt: skip
    return out


def child(task_name: str, rep: int) -> None:
    """Time the defaults of this interpreter's library on one task (``--child``)."""
    torch.set_num_threads(1)
    rows, feats = TASKS[task_name]
    task = make_task(rows, feats, seed=0)
    order = ["miu", "finetune_reweight"]
    got = {}
    for method in order[rep % 2 :] + order[: rep % 2]:
        got[method] = time_run(task, method, {}, seed=rep)
    print(json.dumps(got))


def summary(result: dict[str, Any]) -> dict[str, dict[str, tuple[float, float]]]:
    """Per task and variant: (median seconds, median paired ratio to FT+RW of its version)."""
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for task_name, cell in result.items():
        sec = cell["seconds"]
        table[task_name] = {}
        for name, v in sec.items():
            base = sec["before: finetune_reweight" if name.startswith("before: ")
                       else "finetune_reweight"]  # fmt: skip
            ratio = statistics.median(a / b for a, b in zip(v, base, strict=True))
            table[task_name][name] = (statistics.median(v), ratio)
    return table


def render(result: dict[str, Any], args: argparse.Namespace, wall: float) -> str:
    """The Markdown report."""
    table = summary(result)
    before = (f" Rows `before: ...` are the defaults of the code under `{args.before_python}`, "
              "run in the same repetitions (a child process per repetition), with their ratio "
              "to that code's own `finetune_reweight`." if args.before_python else "")  # fmt: skip
    lines = [
        "# Speed: whole MIU runs against a REWEIGHT fine-tune",
        "",
        f"Written by `{' '.join(['python', 'benchmarks/speed.py', *sys.argv[1:]])}` on "
        f"{datetime.date.today().isoformat()} ({wall / 60:.1f} min; {args.reps} repetitions "
        "after one warm-up, interleaved in a rotating order; one torch thread; "
        f"{platform.machine()}, torch {torch.__version__}).",
        "",
        "Every run: `unlearn(model, retain, forget, config=MIUConfig(epochs=5, forget_epochs=3, "
        "batch_size=256, seed=s), method=...)` on the CPU, library defaults otherwise (the "
        "collapse guard included, on both sides). Data: Gaussian features, label and sensitive "
        "bit shift two of them, 4 groups, half of group 2 forgotten; model: MLP 64-64, trained "
        "2 epochs. × FT+RW: the median over repetitions of the variant's time over "
        "`finetune_reweight`'s in the same repetition." + before,
        "",
    ]
    head = ["variant"] + [f"{t}: s" for t in table] + [f"{t}: × FT+RW" for t in table]
    lines += ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name in next(iter(table.values())):
        secs = [f"{table[t][name][0]:.2f}" for t in table]
        ratios = [f"{table[t][name][1]:.2f}" for t in table]
        lines.append(f"| {name} | " + " | ".join(secs + ratios) + " |")
    lines += ["", "Target: a whole MIU run within 1.5× `finetune_reweight` of the same epochs.", ""]
    for t, cells in table.items():
        for name, (_sec, ratio) in cells.items():
            if "miu" in name:
                verdict = "met" if ratio <= 1.5 else "not met"
                lines.append(f"- {t}, {name}: {ratio:.2f}× ({verdict})")
    lines += ["", "Raw seconds per repetition:", "", "```", json.dumps(result), "```", ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (after one warm-up)")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS_speed.md")
    p.add_argument("--defaults-only", action="store_true", help="time only MIU's defaults")
    p.add_argument("--before-python", help="interpreter of another checkout, timed alongside")
    p.add_argument("--child", choices=sorted(TASKS), help=argparse.SUPPRESS)
    p.add_argument("--child-rep", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        child(args.child, args.child_rep)
        return
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = measure(args.reps, not args.defaults_only, args.before_python)
    text = render(result, args, time.perf_counter() - start)
    atomic_write_text(args.out, text)
    print(text)


if __name__ == "__main__":
    main()
