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
import json
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from bench_record import rerender, run_meta, write_record
from torch import Tensor, nn

import miu_hooks
from miu_hooks import MIUConfig, TrainConfig, unlearn
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


def _draw(rows: int, features: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    y = torch.randint(0, 2, (rows,), generator=gen)
    s = (torch.rand(rows, generator=gen) < torch.where(y == 1, 0.7, 0.3)).long()
    x = torch.randn(rows, features, generator=gen)
    x[:, 0] += 1.5 * y - 0.75
    x[:, 1] += 1.0 * s - 0.5
    return x, y, s + 2 * y


def make_task(rows: int, features: int, seed: int) -> dict[str, Any]:
    """Retain, forget and test sets of a 4-group tabular task and a briefly trained MLP 64-64."""
    gen = torch.Generator().manual_seed(seed)
    x, y, groups = _draw(rows, features, gen)
    test = _draw(5_000, features, torch.Generator().manual_seed(seed + 1))
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
    return {"retain": retain, "forget": forget, "model": model.eval(), "test": test}


@torch.no_grad()
def quality(model: nn.Module, task: dict[str, Any]) -> dict[str, float]:
    """Test accuracy (TA), forget-group test accuracy (GA) and forget accuracy (FA), in %."""
    model.eval()
    x, y, g = task["test"]
    right = model(x).argmax(-1) == y
    f = task["forget"]
    fa = (model(f.inputs).argmax(-1) == f.labels).float().mean()
    ga = right[g == 2].float().mean()
    return {"TA": 100 * float(right.float().mean()), "GA": 100 * float(ga), "FA": 100 * float(fa)}


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


def time_run(
    task: dict[str, Any], method: str, extra: dict[str, Any], seed: int
) -> tuple[float, dict[str, float]]:
    """Seconds of one whole ``unlearn`` run (the defaults, guard included), and its quality."""
    model = copy.deepcopy(task["model"])
    common = {"epochs": 5, "batch_size": 256, "seed": seed, "device": "cpu"}
    cfg: TrainConfig = (MIUConfig(forget_epochs=3, **common, **extra) if method == "miu"
                        else TrainConfig(**common))  # fmt: skip
    start = time.perf_counter()
    unlearn(model, task["retain"], task["forget"], config=cfg, method=method, num_groups=4)
    return time.perf_counter() - start, quality(model, task)


def child_times(python: str, task_name: str, rep: int) -> dict[str, Any]:
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
        scores: dict[str, list[dict[str, float]]] = defaultdict(list)
        order = list(names)
        for rep in range(reps + 1):
            k = rep % len(order)
            got: dict[str, tuple[float, dict[str, float]]] = {}
            for name in order[k:] + order[:k]:
                method, extra = names[name]
                got[name] = time_run(task, method, extra, seed=rep)
            if before_python is not None:
                got.update({f"before: {n}": (t, q) for n, (t, q) in
                            child_times(before_python, task_name, rep).items()})  # fmt: skip
            if rep:  # the first repetition warms caches and allocators up
                for name, (t, q) in got.items():
                    times[name].append(t)
                    scores[name].append(q)
            print(f"{task_name} rep {rep}: " + ", ".join(f"{n} {t:.2f}s"
                                                         for n, (t, _) in got.items()),
                  flush=True)  # fmt: skip
        out[task_name] = {"rows": rows, "features": feats, "n_retain": len(task["retain"]),
                          "n_forget": len(task["forget"]), "seconds": dict(times),
                          "quality": dict(scores)}  # fmt: skip
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
    print(f"library: {Path(miu_hooks.__file__).parent}", file=sys.stderr)


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


def quality_lines(result: dict[str, Any]) -> list[str]:
    """Median TA / GA / FA per variant, and how far the defaults moved from 'before'."""
    metrics = ("TA", "GA", "FA")
    lines = ["What the runs computed (median over repetitions, %; TA: test accuracy, GA: test "
             "accuracy of the forget group, FA: accuracy on the forget set; a timing task, "
             "not a quality benchmark):", "",
             "| variant | " + " | ".join(f"{t}: {m}" for t in result for m in metrics) + " |",
             "|---" + "|---:" * (len(result) * len(metrics)) + "|"]  # fmt: skip
    for name in next(iter(result.values()))["quality"]:
        cells = [f"{statistics.median(q[m] for q in result[t]['quality'][name]):.2f}"
                 for t in result for m in metrics]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    pairs = [("miu", "before: miu"), ("finetune_reweight", "before: finetune_reweight")]
    for now, then in pairs:
        diffs = [abs(a[m] - b[m]) for t in result
                 if then in result[t]["quality"]
                 for a, b in zip(result[t]["quality"][now], result[t]["quality"][then], strict=True)
                 for m in metrics]  # fmt: skip
        if diffs:
            lines += ["", f"`{now}` against `{then}` (same seeds): largest difference of any "
                      f"metric in any repetition {max(diffs):.3f} points."]  # fmt: skip
    return lines


NOTES = [
    "## Notes",
    "",
    "- `miu` is the library's default run. What this version does by default leaves its "
    "results as they were (docs/method.md §4, *Cost*): tensor-backed data are read one index "
    "per batch, for every method (which speeds `finetune_reweight` up as much as MIU, so the "
    "ratio does not fall with it); T_o scores cached features by a forward per retain step "
    "when that is cheaper than rebuilding its score table after every tuning phase; a tuning "
    "step of two identical critics on equal features is computed once. The metrics table "
    "checks it: the same seeds give the same TA, GA and FA as before.",
    "- The `miu ...=...` rows are opt-in settings that change what is computed "
    "(docs/method.md §4): a critic as wide as min(512, max(32, 2d)) (128 here), a warm-up "
    "that stops once the estimate settles, T_o tuned in the first phase only, and the three "
    "together. Their quality on the benchmark's Colored digits: "
    "`benchmarks/RESULTS_speed_quality.md` (`python benchmarks/run.py --methods miu "
    "miu_critic_feature miu_fast --ratios 0.5 0.9 --no-fashion --no-timing --protocols "
    "default --out benchmarks/RESULTS_speed_quality.md`), summarised in docs/method.md §4.",
    "- What is left in a default MIU run on these MLPs: the critics. Each retain step runs "
    "T_u forward and backward and T_o forward, each with a 512-wide hidden layer on "
    "64-wide features (7 to 9 times the multiply-adds of the MLP's own step), and 140 tuning steps "
    "(100 warm-up steps whatever the data size: 5 epochs' worth of rows on the 5k task) "
    "each run a critic forward and backward on a batch. Neither can shrink without changing "
    "the estimates.",
]


def render(raw: dict[str, Any]) -> str:
    """The Markdown report of a ``--json`` record."""
    result, meta = raw["result"], raw["meta"]
    table = summary(result)
    before = (f" Rows `before: ...` are the defaults of {meta['before_label']}, run in the same "
              "repetitions (a child process per repetition, right after this version's), with "
              "their ratio to that code's own `finetune_reweight`."
              if meta.get("before_label") else "")  # fmt: skip
    lines = [
        "# Speed: whole MIU runs against a REWEIGHT fine-tune",
        "",
        f"Written by `{meta['command']}` on {meta['date']} ({meta['wall_s'] / 60:.1f} min; "
        f"{meta['reps']} repetitions after one warm-up, interleaved in a rotating order; one "
        f"torch thread; {meta['machine']}, torch {meta['torch']}; the machine was shared with "
        "other jobs, so compare ratios measured side by side, not seconds across runs).",
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
    for name in ("miu", "finetune_reweight"):
        if all(f"before: {name}" in cells for cells in table.values()):
            gains = [f"{t} {table[t][f'before: {name}'][0] / table[t][name][0]:.1f}×"
                     for t in table]  # fmt: skip
            lines += ["", f"`{name}` against `before: {name}`, median seconds: "
                      + ", ".join(gains) + " faster."]  # fmt: skip
    lines += ["", "Target: a whole MIU run within 1.5× `finetune_reweight` of the same epochs.", ""]
    for t, cells in table.items():
        for name, (_sec, ratio) in cells.items():
            if "miu" in name:
                verdict = "met" if ratio <= 1.5 else "not met"
                lines.append(f"- {t}, {name}: {ratio:.2f}× ({verdict})")
    lines += ["", *quality_lines(result), "", *NOTES, "",
              "Raw seconds and metrics per repetition: the `--json` record "
              f"(`{meta['json']}`).", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (after one warm-up)")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS_speed.md")
    p.add_argument("--json", type=Path, help="raw record (default: --out with .json)")
    p.add_argument("--from-json", type=Path, help="re-render --out from a --json record, no runs")
    p.add_argument("--defaults-only", action="store_true", help="time only MIU's defaults")
    p.add_argument("--before-python", help="interpreter of another checkout, timed alongside")
    p.add_argument("--before-label", help="what --before-python runs, for the report")
    p.add_argument("--child", choices=sorted(TASKS), help=argparse.SUPPRESS)
    p.add_argument("--child-rep", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        child(args.child, args.child_rep)
        return
    if args.from_json is not None:
        rerender(args.out, args.from_json, render)
        return
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = measure(args.reps, not args.defaults_only, args.before_python)
    json_path = args.json or args.out.with_suffix(".json")
    label = args.before_label or (f"the code under `{args.before_python}`"
                                  if args.before_python else None)  # fmt: skip
    meta = run_meta("speed.py", start, json_path, reps=args.reps, before_label=label)
    write_record(args.out, json_path, {"meta": meta, "result": result}, render)


if __name__ == "__main__":
    main()
