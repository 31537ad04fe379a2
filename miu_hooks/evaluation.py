r"""Evaluation of a model: :func:`evaluate` -> :class:`Report`, and Markdown tables.

:func:`evaluate` runs a model over the retain, forget, test and validation sets
and computes every metric of :mod:`miu_hooks.metrics` (docs/method.md §5) from the
predictions and per-sample losses; :func:`predict` is that loop for one data
set. :func:`format_table` and :func:`per_group_table` print reports side by
side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from miu_hooks.batched import batched_loader_args
from miu_hooks.data import forward_logits, split_batch
from miu_hooks.errors import ConfigTypeError, DataError, EmptyForgetSetError, GroupRangeError
from miu_hooks.functional import group_counts
from miu_hooks.loader_options import loader_options
from miu_hooks.metrics import (
    GroupIds,
    accuracy,
    avg_gap,
    equalized_odds,
    forget_group_accuracy,
    mia_efficacy,
    per_group_accuracy,
    tow,
    worst_group_accuracy,
)

__all__ = ["Predictions", "Report", "evaluate", "format_table", "per_group_table", "predict"]

logger = logging.getLogger(__name__)

_SCALARS = ("RA", "FA", "TA", "MIA", "MIA_AUC", "EO", "GA", "worst_group")
_TITLES = {"MIA_AUC": "MIA AUC", "worst_group": "Worst group", "avg_gap": "Avg. Gap", "tow": "ToW"}


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


class Predictions(NamedTuple):
    """Per-sample outputs of a model on one data set, on CPU (see :func:`predict`).

    Attributes:
        preds: LongTensor[N], the arg-max class.
        labels: LongTensor[N].
        groups: LongTensor[N].
        losses: FloatTensor[N], per-sample cross-entropy.
    """

    preds: Tensor
    labels: Tensor
    groups: Tensor
    losses: Tensor


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Run the block with ``model`` in eval mode under ``no_grad``; restore every training flag."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes.items():
            module.training = mode


def predict(
    model: nn.Module,
    data: Dataset,
    *,
    name: str = "data",
    batch_size: int = 256,
    device: torch.device | str | None = None,
    input_key: str | None = None,
    label_key: str | None = None,
    group_key: str = "group",
    num_workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> Predictions:
    """Run ``model`` over ``data`` in order and return its per-sample :class:`Predictions`.

    The same loop :func:`evaluate` runs for each set: ``eval()`` mode under
    ``torch.no_grad``, every module's training flag restored afterwards.

    Args:
        model: The classifier; its output must carry logits [B, C].
        data: Yields ``(inputs, label, group)`` tuples or mappings.
        name: The set's name in error messages.
        batch_size: Evaluation batch size.
        device: Where to run; ``None`` uses the device of the model's first parameter.
        input_key: Input column of mapping items (see :func:`miu_hooks.data.split_batch`).
        label_key: Label column of mapping items.
        group_key: Group column of mapping items.
        num_workers: DataLoader worker processes (batches are pinned for CUDA).
        collate_fn: How to batch items (``None``: ``default_collate``), e.g. a
            ``DataCollatorWithPadding`` for tokenized text of varying length.

    Raises:
        GroupRangeError: A label is outside the logits' classes.
        DataError: ``data`` is empty.

    Example:
        >>> ds = torch.utils.data.TensorDataset(
        ...     torch.eye(2), torch.tensor([0, 0]), torch.tensor([0, 3]))
        >>> p = predict(nn.Identity(), ds)
        >>> p.preds.tolist(), p.labels.tolist(), p.groups.tolist()
        ([0, 1], [0, 0], [0, 3])
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    keys = {"input_key": input_key, "label_key": label_key, "group_key": group_key}
    with inference(model):
        return _run(model, name, data, batch_size, device, keys, num_workers, collate_fn)


def _run(
    model: nn.Module,
    name: str,
    data: Dataset,
    bs: int,
    dev: Any,
    keys: Any,
    workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> Predictions:
    """Return the :class:`Predictions` of ``model`` on ``data`` (model already in inference).

    Results stay on the device until the end: one label-range read and one copy
    to the host per set, not per batch.
    """
    parts: list[list[Tensor]] = [[], [], [], []]
    in_range: list[Tensor] = []
    num_classes = 0
    options = {**loader_options(data, dev, workers), "collate_fn": collate_fn}
    data, options = batched_loader_args(data, options)  # a given collate_fn is kept
    loader = DataLoader(data, batch_size=bs, shuffle=False, **options)
    for raw in loader:
        batch = split_batch(raw, **keys).to(dev)
        logits, y = forward_logits(model, batch.inputs).float(), batch.labels
        num_classes = int(logits.shape[1])
        in_range.append(((y >= 0) & (y < num_classes)).all())
        loss = F.cross_entropy(logits, y.clamp(0, num_classes - 1), reduction="none")
        for part, t in zip(parts, (logits.argmax(-1), y, batch.groups, loss), strict=True):
            part.append(t)
    if not parts[0]:
        raise DataError(f"the {name} set is empty")
    if not bool(torch.stack(in_range).all()):
        raise GroupRangeError(f"{name} labels must lie in [0, {num_classes}), the logits")
    return Predictions(*(torch.cat(part).cpu() for part in parts))


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
    num_workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> Report:
    """Evaluate ``model`` on the retain, forget and test sets (docs/method.md §5).

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
        num_workers: DataLoader worker processes (batches are pinned for CUDA).
        collate_fn: How to batch items (``None``: ``default_collate``), e.g. a
            ``DataCollatorWithPadding`` for tokenized text of varying length.

    Raises:
        ConfigTypeError: ``reference`` is not a Report or mapping (e.g. a model).
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
    if reference is not None and not isinstance(reference, Mapping):
        raise ConfigTypeError(
            f"reference must be the Report of a reference model (e.g. reference=evaluate("
            f"retrained, ...)), not a {type(reference).__name__}: evaluate that model first"
        )
    if len(forget) == 0:  # type: ignore[arg-type]
        raise EmptyForgetSetError("the forget set is empty: nothing to evaluate unlearning on")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    keys = {"input_key": input_key, "label_key": label_key, "group_key": group_key}
    sets = {"retain": retain, "forget": forget, "test": test}
    sets.update({} if val is None else {"val": val})
    with inference(model):
        out = {
            k: _run(model, k, d, batch_size, device, keys, num_workers, collate_fn)
            for k, d in sets.items()
        }
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
