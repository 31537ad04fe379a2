r"""Unlearning metrics (docs/method.md §5): RA/FA/TA, MIA, EO, GA, per-group, Gap and ToW.

Every metric is a pure function of tensors, reported x100. ``preds`` may be
LongTensor[N] of classes or logits [N, C] (arg-maxed); ``labels`` and ``groups``
are LongTensor[N]. Group ids are :math:`g = s + y \cdot S`, and EO and GA read
``y = g // S``, ``s = g % S`` from them. :func:`evaluate` runs a model over the
retain, forget and test sets and gathers everything in a :class:`Report`
(both in :mod:`miu_hooks.evaluation`). scikit-learn (MIA only) is imported
inside :func:`mia_efficacy`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import numpy as np
import torch
from torch import Tensor

from miu_hooks._imports import require
from miu_hooks.errors import DataError, GroupRangeError
from miu_hooks.functional import group_counts

__all__ = [
    "GAP_METRICS", "MIAResult", "TOW_METRICS", "accuracy", "avg_gap", "equalized_odds",
    "forget_group_accuracy", "mia_efficacy", "per_group_accuracy", "tow",
    "worst_group_accuracy",
]  # fmt: skip

logger = logging.getLogger(__name__)
GAP_METRICS = ("RA", "FA", "TA", "MIA", "EO", "GA")
TOW_METRICS = ("RA", "FA", "TA")
_MIA_GRID = tuple((n, c) for n in (20, 50, 100) for c in ("gini", "entropy"))
GroupIds = Sequence[int] | Tensor


def _prep(preds: Tensor, labels: Tensor, groups: Tensor | None = None) -> list[Tensor]:
    p = torch.as_tensor(preds)
    out = [(p.argmax(-1) if p.dim() == 2 else p).reshape(-1).long().cpu()]
    out += [torch.as_tensor(t).reshape(-1).long().cpu() for t in (labels, groups) if t is not None]
    if groups is not None and out[2].numel() and int(out[2].min()) < 0:
        raise GroupRangeError(f"group ids must be >= 0; got {int(out[2].min())}")
    if any(t.shape != out[0].shape for t in out):
        raise DataError(f"preds, labels and groups differ in length: {[t.numel() for t in out]}")
    return out


def accuracy(preds: Tensor, labels: Tensor) -> float:
    """Return top-1 accuracy x100.

    Args:
        preds: LongTensor[N] of predicted classes, or logits [N, C].
        labels: LongTensor[N] of true classes.

    Raises:
        DataError: The inputs are empty or differ in length.

    Example:
        >>> accuracy(torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 0]))
        75.0
    """
    p, y = _prep(preds, labels)
    if p.numel() == 0:
        raise DataError("accuracy of an empty set is undefined: pass at least one sample")
    return 100.0 * float((p == y).double().mean())


def per_group_accuracy(
    preds: Tensor, labels: Tensor, groups: Tensor, num_groups: int
) -> dict[int, float | None]:
    """Return the accuracy x100 of every group id in ``[0, num_groups)``.

    Args:
        preds: LongTensor[N] of predicted classes, or logits [N, C].
        labels: LongTensor[N] of true classes.
        groups: LongTensor[N] of group ids.
        num_groups: Number of groups |G|.

    Returns:
        ``{group: accuracy}``, with ``None`` (JSON-safe, unlike NaN) for empty groups.

    Example:
        >>> per_group_accuracy(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]),
        ...                    torch.tensor([0, 2, 2]), 3)
        {0: 100.0, 1: None, 2: 50.0}
    """
    p, y, g = _prep(preds, labels, groups)
    counts = group_counts(g, num_groups).tolist()
    hits = torch.bincount(g, weights=(p == y).double(), minlength=num_groups).tolist()
    return {k: (100.0 * hits[k] / n if n else None) for k, n in enumerate(counts)}


def worst_group_accuracy(preds: Tensor, labels: Tensor, groups: Tensor, num_groups: int) -> float:
    """Return the lowest per-group accuracy x100, ignoring empty groups.

    Args:
        preds: LongTensor[N] of predicted classes, or logits [N, C].
        labels: LongTensor[N] of true classes.
        groups: LongTensor[N] of group ids.
        num_groups: Number of groups |G|.

    Raises:
        DataError: Every group is empty.

    Example:
        >>> worst_group_accuracy(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 0]),
        ...                      torch.tensor([0, 2, 2]), 3)
        50.0
    """
    accs = per_group_accuracy(preds, labels, groups, num_groups).values()
    present = [a for a in accs if a is not None]
    if not present:
        raise DataError("worst-group accuracy of an empty set is undefined")
    return min(present)


def _cells(
    preds: Tensor, labels: Tensor, groups: Tensor, forget_groups: GroupIds, num_sensitive: int
) -> tuple[Tensor, Tensor, Tensor, list[int], list[int]]:
    """Return correctness, t-hat = 1[y in Y_f], s-hat = 1[s in S_f], Y_f and S_f."""
    p, y, g = _prep(preds, labels, groups)
    fg = torch.as_tensor(forget_groups).reshape(-1).long()
    if num_sensitive < 1:
        raise GroupRangeError(f"num_sensitive must be >= 1; got {num_sensitive}")
    if fg.numel() == 0:
        raise DataError("forget_groups is empty: name at least one forgotten group id")
    if int(fg.min()) < 0:
        raise GroupRangeError(f"forget group ids must be >= 0; got {int(fg.min())}")
    ys, ss = torch.unique(fg // num_sensitive), torch.unique(fg % num_sensitive)
    t_hat, s_hat = torch.isin(g // num_sensitive, ys), torch.isin(g % num_sensitive, ss)
    return (p == y).double(), t_hat, s_hat, ys.tolist(), ss.tolist()


def equalized_odds(
    preds: Tensor, labels: Tensor, groups: Tensor, forget_groups: GroupIds, num_sensitive: int = 2
) -> float:
    r"""Return the equalized-odds gap x100 of docs/method.md §5, in [0, 100].

    .. math::
        \mathrm{EO} = 50 \sum_{\hat t \in \{0,1\}}
        \lvert \mathrm{Acc}(\hat t, \hat s{=}0) - \mathrm{Acc}(\hat t, \hat s{=}1) \rvert

    with :math:`\hat t = 1[y \in Y_f]`, :math:`\hat s = 1[s \in S_f]` (:math:`Y_f, S_f`:
    labels and attributes of the forget groups); Acc is the fraction of correct
    multiclass predictions in a cell.

    Args:
        preds: LongTensor[N] of predicted classes, or logits [N, C].
        labels: LongTensor[N] of true classes.
        groups: LongTensor[N] of group ids.
        forget_groups: Ids of the forgotten groups.
        num_sensitive: S, the number of sensitive-attribute values.

    Raises:
        DataError: One of the four (t, s) cells has no sample; the message names it.

    Example:
        >>> equalized_odds(torch.tensor([0, 0, 1, 0]), torch.tensor([0, 0, 1, 1]),
        ...                torch.tensor([0, 1, 2, 3]), [3])
        50.0
    """
    correct, t_hat, s_hat, ys, ss = _cells(preds, labels, groups, forget_groups, num_sensitive)
    total = 0.0
    for t in (False, True):
        acc = []
        for s in (False, True):
            cell = (t_hat == t) & (s_hat == s)
            if not bool(cell.any()):
                raise DataError(
                    f"EO cell (t={int(t)}, s={int(s)}) is empty, with t = 1[y in {ys}] and "
                    f"s = 1[s in {ss}]: the test set must cover all four cells"
                )
            acc.append(float(correct[cell].mean()))
        total += abs(acc[0] - acc[1])
    return 50.0 * total


def forget_group_accuracy(
    preds: Tensor, labels: Tensor, groups: Tensor, forget_groups: GroupIds, num_sensitive: int = 2
) -> float:
    """Return GA: accuracy x100 on samples with ``y in Y_f`` and ``s in S_f``.

    With several forget groups this is the cross product ``Y_f x S_f``, as in §5.

    Args:
        preds: LongTensor[N] of predicted classes, or logits [N, C].
        labels: LongTensor[N] of true classes.
        groups: LongTensor[N] of group ids.
        forget_groups: Ids of the forgotten groups.
        num_sensitive: S, the number of sensitive-attribute values.

    Raises:
        DataError: No sample falls in the forget group(s).

    Example:
        >>> forget_group_accuracy(torch.tensor([1, 0, 1]), torch.tensor([1, 1, 1]),
        ...                       torch.tensor([3, 3, 2]), [3])
        50.0
    """
    correct, t_hat, s_hat, ys, ss = _cells(preds, labels, groups, forget_groups, num_sensitive)
    mask = t_hat & s_hat
    if not bool(mask.any()):
        raise DataError(f"no sample with y in {ys} and s in {ss}: GA is undefined")
    return 100.0 * float(correct[mask].mean())


class MIAResult(TypedDict):
    """Result of :func:`mia_efficacy`: efficacy, AUC and the winning forest config."""

    efficacy: float
    auc: float
    n_estimators: int
    criterion: str


def _losses(values: Any, name: str) -> np.ndarray:
    arr = torch.as_tensor(values, dtype=torch.float64).detach().cpu().reshape(-1, 1).numpy()
    if arr.size == 0 or not np.isfinite(arr).all():
        raise DataError(f"MIA needs finite {name} losses; got {arr.size} with NaN/Inf or none")
    return arr


def mia_efficacy(
    retain_losses: Tensor | Sequence[float],
    val_losses: Tensor | Sequence[float],
    forget_losses: Tensor | Sequence[float],
    test_losses: Tensor | Sequence[float],
) -> MIAResult:
    """Return the loss-based membership-inference efficacy and AUC x100 (§5 MIA).

    For ``n_estimators`` in (20, 50, 100) x ``criterion`` in (gini, entropy), seed 0, a
    random forest on the loss learns retain (1) against held-out (0), unbalanced as
    in the spec. Efficacy = ``100 * (1 - mean prediction on D_f)``; AUC = ROC-AUC of
    ``predict_proba``, D_f (1) against test (0). The highest efficacy wins (first on ties).

    Args:
        retain_losses: Per-sample CE losses on D_r, shape [N_r].
        val_losses: Per-sample CE losses on the held-out set, shape [N_v].
        forget_losses: Per-sample CE losses on D_f, shape [N_f].
        test_losses: Per-sample CE losses on the test set, shape [N_t].

    Raises:
        DataError: A set is empty or has non-finite losses.

    Example:
        >>> r = mia_efficacy([0.0, 0.1], [5.0, 6.0], [0.05, 5.5], [4.0, 7.0])
        >>> r["efficacy"], r["n_estimators"], r["criterion"]
        (50.0, 20, 'gini')
    """
    x_r, x_v = _losses(retain_losses, "retain"), _losses(val_losses, "held-out")
    x_f, x_t = _losses(forget_losses, "forget"), _losses(test_losses, "test")
    ensemble = require("sklearn.ensemble", extra="metrics")
    roc_auc_score = require("sklearn.metrics", extra="metrics").roc_auc_score
    x_fit, y_fit = np.concatenate([x_r, x_v]), np.r_[np.ones(len(x_r)), np.zeros(len(x_v))]
    x_auc, y_auc = np.concatenate([x_f, x_t]), np.r_[np.ones(len(x_f)), np.zeros(len(x_t))]
    best = MIAResult(efficacy=-math.inf, auc=math.nan, n_estimators=0, criterion="")
    for n, crit in _MIA_GRID:
        forest = ensemble.RandomForestClassifier(
            n_estimators=n, criterion=crit, random_state=0, n_jobs=1
        ).fit(x_fit, y_fit)
        eff = 100.0 * (1.0 - float(forest.predict(x_f).mean()))
        if eff > best["efficacy"]:
            auc = 100.0 * float(roc_auc_score(y_auc, forest.predict_proba(x_auc)[:, 1]))
            best = MIAResult(efficacy=eff, auc=auc, n_estimators=n, criterion=crit)
    logger.info("MIA winner: %s", best)
    return best


def _gaps(report: Mapping[str, Any], ref: Mapping[str, Any], keys: Sequence[str]) -> list[float]:
    missing = [k for k in keys if k not in report or k not in ref]
    if missing:
        raise DataError(f"metrics {missing} are missing from the report or the reference")
    return [abs(float(report[k]) - float(ref[k])) for k in keys]


def avg_gap(report_metrics: Mapping[str, Any], reference_metrics: Mapping[str, Any]) -> float:
    """Return the mean of ``|m - m*|`` over RA, FA, TA, MIA, EO and GA (lower is better).

    Args:
        report_metrics: A :class:`Report` or a mapping with those keys.
        reference_metrics: The reference model's metrics (MIA is its efficacy).

    Raises:
        DataError: A metric is missing.

    Example:
        >>> m = dict(RA=90.0, FA=80.0, TA=70.0, MIA=10.0, EO=5.0, GA=60.0)
        >>> avg_gap(m, {**m, "RA": 96.0, "GA": 66.0})
        2.0
    """
    return sum(_gaps(report_metrics, reference_metrics, GAP_METRICS)) / len(GAP_METRICS)


def tow(report_metrics: Mapping[str, Any], reference_metrics: Mapping[str, Any]) -> float:
    r"""Return ToW :math:`= 100 \prod_{m \in \{RA,FA,TA\}} (1 - |m - m^*| / 100)`, higher is better.

    Args:
        report_metrics: A :class:`Report` or a mapping with RA, FA and TA.
        reference_metrics: The reference model's metrics.

    Raises:
        DataError: A metric is missing.

    Example:
        >>> tow(dict(RA=90.0, FA=80.0, TA=70.0), dict(RA=100.0, FA=80.0, TA=80.0))
        81.0
    """
    gaps = _gaps(report_metrics, reference_metrics, TOW_METRICS)
    return 100.0 * math.prod(1.0 - d / 100.0 for d in gaps)
