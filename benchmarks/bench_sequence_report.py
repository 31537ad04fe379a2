"""The Markdown report of ``benchmarks/sequence.py`` (RESULTS_sequence.md)."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from typing import Any

METRICS = ("RA", "FA", "TA", "MIA", "EO", "GA")
NAMES = {
    "miu": "miu, ledger (union, original as reference)",
    "finetune_reweight": "finetune_reweight, ledger",
    "miu_alone": "miu, each request alone",
    "miu_once": "miu, one request with every id",
    "finetune_reweight_once": "finetune_reweight, one request with every id",
    "original": "original",
    "retrain_reweight": "Retrain+REWEIGHT on D_r(k) (reference)",
}
SEQUENCES = ("miu", "finetune_reweight", "miu_alone")
SETTINGS = ("seeds", "digits_samples", "digits_copies", "forget_group", "size", "label_noise",
            "color_flip", "hidden", "batch_size", "train_epochs", "train_lr", "unlearn_epochs",
            "mine_warmup_iters", "mine_iters", "threads")  # fmt: skip


def _pm(values: list[float], digits: int = 2) -> str:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return f"{statistics.fmean(vals):.{digits}f} ± {sd:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    return [*lines, *("| " + " | ".join(r) + " |" for r in rows), ""]


def _by(seeds: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    out: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for seed in seeds:
        for r in seed["records"]:
            out[(r["row"], r["request"])].append(r)
    return out


def reversal(seeds: list[dict[str, Any]], row: str, k_last: int) -> dict[str, list[float]]:
    """Per seed, mean over earlier requests j < K of the accuracy on chunk j.

    ``right_after``: after request j (for the original: its accuracy, unchanged);
    ``after_last``: after request K; ``change``: their difference (> 0: the chunk
    is recognised again, i.e. forgetting reversal).
    """
    out: dict[str, list[float]] = defaultdict(list)
    for seed in seeds:
        rec = {r["request"]: r for r in seed["records"] if r["row"] == row}
        if row == "original":  # scored once: the same model after every request
            rec = dict.fromkeys(range(1, k_last + 1), rec.get(k_last))
        if any(rec.get(k) is None for k in range(1, k_last + 1)):
            continue
        after = [rec[j]["chunk_acc"][j - 1] for j in range(1, k_last)]
        last = [rec[k_last]["chunk_acc"][j - 1] for j in range(1, k_last)]
        out["right_after"].append(statistics.fmean(after))
        out["after_last"].append(statistics.fmean(last))
        out["change"].append(statistics.fmean(b - a for a, b in zip(after, last, strict=True)))
    return out


def render(seeds: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """RESULTS_sequence.md: Gap after each request, reversal, final metrics, setup."""
    k_last = meta["requests"]
    by = _by(seeds)
    present = [row for row in NAMES if (row, k_last) in by]
    cols = [str(k) for k in range(1, k_last + 1)]
    n_forget = [s_["records"][0]["n_forget"] for s_ in seeds]
    total = [sum(len(c) for c in s_["chunks"]) for s_ in seeds]
    lines = [
        "# Repeated deletion requests (Colored digits)",
        "",
        f"Written by `{meta['command']}` on {meta['date']} in {meta['total_s'] / 60:.1f} min "
        f"({meta['device']}; torch {meta['versions']['torch']}).",
        f"The forget set of one r = 0.5 request (|D_f| = {', '.join(map(str, total))} per seed) "
        f"is cut into {k_last} requests that arrive one after another "
        f"(request 1: {', '.join(map(str, n_forget))} ids). Request k forgets the union D_f(k) "
        "of requests 1..k and keeps D_r(k) = D \\ D_f(k) (docs/method.md §12). "
        f"Mean ± std over seeds {list(meta['settings']['seeds'])}; metrics ×100.",
        "",
        "## Avg. Gap to Retrain+REWEIGHT on D_r(k), after each request k",
        "",
    ]
    rows = []
    for row in present:
        if row == "retrain_reweight":
            continue
        rows.append([NAMES[row]] + [_pm([r["gap"] for r in by.get((row, k), [])]) for k in
                                    range(1, k_last + 1)])  # fmt: skip
    lines += _table(["row", *cols], rows)
    lines += [
        "Each row is scored after request k against Retrain+REWEIGHT trained from the "
        "original's initial weights on that request's D_r(k); the one-request rows exist "
        f"only after request {k_last}, and the original (unchanged by requests) is scored "
        f"after request {k_last}. *miu, each request alone* is what `miu-unlearn` did "
        "before it kept a ledger: request k forgets only its own ids (earlier ones return to "
        "the retain set) and calibrates against the previous output.",
        "",
        "## Forgetting reversal: accuracy on the ids of request 1, after each request",
        "",
    ]
    rows = [[NAMES[row]] + [_pm([r["chunk_acc"][0] for r in
                                 by.get((row, k_last if row == "original" else k), [])], 1)
                            for k in range(1, k_last + 1)]
            for row in ("original", "retrain_reweight", *SEQUENCES) if row in present]  # fmt: skip
    lines += _table(["row", *cols], rows)
    lines += [
        f"## Accuracy on the ids of requests 1..{k_last - 1}: right after each was forgotten, "
        f"and after request {k_last}",
        "",
    ]
    rows = []
    for row in ("original", "retrain_reweight", *SEQUENCES):
        if row in present:
            rv = reversal(seeds, row, k_last)
            rows.append([NAMES[row], _pm(rv["right_after"], 1), _pm(rv["after_last"], 1),
                         _pm(rv["change"], 1)])  # fmt: skip
    lines += _table(["row", "right after its request", f"after request {k_last}", "change"],
                    rows)  # fmt: skip
    lines += [
        "Mean over the earlier requests j of the accuracy on request j's ids, per seed. A "
        "positive change means forgotten ids are recognised again as later requests are "
        "served (forgetting reversal); the original's row is its (unchanged) accuracy on "
        "those ids, Retrain+REWEIGHT's the accuracy of a model that never saw them.",
        "",
        f"## After request {k_last}: every metric",
        "",
    ]
    rows = []
    for row in present:
        recs = by[(row, k_last)]
        rows.append([NAMES[row]] + [_pm([r["metrics"][m] for r in recs], 1) for m in METRICS]
                    + [_pm([r["gap"] for r in recs]), _pm([r["tow"] for r in recs])])  # fmt: skip
    lines += _table(["row", *METRICS, "Gap vs Retrain+RW", "ToW vs Retrain+RW"], rows)
    lines += ["## Wall time (seconds per request, mean over requests and seeds)", ""]
    rows = []
    for row in present:
        walls = [r["wall_s"] for (rw, _k), recs in by.items() if rw == row for r in recs
                 if r["wall_s"] is not None]  # fmt: skip
        if walls:
            rows.append([NAMES[row], f"{statistics.fmean(walls):.2f}", str(len(walls))])
    lines += _table(["row", "s / request", "runs"], rows)
    lines += [
        "## Setup",
        "",
        "Data, model and recipe are the main benchmark's (`benchmarks/RESULTS.md`, Setup): "
        f"Colored digits, the MLP, the Original trained {meta['settings']['train_epochs']} "
        "epochs on D; every unlearning "
        "run uses the benchmark's E, E_f, learning rate and batch size and the library's "
        "defaults otherwise. Requests are a seeded shuffle of the r = 0.5 forget set cut "
        "into equal parts; a ledger sequence starts from the original and each request "
        "starts from the previous output (`miu_hooks.Ledger.split`, "
        "`unlearn(..., original=<original>)`). Chunks and ledgers per seed are in the JSON.",
        "",
        "```",
        f"settings: {json.dumps({k: meta['settings'][k] for k in SETTINGS})}",
        *(f"{row}: {json.dumps(cfg)}" for row, cfg in meta["configs"].items()),
        f"versions: {json.dumps(meta['versions'])}",
        "```",
    ]
    return "\n".join(lines).rstrip() + "\n"
