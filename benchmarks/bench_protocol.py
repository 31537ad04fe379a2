"""The two protocols of the benchmark on one (data set, r): default settings, and tuned.

* **default**: every method with its library defaults (``default_config``), on every seed.
* **tuned** (docs/method.md §11): every method, MIU included, gets the same budget of at
  most ``grid_size`` configurations (``grid``); on the tuning seed's split each runs and is
  scored on the *validation* set, the configuration with the lowest Avg. Gap to
  Retrain+REWEIGHT (computed on validation) is chosen, and it then runs on every seed and
  is scored on the *test* set. The test set is never read to choose.

The Original of each seed is trained once (by the caller) and Retrain / Retrain+REWEIGHT
once per (seed, r); both protocols share them. Every ``unlearn`` call passes the validation
set to the collapse guard, whose outcome is recorded in its row.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

from bench_models import mlp
from bench_settings import (
    ABLATION_ROWS,
    METHODS,
    METRICS,
    REF,
    REF2,
    Settings,
    default_config,
    grid,
    load_data,
    train_config,
)
from bench_timing import PhaseTimer
from torch import nn

from miu_hooks import resolve_run, unlearn
from miu_hooks.demo import ColoredSplits
from miu_hooks.errors import DataError, NonFiniteLossError
from miu_hooks.evaluation import evaluate
from miu_hooks.guard import GuardOutcome
from miu_hooks.metrics import avg_gap, tow
from miu_hooks.original import load_weights
from miu_hooks.splits import forget_split, subset

logger = logging.getLogger("benchmark")
ROWS = {row: (method, changes) for row, method, changes in METHODS}


@dataclasses.dataclass
class Cell:
    """One (data set, seed, r): the split, the Original and the two retrained references."""

    dataset: str
    seed: int
    ratio: float
    data: ColoredSplits
    retain: Any
    forget: Any
    forget_idx: list[int]
    init: nn.Module
    original: nn.Module
    refs: dict[str, nn.Module] = dataclasses.field(default_factory=dict)
    ref_wall: dict[str, float] = dataclasses.field(default_factory=dict)

    def score(self, model: nn.Module, split: str = "test") -> tuple[dict[str, float], dict]:
        """Metrics of ``model``: on the test set, or on the validation set (``"val"``)."""
        heldout = self.data.test if split == "test" else self.data.val
        try:
            rep = evaluate(model, retain=self.retain, forget=self.forget, test=heldout,
                           val=self.data.val, num_groups=4, num_sensitive=2,
                           forget_groups=[2])  # fmt: skip
        except DataError as exc:  # non-finite losses: no metric is defined
            logger.warning("%s seed=%d r=%.1f cannot be evaluated: %s", self.dataset,
                           self.seed, self.ratio, exc)  # fmt: skip
            return {k: math.nan for k in METRICS}, {}
        return dict(rep), rep.per_group


def make_cell(dataset: str, seed: int, ratio: float, s: Settings, original_path: Path) -> Cell:
    """Build the split, load the Original and train Retrain and Retrain+REWEIGHT."""
    data = load_data(dataset, seed, s)
    r_idx, f_idx = forget_split(data.train, forget_groups=(s.forget_group,), ratio=ratio,
                                seed=seed)  # fmt: skip
    init = mlp(seed, s)
    cell = Cell(dataset, seed, ratio, data, subset(data.train, r_idx), subset(data.train, f_idx),
                f_idx.tolist(), init, load_weights(copy.deepcopy(init), original_path))  # fmt: skip
    for name in (REF2, REF):
        model = copy.deepcopy(init)  # Retrain starts from the Original's initial weights
        start = time.perf_counter()
        unlearn(model, cell.retain, cell.forget, config=resolve_run(name, train_config(s, seed))
                .config, method=name, num_groups=4)  # fmt: skip
        cell.refs[name], cell.ref_wall[name] = model, time.perf_counter() - start
    return cell


def run(cell: Cell, method: str, cfg: Any) -> tuple[nn.Module, dict[str, Any]]:
    """One ``unlearn`` call from a copy of the Original: the model and what to record."""
    model = copy.deepcopy(cell.original)
    timer, guard = PhaseTimer(), []
    start, diverged = time.perf_counter(), None
    try:
        unlearn(model, cell.retain, cell.forget, config=cfg, method=method, num_groups=4,
                val=cell.data.val, progress=timer,
                on_guard=lambda o: guard.append(o))  # fmt: skip
    except NonFiniteLossError as exc:  # scored as it stands (the guard's last good epoch)
        diverged = str(exc)
        logger.warning("%s seed=%d r=%.1f %s diverged: %s", cell.dataset, cell.seed,
                       cell.ratio, method, exc)  # fmt: skip
    outcome: GuardOutcome | None = guard[0] if guard else None
    return model, dict(wall_s=time.perf_counter() - start, phases=dict(timer.seconds),
                       steps=dict(timer.steps), config=cfg.to_dict(), diverged=diverged,
                       guard=outcome.to_dict() if outcome else None)  # fmt: skip


def _row(cell: Cell, method: str, protocol: str, metrics: dict[str, float], per_group: dict,
         refs: dict[str, dict[str, float]], orig_ta: float,
         **extra: Any) -> dict[str, Any]:  # fmt: skip
    return dict(method=method, protocol=protocol, dataset=cell.dataset, seed=cell.seed,
                ratio=cell.ratio, metrics=metrics, per_group=per_group,
                gap_rw=avg_gap(metrics, refs[REF]), tow_rw=tow(metrics, refs[REF]),
                gap_rt=avg_gap(metrics, refs[REF2]), tow_rt=tow(metrics, refs[REF2]),
                ta_drop=orig_ta - metrics["TA"], n_retain=len(cell.retain),
                n_forget=len(cell.forget),
                n_test_forget_group=int((cell.data.test.groups == 2).sum()),
                forget_indices=cell.forget_idx, **extra)  # fmt: skip


def _config(s: Settings, seed: int, method: str, changes: dict[str, Any]) -> Any:
    """The resolved config of ``method`` with ``changes`` to the default protocol's."""
    return resolve_run(method, default_config(s, seed, method, **changes)).config


