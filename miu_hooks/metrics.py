r"""Unlearning metrics (METHOD.md §5): RA/FA/TA, MIA, EO, GA, per-group, Gap and ToW.

Every metric is a pure function of tensors, reported x100. ``preds`` may be
LongTensor[N] of classes or logits [N, C] (arg-maxed); ``labels`` and ``groups``
are LongTensor[N]. Group ids are :math:`g = s + y \cdot S`, and EO and GA read
``y = g // S``, ``s = g % S`` from them. :func:`evaluate` runs a model over the
retain, forget and test sets and gathers everything in a :class:`Report`.
scikit-learn (MIA only) is imported inside :func:`mia_efficacy`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from miu_hooks._imports import require
from miu_hooks.data import forward_logits, split_batch
from miu_hooks.errors import DataError, EmptyForgetSetError, GroupRangeError
from miu_hooks.functional import group_counts

__all__ = [
    "GAP_METRICS", "MIAResult", "Report", "TOW_METRICS", "accuracy", "avg_gap",
    "equalized_odds", "evaluate", "forget_group_accuracy", "format_table", "mia_efficacy",
    "per_group_accuracy", "per_group_table", "tow", "worst_group_accuracy",
]  # fmt: skip

logger = logging.getLogger(__name__)
GAP_METRICS = ("RA", "FA", "TA", "MIA", "EO", "GA")
TOW_METRICS = ("RA", "FA", "TA")
_SCALARS = ("RA", "FA", "TA", "MIA", "MIA_AUC", "EO", "GA", "worst_group")
_MIA_GRID = tuple((n, c) for n in (20, 50, 100) for c in ("gini", "entropy"))
_TITLES = {"MIA_AUC": "MIA AUC", "worst_group": "Worst group", "avg_gap": "Avg. Gap", "tow": "ToW"}
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
    r"""Return the equalized-odds gap x100 of METHOD.md §5, in [0, 100].

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


@dataclasses.dataclass(frozen=True)
class Report(Mapping[str, float]):
    """Metrics of one model; also a read-only mapping of its scalar metrics.

    Mapping keys: RA, FA, TA, MIA (efficacy), MIA_AUC, EO, GA, worst_group, and
    avg_gap and tow once a reference was given. Other attributes: ``per_group``
    (test accuracy per group id, ``None`` if empty), ``counts`` (``{set: {group:
    samples}}`` for retain, forget, test and val), ``forget_groups`` (used by EO
    and GA), ``num_sensitive`` and ``mia_config`` (the winning forest).
    """

    RA: float
    FA: float
    TA: float
    MIA: float
    MIA_AUC: float
    EO: float
    GA: float
    worst_group: float
    per_group: dict[int, float | None]
    counts: dict[str, dict[int, int]]
    forget_groups: tuple[int, ...]
    num_sensitive: int = 2
    mia_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    avg_gap: float | None = None
    tow: float | None = None

    def _keys(self) -> tuple[str, ...]:
        return _SCALARS + tuple(k for k in ("avg_gap", "tow") if getattr(self, k) is not None)

    def __getitem__(self, key: str) -> float:
        if key not in self._keys():
            raise KeyError(key)
        return float(getattr(self, key))

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def with_reference(self, reference: Mapping[str, Any]) -> Report:
        """Return a copy with ``avg_gap`` and ``tow`` computed against ``reference``."""
        return dataclasses.replace(self, avg_gap=avg_gap(self, reference), tow=tow(self, reference))

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (group ids become string keys)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["per_group"] = {str(k): v for k, v in self.per_group.items()}
        out["counts"] = {s: {str(k): v for k, v in c.items()} for s, c in self.counts.items()}
        out.update(forget_groups=list(self.forget_groups), mia_config=dict(self.mia_config))
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Report:
        """Rebuild a report from :meth:`to_dict` output, rejecting unknown keys by name."""
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise DataError(f"unknown Report keys: {', '.join(unknown)}")
        kw = dict(data)
        kw["per_group"] = {int(k): v for k, v in data.get("per_group", {}).items()}
        counts = data.get("counts", {}).items()
        kw["counts"] = {s: {int(k): int(v) for k, v in c.items()} for s, c in counts}
        kw["forget_groups"] = tuple(int(g) for g in data.get("forget_groups", ()))
        try:
            return cls(**kw)
        except TypeError as exc:
            raise DataError(f"incomplete Report dict: {exc}") from exc


