"""The collapse guard of unlearn(): a forced collapse is restored, stopped and reported."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from miu_hooks import CollapseWarning, GuardOutcome, MIUConfig, NonFiniteLossError, TrainConfig
from miu_hooks import unlearn as unlearn_fn
from miu_hooks.guard import MIN_HOLDOUT, holdout_indices
from miu_hooks.methods.finetune import FineTune
from miu_hooks.methods.miu import MIU

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


def _problem(n: int, seed: int) -> TensorDataset:
    """Linearly separable by feature 0 (label) with a weaker attribute feature."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    s = torch.randint(0, 2, (n,), generator=gen)
    x = torch.randn(n, 4, generator=gen) * 0.3
    x[:, 0] += 2.0 * y - 1.0
    x[:, 1] += s
    return TensorDataset(x, y, s + 2 * y)


def _setup() -> tuple[nn.Module, TensorDataset, TensorDataset, TensorDataset]:
    data, val = _problem(600, 0), _problem(200, 1)
    g = data.tensors[2]
    forget_mask = (g == 3) & (torch.arange(len(g)) % 2 == 0)
    retain = TensorDataset(*(t[~forget_mask] for t in data.tensors))
    forget = TensorDataset(*(t[forget_mask] for t in data.tensors))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():  # a trained original: the label is feature 0
        net[0].weight.zero_()
        net[0].bias.zero_()
        net[0].weight[0, 0], net[0].weight[1, 0] = 3.0, -3.0
        net[2].weight.zero_()
        net[2].bias.zero_()
        net[2].weight[1, 0], net[2].weight[0, 1] = 1.0, 1.0
    return net, retain, forget, val


CFG = TrainConfig(epochs=3, batch_size=32, lr=0.01, device="cpu")