def _gap(metrics: dict[str, float], ref: dict[str, float]) -> float:
    gap = avg_gap(metrics, ref)
    return gap if math.isfinite(gap) else math.inf


def run_unit(dataset: str, ratio: float, s: Settings, originals: dict[int, Path]) -> dict[str, Any]:
    """Both protocols on one (data set, r) for every seed: rows and the tuning record."""
    cells = {seed: make_cell(dataset, seed, ratio, s, originals[seed]) for seed in s.seeds}
    rows: list[dict[str, Any]] = []
    test_refs: dict[int, dict[str, dict[str, float]]] = {}
    orig_ta: dict[int, float] = {}
    for seed, cell in cells.items():
        models = (("original", cell.original), *cell.refs.items())
        scored = {name: cell.score(m) for name, m in models}
        test_refs[seed] = {k: v[0] for k, v in scored.items()}
        orig_ta[seed] = test_refs[seed]["original"]["TA"]
        for name, (metrics, per_group) in scored.items():
            rows.append(_row(cell, name, "reference", metrics, per_group, test_refs[seed],
                             orig_ta[seed], wall_s=cell.ref_wall.get(name),
                             config=None, diverged=None, guard=None))  # fmt: skip
    methods = [m for m in s.methods if m not in (REF, REF2)]
    if "default" in s.protocols:
        for seed, cell in cells.items():
            for row in methods:
                method, changes = ROWS[row]
                model, info = run(cell, method, _config(s, seed, method, changes))
                rows.append(_row(cell, row, "default", *cell.score(model), test_refs[seed],
                                 orig_ta[seed], **info))  # fmt: skip
                logger.info("%s r=%.1f seed=%d default %-24s %.1fs TA=%.1f GA=%.1f", dataset,
                            ratio, seed, row, info["wall_s"], rows[-1]["metrics"]["TA"],
                            rows[-1]["metrics"]["GA"])  # fmt: skip
    selection: list[dict[str, Any]] = []
    if "tuned" in s.protocols:
        tune_cell = cells[s.tune_seed]
        ref_val = tune_cell.score(tune_cell.refs[REF], "val")[0]
        for row in (m for m in methods if m not in ABLATION_ROWS):
            method, changes = ROWS[row]
            tried = []
            for change in grid(s, method):
                model, info = run(tune_cell, method, _config(s, s.tune_seed, method,
                                                             {**changes, **change}))  # fmt: skip
                val_metrics = tune_cell.score(model, "val")[0]
                tried.append((change, _gap(val_metrics, ref_val), model, info))
            best = min(range(len(tried)), key=lambda i: tried[i][1])  # first on ties
            chosen = tried[best][0]
            tried_gaps = [dict(config=c, val_gap=g) for c, g, _, _ in tried]
            selection.append(dict(dataset=dataset, ratio=ratio, method=row, chosen=chosen,
                                  grid=tried_gaps))  # fmt: skip
            for seed, cell in cells.items():
                if seed == s.tune_seed:  # the selection run itself, now scored on test
                    model, info = tried[best][2], tried[best][3]
                else:
                    model, info = run(cell, method, _config(s, seed, method,
                                                            {**changes, **chosen}))  # fmt: skip
                rows.append(_row(cell, row, "tuned", *cell.score(model), test_refs[seed],
                                 orig_ta[seed], tuned_config=chosen, **info))  # fmt: skip
            logger.info("%s r=%.1f tuned %-24s chose %s (val gap %.2f)", dataset, ratio, row,
                        chosen, tried[best][1])  # fmt: skip
    return dict(rows=rows, selection=selection)
