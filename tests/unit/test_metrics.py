"""Metrics checked against naive loops, hand-computed values and direct scikit-learn calls."""

from __future__ import annotations

import ast
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from miu_hooks import evaluation, metrics
from miu_hooks.errors import DataError, EmptyForgetSetError, GroupRangeError
from miu_hooks.evaluation import Report, evaluate, format_table, per_group_table
from miu_hooks.metrics import (
    accuracy,
    avg_gap,
    equalized_odds,
    forget_group_accuracy,
    mia_efficacy,
    per_group_accuracy,
    tow,
    worst_group_accuracy,
)

pytestmark = pytest.mark.unit


def _random_case(seed: int, n: int, num_classes: int, num_sensitive: int):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (n,), generator=gen)
    sens = torch.randint(num_sensitive, (n,), generator=gen)
    groups = sens + labels * num_sensitive
    # Predictions right about 70% of the time, otherwise a random class.
    noise = torch.randint(num_classes, (n,), generator=gen)
    preds = torch.where(torch.rand(n, generator=gen) < 0.7, labels, noise)
    return preds, labels, groups


# --- accuracy, per-group and worst-group against naive counting -------------------------------


def test_accuracy_matches_counting_and_accepts_logits() -> None:
    preds, labels, _ = _random_case(0, 101, 3, 2)
    pairs = zip(preds.tolist(), labels.tolist(), strict=True)
    naive = 100.0 * sum(int(p == y) for p, y in pairs) / 101
    assert accuracy(preds, labels) == pytest.approx(naive)
    logits = F.one_hot(preds, 3).float() * 5.0
    assert accuracy(logits, labels) == pytest.approx(naive)
    with pytest.raises(DataError, match="empty"):
        accuracy(torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long))
    with pytest.raises(DataError, match="differ in length"):
        accuracy(torch.tensor([0, 1]), torch.tensor([0]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_group_and_worst_group_match_naive_counting(seed: int) -> None:
    preds, labels, groups = _random_case(seed, 200, 3, 2)
    groups[groups == 4] = 5  # leave group 4 empty
    num_groups = 7  # group 6 is empty too
    hits: dict[int, int] = {}
    seen: dict[int, int] = {}
    for p, y, g in zip(preds.tolist(), labels.tolist(), groups.tolist(), strict=True):
        seen[g] = seen.get(g, 0) + 1
        hits[g] = hits.get(g, 0) + int(p == y)
    expected = {g: (100.0 * hits[g] / seen[g] if g in seen else None) for g in range(num_groups)}
    got = per_group_accuracy(preds, labels, groups, num_groups)
    assert list(got) == list(range(num_groups))
    assert got[4] is None and got[6] is None
    for g in range(num_groups):
        assert got[g] == pytest.approx(expected[g])
    worst = min(v for v in expected.values() if v is not None)
    assert worst_group_accuracy(preds, labels, groups, num_groups) == pytest.approx(worst)


def test_per_group_rejects_out_of_range_groups() -> None:
    with pytest.raises(GroupRangeError):
        per_group_accuracy(torch.tensor([0]), torch.tensor([0]), torch.tensor([4]), 4)
    with pytest.raises(GroupRangeError):
        per_group_accuracy(torch.tensor([0]), torch.tensor([0]), torch.tensor([-1]), 4)


# --- EO and GA against an explicit per-cell loop ----------------------------------------------


def _naive_eo_ga(preds, labels, groups, forget_groups, num_sensitive):
    y_f = {g // num_sensitive for g in forget_groups}
    s_f = {g % num_sensitive for g in forget_groups}
    cells: dict[tuple[int, int], list[int]] = {(t, s): [] for t in (0, 1) for s in (0, 1)}
    ga: list[int] = []
    for p, y, g in zip(preds.tolist(), labels.tolist(), groups.tolist(), strict=True):
        t_hat, s_hat = int(g // num_sensitive in y_f), int(g % num_sensitive in s_f)
        cells[(t_hat, s_hat)].append(int(p == y))
        if t_hat and s_hat:
            ga.append(int(p == y))
    acc = {k: sum(v) / len(v) for k, v in cells.items()}
    eo = 50.0 * (abs(acc[(0, 0)] - acc[(0, 1)]) + abs(acc[(1, 0)] - acc[(1, 1)]))
    return eo, 100.0 * sum(ga) / len(ga)


@pytest.mark.parametrize(
    ("seed", "num_classes", "num_sensitive", "forget_groups"),
    [(0, 2, 2, [3]), (1, 2, 2, [2]), (2, 9, 7, [18]), (3, 5, 3, [4, 8, 13]), (4, 3, 2, [1, 5])],
)
def test_eo_and_ga_match_per_cell_loop(seed, num_classes, num_sensitive, forget_groups) -> None:
    preds, labels, groups = _random_case(seed, 3000, num_classes, num_sensitive)
    eo_ref, ga_ref = _naive_eo_ga(preds, labels, groups, forget_groups, num_sensitive)
    eo = equalized_odds(preds, labels, groups, forget_groups, num_sensitive)
    ga = forget_group_accuracy(preds, labels, groups, forget_groups, num_sensitive)
    assert eo == pytest.approx(eo_ref)
    assert ga == pytest.approx(ga_ref)
    assert 0.0 <= eo <= 100.0


def test_eo_scale_extremes() -> None:
    # Perfect on s-hat = 0, always wrong on s-hat = 1, in both t-hat rows: EO = 100.
    groups = torch.tensor([0, 1, 2, 3])
    labels = groups // 2
    preds = torch.tensor([0, 1, 1, 0])
    assert equalized_odds(preds, labels, groups, [3]) == pytest.approx(100.0)
    assert equalized_odds(labels, labels, groups, [3]) == 0.0


def test_eo_empty_cell_names_the_cell() -> None:
    groups = torch.tensor([0, 1, 3, 3])  # no (t=1, s=0) sample: group 2 missing
    labels = groups // 2
    with pytest.raises(DataError, match=r"t=1, s=0"):
        equalized_odds(labels, labels, groups, [3])
    with pytest.raises(DataError, match="GA"):
        forget_group_accuracy(labels, labels, torch.tensor([0, 1, 2, 2]), [3])
    with pytest.raises(DataError, match="forget_groups is empty"):
        equalized_odds(labels, labels, groups, [])


# --- MIA against a direct scikit-learn call ---------------------------------------------------


def test_mia_matches_direct_sklearn_random_forest() -> None:
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    retain = rng.exponential(0.3, 120)
    val = rng.exponential(1.0, 80)
    forget = rng.exponential(0.6, 40)
    test = rng.exponential(1.0, 60)

    x = np.concatenate([retain, val]).reshape(-1, 1)
    y = np.r_[np.ones(len(retain)), np.zeros(len(val))]
    x_auc = np.concatenate([forget, test]).reshape(-1, 1)
    y_auc = np.r_[np.ones(len(forget)), np.zeros(len(test))]
    best = None
    for n in (20, 50, 100):
        for crit in ("gini", "entropy"):
            rf = RandomForestClassifier(n_estimators=n, criterion=crit, random_state=0)
            rf.fit(x, y)
            eff = 100.0 * (1.0 - rf.predict(forget.reshape(-1, 1)).mean())
            auc = 100.0 * roc_auc_score(y_auc, rf.predict_proba(x_auc)[:, 1])
            if best is None or eff > best[0]:
                best = (eff, auc, n, crit)

    got = mia_efficacy(torch.tensor(retain), torch.tensor(val), forget.tolist(), test)
    assert got["efficacy"] == pytest.approx(best[0])
    assert got["auc"] == pytest.approx(best[1])
    assert (got["n_estimators"], got["criterion"]) == (best[2], best[3])


def test_mia_rejects_empty_or_non_finite_losses() -> None:
    with pytest.raises(DataError, match="forget"):
        mia_efficacy([0.1], [1.0], [], [1.0])
    with pytest.raises(DataError, match="retain"):
        mia_efficacy([0.1, math.inf], [1.0], [0.2], [1.0])


# --- Gap and ToW against hand-computed values -------------------------------------------------


def test_avg_gap_and_tow_hand_computed() -> None:
    ref = {"RA": 95.0, "FA": 60.0, "TA": 80.0, "MIA": 30.0, "EO": 10.0, "GA": 50.0}
    rep = {"RA": 99.0, "FA": 70.0, "TA": 78.0, "MIA": 24.0, "EO": 13.0, "GA": 40.0, "x": 1.0}
    # |4| + |10| + |2| + |6| + |3| + |10| = 35 over 6 metrics.
    assert avg_gap(rep, ref) == pytest.approx(35.0 / 6.0)
    # 100 * 0.96 * 0.90 * 0.98
    assert tow(rep, ref) == pytest.approx(84.672)
    assert avg_gap(ref, ref) == 0.0 and tow(ref, ref) == 100.0
    with pytest.raises(DataError, match="EO"):
        avg_gap({k: v for k, v in rep.items() if k != "EO"}, ref)


# --- evaluate() on a hand-built case ----------------------------------------------------------


class FixedLogits(nn.Module):
    """Returns its input as logits; records the mode and grad state it was called in."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.inner = nn.Dropout(0.5)
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled()))
        return x * self.scale


def _logits(preds: list[int], num_classes: int = 2) -> torch.Tensor:
    # Confident but not one-hot, so CE losses differ between right and wrong predictions.
    return F.one_hot(torch.tensor(preds), num_classes).float() * 3.0


# Groups g = s + 2y. Forget group 3 = (y=1, s=1).
RETAIN = ([0, 1, 2, 3, 0, 1, 2, 3], [0, 0, 1, 1, 0, 0, 1, 1], [0, 0, 1, 1, 0, 1, 1, 1])
FORGET = ([3, 3, 3, 3], [1, 1, 1, 1], [1, 1, 0, 1])
TEST = ([0, 0, 1, 1, 2, 2, 3, 3], [0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 0])
REFERENCE = {"RA": 90.0, "FA": 50.0, "TA": 80.0, "MIA": 0.0, "EO": 40.0, "GA": 60.0}


def _tensor_set(groups, labels, preds) -> TensorDataset:
    return TensorDataset(_logits(preds), torch.tensor(labels), torch.tensor(groups))


class DictSet(Dataset):
    def __init__(self, groups, labels, preds) -> None:
        self.x, self.y, self.g = _logits(preds), torch.tensor(labels), torch.tensor(groups)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"img": self.x[i], "target": self.y[i], "grp": self.g[i]}


MIA_STUB = {"efficacy": 12.5, "auc": 60.0, "n_estimators": 50, "criterion": "entropy"}


def _spy(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []

    def spy(*losses):
        calls.append(losses)
        return dict(MIA_STUB)

    monkeypatch.setattr(evaluation, "mia_efficacy", spy)
    return calls


@pytest.fixture(scope="module")
def hand_case() -> tuple[FixedLogits, Report, list]:
    """evaluate() with mia_efficacy replaced by a spy (MIA itself is checked against sklearn)."""
    model = FixedLogits()
    model.train()
    model.inner.eval()  # a submodule in a different mode than its parent
    with pytest.MonkeyPatch.context() as mp:
        calls = _spy(mp)
        report = evaluate(
            model,
            retain=_tensor_set(*RETAIN),
            forget=_tensor_set(*FORGET),
            test=_tensor_set(*TEST),
            reference=REFERENCE,
            batch_size=3,
        )
    return model, report, calls


def test_evaluate_hand_built_case(hand_case) -> None:
    _, report, calls = hand_case
    assert report.RA == pytest.approx(87.5)  # 7 of 8 (sample 5 predicted 1 for label 0)
    assert report.FA == pytest.approx(75.0)  # 3 of 4
    assert report.TA == pytest.approx(75.0)  # 6 of 8
    assert report.GA == pytest.approx(50.0)  # group 3: 1 of 2
    # t=0: |Acc(g0)=1.0 - Acc(g1)=0.5|, t=1: |Acc(g2)=1.0 - Acc(g3)=0.5| -> 50 * 1.0
    assert report.EO == pytest.approx(50.0)
    assert report.per_group == {0: 100.0, 1: 50.0, 2: 100.0, 3: 50.0}
    assert report.worst_group == pytest.approx(50.0)
    assert report.forget_groups == (3,)
    assert report.counts == {
        "retain": {0: 2, 1: 2, 2: 2, 3: 2},
        "forget": {0: 0, 1: 0, 2: 0, 3: 4},
        "test": {0: 2, 1: 2, 2: 2, 3: 2},
    }
    # MIA gets per-sample CE losses (retain, held-out, forget, test); val=None -> test.
    retain, forget, test = (
        F.cross_entropy(_logits(p), torch.tensor(y), reduction="none")
        for _, y, p in (RETAIN, FORGET, TEST)
    )
    (got,) = calls
    for seen, expected in zip(got, (retain, test, forget, test), strict=True):
        assert torch.allclose(seen, expected)
    assert (report.MIA, report.MIA_AUC) == (12.5, 60.0)
    assert report.mia_config == {"n_estimators": 50, "criterion": "entropy"}
    # Gap/ToW against the reference, by hand: |87.5-90|, |75-50|, |75-80|, |12.5-0|, 10, 10.
    assert report.avg_gap == pytest.approx((2.5 + 25.0 + 5.0 + 12.5 + 10.0 + 10.0) / 6)
    assert report.tow == pytest.approx(100 * 0.975 * 0.75 * 0.95)


def test_evaluate_restores_modes_and_runs_in_eval_no_grad(hand_case) -> None:
    model, _, _ = hand_case
    assert model.calls and all(call == (False, False) for call in model.calls)
    assert model.training is True and model.inner.training is False


def test_evaluate_restores_modes_on_error() -> None:
    model = FixedLogits().train()
    bad = TensorDataset(_logits([0, 1]), torch.tensor([0, 5]), torch.tensor([0, 1]))
    with pytest.raises(GroupRangeError, match="forget labels"):
        evaluate(model, retain=_tensor_set(*RETAIN), forget=bad, test=_tensor_set(*TEST))
    assert model.training and model.inner.training


def test_evaluate_mapping_items_with_val_and_explicit_groups(monkeypatch) -> None:
    calls = _spy(monkeypatch)
    model = FixedLogits()
    report = evaluate(
        model,
        retain=DictSet(*RETAIN),
        forget=DictSet(*FORGET),
        test=DictSet(*TEST),
        val=DictSet(*FORGET),
        num_groups=6,
        forget_groups=[3],
        input_key="img",
        label_key="target",
        group_key="grp",
    )
    assert (report.RA, report.FA, report.TA, report.GA, report.EO) == (87.5, 75.0, 75.0, 50.0, 50.0)
    assert report.per_group[4] is None and report.per_group[5] is None
    assert set(report.counts) == {"retain", "forget", "test", "val"}
    assert report.avg_gap is None and "avg_gap" not in report
    (losses,) = calls  # the held-out slot gets the val losses, which equal the forget ones
    assert torch.equal(losses[1], losses[2])
    assert losses[1].shape == (4,) and losses[3].shape == (8,)


def test_evaluate_empty_forget_set() -> None:
    empty = TensorDataset(torch.zeros(0, 2), torch.zeros(0).long(), torch.zeros(0).long())
    with pytest.raises(EmptyForgetSetError):
        evaluate(FixedLogits(), retain=_tensor_set(*RETAIN), forget=empty, test=_tensor_set(*TEST))


# --- Report: mapping behaviour, round trip, tables --------------------------------------------


def test_report_mapping_and_round_trip(hand_case) -> None:
    _, report, _ = hand_case
    assert list(report) == [
        "RA", "FA", "TA", "MIA", "MIA_AUC", "EO", "GA", "worst_group", "avg_gap", "tow",
    ]  # fmt: skip
    assert dict(report)["RA"] == report["RA"] == report.RA
    with pytest.raises(KeyError):
        report["per_group"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.RA = 0.0  # type: ignore[misc]

    data = json.loads(json.dumps(report.to_dict()))
    assert data["per_group"] == {"0": 100.0, "1": 50.0, "2": 100.0, "3": 50.0}
    assert Report.from_dict(data) == report
    with pytest.raises(DataError, match="unknown Report keys: bogus"):
        Report.from_dict({**data, "bogus": 1})
    with pytest.raises(DataError, match="incomplete"):
        Report.from_dict({k: v for k, v in data.items() if k != "RA"})

    bare = dataclasses.replace(report, avg_gap=None, tow=None)
    assert "tow" not in bare and len(bare) == 8
    again = bare.with_reference(REFERENCE)
    assert again.avg_gap == pytest.approx(report.avg_gap)
    assert again.with_reference(report).avg_gap == 0.0


def test_tables(hand_case) -> None:
    _, report, _ = hand_case
    table = format_table({"MIU": report}, references={"Retrain": REFERENCE}).splitlines()
    assert table[0].startswith("| method | RA | FA | TA | MIA | MIA AUC | EO | GA | Worst group")
    assert table[0].endswith("| Gap vs Retrain | ToW vs Retrain |")
    assert table[2].startswith("| MIU | 87.50 | 75.00 | 75.00 |")
    own = format_table({"MIU": report})
    assert "Avg. Gap | ToW |" in own.splitlines()[0]
    groups = per_group_table({"MIU": report}, ["a", "b", "c", "d"]).splitlines()
    assert groups[0] == "| method | a | b | c | d |"
    assert groups[2] == "| MIU | 100.00 | 50.00 | 100.00 | 50.00 |"


def test_sklearn_is_imported_lazily() -> None:
    tree = ast.parse(Path(metrics.__file__).read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [a.name for n in top for a in n.names] + [
        n.module or "" for n in top if isinstance(n, ast.ImportFrom)
    ]
    assert not [n for n in names if n.split(".")[0] == "sklearn"]