def _states(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def _collapse_at(monkeypatch: pytest.MonkeyPatch, cls: type, epoch: int) -> None:
    """Make ``cls.run_epoch`` wreck the model at ``epoch``: every input predicts class 0."""
    original = cls.run_epoch

    def run_epoch(self: Any, ctx: Any, e: int) -> None:
        original(self, ctx, e)
        if e == epoch:
            with torch.no_grad():
                head = [m for m in ctx.model.modules() if isinstance(m, nn.Linear)][-1]
                head.bias[0] += 100.0

    monkeypatch.setattr(cls, "run_epoch", run_epoch)


def _run(model: nn.Module, retain: Any, forget: Any, **kw: Any) -> tuple[list, list]:
    snaps: list[dict[str, torch.Tensor]] = []
    outcomes: list[GuardOutcome] = []
    kw.setdefault("config", CFG)
    kw.setdefault("method", "finetune")
    unlearn_fn(
        model, retain, forget, num_groups=4,
        on_epoch_end=lambda e, logs: snaps.append(_states(model)),
        on_guard=outcomes.append, **kw,
    )  # fmt: skip
    return snaps, outcomes


def test_a_collapse_restores_the_last_good_epoch_stops_and_warns(monkeypatch):
    net, retain, forget, val = _setup()
    _collapse_at(monkeypatch, FineTune, epoch=1)
    with pytest.warns(CollapseWarning, match=r"after epoch 1 .* points below the original"):
        snaps, (outcome,) = _run(net, retain, forget, val=val)
    assert outcome.fired and outcome.failed_epoch == 1 and outcome.restored_epoch == 0
    assert len(snaps) == 2  # epochs 0 and 1 ran; epoch 2 did not
    assert _equal(_states(net), snaps[0])  # epoch 0's weights, not the wrecked ones
    assert outcome.source == "val" and outcome.samples == 200
    assert outcome.original_accuracy > 95 and outcome.accuracies[0] > 95
    assert outcome.accuracies[1] < 60  # the wrecked model's accuracy was measured
    assert "epoch 0 were restored" in outcome.message


def test_a_collapse_in_the_first_epoch_restores_the_input_model(monkeypatch):
    net, retain, forget, val = _setup()
    before = _states(net)
    _collapse_at(monkeypatch, FineTune, epoch=0)
    with pytest.warns(CollapseWarning, match="nothing was unlearned"):
        _, (outcome,) = _run(net, retain, forget, val=val)
    assert outcome.restored_epoch == -1 and _equal(_states(net), before)


def test_guard_off_returns_the_collapsed_weights(monkeypatch):
    net, retain, forget, val = _setup()
    _collapse_at(monkeypatch, FineTune, epoch=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        snaps, outcomes = _run(net, retain, forget, val=val, config=CFG.replace(guard=False))
    assert outcomes == [] and len(snaps) == 3
    assert float([m for m in net.modules() if isinstance(m, nn.Linear)][-1].bias[0].detach()) > 50


def test_a_passing_run_is_recorded_and_unchanged_by_the_guard():
    net, retain, forget, val = _setup()
    a, b = _setup()[0], _setup()[0]
    _, (outcome,) = _run(a, retain, forget, val=val)
    _run(b, retain, forget, val=val, config=CFG.replace(guard=False))
    assert not outcome.fired and len(outcome.accuracies) == 3 and outcome.restored_epoch is None
    assert _equal(_states(a), _states(b))  # with val, the guard only reads


def test_a_non_finite_loss_restores_the_last_good_epoch(monkeypatch):
    net, retain, forget, val = _setup()
    original = FineTune.run_epoch

    def run_epoch(self: Any, ctx: Any, e: int) -> None:
        original(self, ctx, e)
        if e == 1:
            with torch.no_grad():
                for p in ctx.model.parameters():
                    p.add_(1.0)  # a partial epoch's damage ...
            raise NonFiniteLossError("non-finite loss (nan) in the retain step at epoch 1")

    monkeypatch.setattr(FineTune, "run_epoch", run_epoch)
    snaps: list[dict[str, torch.Tensor]] = []
    with pytest.raises(NonFiniteLossError, match="epoch 0's weights restored by the guard"):
        unlearn_fn(net, retain, forget, config=CFG, method="finetune", num_groups=4, val=val,
                   on_epoch_end=lambda e, logs: snaps.append(_states(net)))  # fmt: skip
    assert _equal(_states(net), snaps[0])
    net2 = _setup()[0]
    with pytest.raises(NonFiniteLossError) as info:  # guard off: the error as it was
        unlearn_fn(net2, retain, forget, config=CFG.replace(guard=False), method="finetune",
                   num_groups=4, val=val)  # fmt: skip
    assert "restored" not in str(info.value)


def test_the_guard_covers_miu(monkeypatch):
    net, retain, forget, val = _setup()
    _collapse_at(monkeypatch, MIU, epoch=1)
    cfg = MIUConfig(epochs=3, forget_epochs=1, batch_size=32, mine_hidden=8,
                    mine_warmup_iters=3, mine_iters=1, device="cpu")  # fmt: skip
    with pytest.warns(CollapseWarning):
        snaps, (outcome,) = _run(net, retain, forget, val=val, config=cfg, method="miu")
    assert outcome.restored_epoch == 0 and _equal(_states(net), snaps[0])


def test_without_val_a_stratified_retain_slice_is_held_out_of_training(monkeypatch):
    net, retain, forget, _ = _setup()
    _, held = holdout_indices(retain.tensors[2], CFG.guard_samples, CFG.seed)
    assert len(held) >= MIN_HOLDOUT
    held_rows = {tuple(r.tolist()) for r in retain.tensors[0][held]}
    seen: list[torch.Tensor] = []

    def progress(it: Iterable[Any], desc: str) -> Iterable[Any]:
        for raw in it:
            if desc.endswith("retain"):
                seen.append(raw[0].clone())
            yield raw

    _, (outcome,) = _run(net, retain, forget, progress=progress)
    trained = {tuple(r.tolist()) for r in torch.cat(seen)}
    assert outcome.source == "retain" and outcome.samples == len(held)
    assert not trained & held_rows and len(trained) == len(retain) - len(held)


def test_holdout_is_stratified_seeded_and_keeps_every_group():
    groups = torch.tensor([0] * 300 + [1] * 95 + [2] * 9 + [3] * 1)
    keep, held = holdout_indices(groups, 512, seed=3)
    counts = torch.bincount(groups[held], minlength=4).tolist()
    assert counts == [30, 9, 0, 0]  # a tenth of each group, rounded down
    assert sorted(torch.cat([keep, held]).tolist()) == list(range(len(groups)))
    assert torch.equal(held, holdout_indices(groups, 512, seed=3)[1])
    assert not torch.equal(held, holdout_indices(groups, 512, seed=4)[1])
    # capped at 20 samples: 20/405 of each group, rounded down: 14 + 4 + 0 + 0
    assert len(holdout_indices(groups, 20, seed=3)[1]) == 18


def test_tiny_retain_sets_run_unguarded_and_say_so(caplog):
    net, retain, forget, _ = _setup()
    small = TensorDataset(*(t[:200] for t in retain.tensors))
    with caplog.at_level(logging.WARNING, logger="miu_hooks.unlearn"):
        _, outcomes = _run(net, small, forget)
    assert outcomes == [] and "collapse guard off" in caplog.text and "pass val=" in caplog.text