def _run(model: nn.Module, name: str, data: Dataset, bs: int, dev: Any, keys: Any) -> list[Tensor]:
    """Return [preds, labels, groups, per-sample CE losses] of ``model`` on ``data``, on CPU."""
    parts: list[list[Tensor]] = [[], [], [], []]
    for raw in DataLoader(data, batch_size=bs, shuffle=False):
        batch = split_batch(raw, **keys).to(dev)
        logits, y = forward_logits(model, batch.inputs).float(), batch.labels
        if len(batch) and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
            raise GroupRangeError(f"{name} labels must lie in [0, {logits.shape[1]}), the logits")
        loss = F.cross_entropy(logits, y, reduction="none")
        for part, t in zip(parts, (logits.argmax(-1), y, batch.groups, loss), strict=True):
            part.append(t.cpu())
    if not parts[0]:
        raise DataError(f"the {name} set is empty")
    return [torch.cat(part) for part in parts]


def evaluate(
    model: nn.Module,
    *,
    retain: Dataset,
    forget: Dataset,
    test: Dataset,
    val: Dataset | None = None,
    reference: Mapping[str, Any] | None = None,
    num_groups: int | None = None,
    num_sensitive: int = 2,
    forget_groups: GroupIds | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    input_key: str | None = None,
    label_key: str | None = None,
    group_key: str = "group",
) -> Report:
    """Evaluate ``model`` on the retain, forget and test sets (METHOD.md §5).

    The model runs in ``eval()`` mode under ``torch.no_grad``; every module's
    training flag is restored afterwards, even on error. Pass data sets with
    test-time transforms.

    Args:
        model: The classifier; its output must carry logits [B, C].
        retain: D_r, yielding ``(inputs, label, group)`` tuples or mappings.
        forget: D_f.
        test: The test set (TA, EO, GA, per-group; MIA AUC negatives).
        val: The held-out set MIA trains against (label 0); ``None`` uses ``test``.
        reference: A reference :class:`Report` or mapping, for avg_gap and tow.
        num_groups: |G|; ``None`` takes the largest group id over all sets plus one.
        num_sensitive: S, the number of sensitive-attribute values.
        forget_groups: Forgotten group ids; ``None`` takes the groups present in D_f.
        batch_size: Evaluation batch size.
        device: Where to run; ``None`` uses the device of the model's first parameter.
        input_key: Input column of mapping items (see :func:`miu_hooks.data.split_batch`).
        label_key: Label column of mapping items.
        group_key: Group column of mapping items.

    Raises:
        EmptyForgetSetError: The forget set has no sample.
        GroupRangeError: A group id or label is out of range.
        DataError: Another set is empty, or an EO cell or the forget group has no test sample.

    Example:
        >>> ds = torch.utils.data.TensorDataset(
        ...     torch.eye(2).repeat(2, 1), torch.tensor([0, 1, 0, 1]), torch.tensor([0, 2, 1, 3]))
        >>> r = evaluate(nn.Identity(), retain=ds, forget=ds, test=ds, forget_groups=[3])
        >>> r["RA"], r["EO"], r["GA"], r.per_group
        (100.0, 0.0, 100.0, {0: 100.0, 1: 100.0, 2: 100.0, 3: 100.0})
    """
    if len(forget) == 0:  # type: ignore[arg-type]
        raise EmptyForgetSetError("the forget set is empty: nothing to evaluate unlearning on")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    keys = {"input_key": input_key, "label_key": label_key, "group_key": group_key}
    sets = {"retain": retain, "forget": forget, "test": test}
    sets.update({} if val is None else {"val": val})
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            out = {k: _run(model, k, d, batch_size, device, keys) for k, d in sets.items()}
    finally:
        for module, mode in modes.items():
            module.training = mode
    if num_groups is None:
        num_groups = max(int(o[2].max()) for o in out.values()) + 1
    counts = {k: dict(enumerate(group_counts(o[2], num_groups).tolist())) for k, o in out.items()}
    if forget_groups is None:
        forget_groups = torch.unique(out["forget"][2])
    fg = [int(g) for g in torch.as_tensor(forget_groups).reshape(-1)]
    r, f, t = out["retain"], out["forget"], out["test"]
    test_args = (t[0], t[1], t[2])
    mia = mia_efficacy(r[3], out.get("val", t)[3], f[3], t[3])
    report = Report(
        RA=accuracy(r[0], r[1]),
        FA=accuracy(f[0], f[1]),
        TA=accuracy(t[0], t[1]),
        MIA=mia["efficacy"],
        MIA_AUC=mia["auc"],
        EO=equalized_odds(*test_args, fg, num_sensitive),
        GA=forget_group_accuracy(*test_args, fg, num_sensitive),
        worst_group=worst_group_accuracy(*test_args, num_groups),
        per_group=per_group_accuracy(*test_args, num_groups),
        counts=counts,
        forget_groups=tuple(fg),
        num_sensitive=num_sensitive,
        mia_config={"n_estimators": mia["n_estimators"], "criterion": mia["criterion"]},
    )
    return report if reference is None else report.with_reference(reference)


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def format_table(
    reports: Mapping[str, Mapping[str, Any]],
    *,
    references: Mapping[str, Mapping[str, Any]] | None = None,
    digits: int = 2,
) -> str:
    """Return a markdown table with one row per method and one column per metric.

    Args:
        reports: ``{method name: Report or metric mapping}``; missing metrics show "-".
        references: ``{name: reference}``; adds "Gap vs name" and "ToW vs name" columns
            for each (§8.4: every row is scored against the same references). ``None``
            shows the reports' own avg_gap and tow when any has them.
        digits: Decimals shown.

    Example:
        >>> m = dict(RA=90.0, FA=80.0, TA=70.0, MIA=10.0, EO=5.0, GA=60.0)
        >>> print(format_table({"FT": m}, references={"Retrain": m}).splitlines()[2])
        | FT | 90.00 | 80.00 | 70.00 | 10.00 | - | 5.00 | 60.00 | - | 0.00 | 100.00 |
    """
    cols = list(_SCALARS)
    if references is None and any(r.get("avg_gap") is not None for r in reports.values()):
        cols += ["avg_gap", "tow"]
    header = ["method"] + [_TITLES.get(c, c) for c in cols]
    for name in references or {}:
        header += [f"Gap vs {name}", f"ToW vs {name}"]
    rows = []
    for method, rep in reports.items():
        row = [method] + [_fmt(rep.get(c), digits) for c in cols]
        for ref in (references or {}).values():
            row += [_fmt(avg_gap(rep, ref), digits), _fmt(tow(rep, ref), digits)]
        rows.append(row)
    return _markdown(header, rows)


def per_group_table(
    reports: Mapping[str, Report],
    group_names: Mapping[int, str] | Sequence[str] | None = None,
    *,
    digits: int = 2,
) -> str:
    """Return a markdown table of test accuracy per group, one row per method.

    Args:
        reports: ``{method name: report}``.
        group_names: Column titles by group id; default ``g<id> (y=.., s=..)``.
        digits: Decimals shown; empty groups show "-".

    Example:
        >>> rep = Report(1.0, 1.0, 1.0, 0.0, 50.0, 0.0, 1.0, 1.0, {0: 1.0, 1: None}, {}, (1,))
        >>> print(per_group_table({"FT": rep}))
        | method | g0 (y=0, s=0) | g1 (y=0, s=1) |
        |---|---:|---:|
        | FT | 1.00 | - |
    """
    ids = sorted({g for r in reports.values() for g in r.per_group})
    s = next(iter(reports.values())).num_sensitive if reports else 2
    names = dict(enumerate(group_names)) if isinstance(group_names, Sequence) else group_names
    header = ["method"] + [(names or {}).get(g, f"g{g} (y={g // s}, s={g % s})") for g in ids]
    rows = [[m] + [_fmt(r.per_group.get(g), digits) for g in ids] for m, r in reports.items()]
    return _markdown(header, rows)
