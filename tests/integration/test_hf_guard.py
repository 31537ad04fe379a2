"""The collapse guard on the Trainer paths: a forced collapse is restored, stopped and logged."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, ViTConfig
from transformers import ViTForImageClassification as ViT

from miu_hooks import CollapseWarning, MIUConfig
from miu_hooks.data import GroupTensorDataset
from miu_hooks.guard import holdout_indices
from miu_hooks.integrations.hf import MIUTrainer, as_trainer_dataset, prepare_trainer

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

CFG = MIUConfig(forget_epochs=1, mine_hidden=8, mine_warmup_iters=2, mine_iters=1)


def _vit() -> ViT:
    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, image_size=8, patch_size=4, num_labels=2)  # fmt: skip
    return ViT(cfg)


def _data(model: ViT) -> tuple[GroupTensorDataset, ...]:
    """Labels are the model's own predictions, so the original is 100% accurate."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(900, 3, 8, 8, generator=gen)
    with torch.no_grad():
        logits = model.eval()(pixel_values=x).logits
        model.classifier.bias[1] -= (logits[:, 1] - logits[:, 0]).median()  # balanced classes
        y = model(pixel_values=x).logits.argmax(-1)
    g = 2 * y + torch.randint(0, 2, (900,), generator=gen)
    forget = torch.nonzero(g == 3).reshape(-1)[:20]
    keep = torch.ones(900, dtype=torch.bool)
    keep[forget] = False
    keep[800:] = False
    full = GroupTensorDataset(x, y, g)
    sets = [GroupTensorDataset(*(t[i] for t in full.tensors))
            for i in (torch.nonzero(keep).reshape(-1), forget, torch.arange(800, 900))]  # fmt: skip
    return tuple(sets)


class Wreck(TrainerCallback):
    """At the start of epoch ``at``, push the head's bias so every input is class 0."""

    def __init__(self, at: int) -> None:
        self.at, self.snaps = at, []

    def on_epoch_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        if round(state.epoch or 0) == self.at:
            with torch.no_grad():
                model.classifier.bias[0] += 1e4

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any):
        self.snaps.append(copy.deepcopy(model.state_dict()))


def _args(tmp_path: Any) -> TrainingArguments:
    return TrainingArguments(str(tmp_path), num_train_epochs=3, per_device_train_batch_size=64,
                             learning_rate=1e-6, use_cpu=True, report_to="none",
                             save_strategy="no", remove_unused_columns=False,
                             disable_tqdm=True, logging_strategy="no", seed=0)  # fmt: skip


def _equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("route", ["prepare_trainer", "MIUTrainer"])
def test_trainer_guard_restores_the_last_good_epoch_and_stops(tmp_path, route):
    model = _vit()
    retain, forget, val = (as_trainer_dataset(d) for d in _data(model))
    wreck = Wreck(at=1)
    if route == "MIUTrainer":
        trainer: Trainer = MIUTrainer(model=model, args=_args(tmp_path), train_dataset=retain,
                                      forget_dataset=forget, miu_config=CFG,
                                      miu_val_dataset=val, callbacks=[wreck])  # fmt: skip
        miu = trainer.miu
    else:
        trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=retain,
                          callbacks=[wreck])  # fmt: skip
        miu = prepare_trainer(trainer, forget, config=CFG, val_dataset=val)
    with pytest.warns(CollapseWarning, match="after epoch 1"):
        trainer.train()
    miu.remove()
    assert miu.guard is not None
    outcome = miu.guard.outcome
    assert outcome.fired and outcome.failed_epoch == 1 and outcome.restored_epoch == 0
    assert outcome.original_accuracy == 100.0 and outcome.source == "val"
    assert len(wreck.snaps) == 2  # training stopped after epoch 1: no epoch 2
    assert _equal(model.state_dict(), wreck.snaps[0])  # epoch 0's weights are back
    logged = [h for h in trainer.state.log_history if "guard/accuracy" in h]
    assert len(logged) == 2 and logged[-1]["guard/fired"] == 1.0
    assert logged[-1]["guard/restored_epoch"] == 0.0 and logged[0]["guard/accuracy"] > 90


def test_trainer_guard_off_keeps_training_and_holdout_leaves_the_reweight_draw(tmp_path):
    model = _vit()
    retain_ds, forget_ds, _ = _data(model)
    retain, forget = as_trainer_dataset(retain_ds), as_trainer_dataset(forget_ds)
    wreck = Wreck(at=1)
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=retain, callbacks=[wreck])
    miu = prepare_trainer(trainer, forget, config=CFG.replace(guard=False))
    trainer.train()
    miu.remove()
    assert miu.guard is None and len(wreck.snaps) == 3
    assert not any("guard/accuracy" in h for h in trainer.state.log_history)
    # Without a validation set the guard reads a slice of the retain set that REWEIGHT never
    # draws: its sampler gives those positions weight zero.
    model2 = _vit()
    trainer2 = Trainer(model=model2, args=_args(tmp_path / "b"), train_dataset=retain)
    miu2 = prepare_trainer(trainer2, forget, config=CFG.replace(epochs=1))
    trainer2.args.num_train_epochs = 1
    trainer2.train()
    miu2.remove()
    _, held = holdout_indices(retain_ds.groups, CFG.guard_samples, CFG.seed)
    assert miu2.guard is not None and miu2.guard.outcome.source == "retain"
    assert miu2.sampler is not None and torch.equal(miu2.sampler.excluded, held)
    assert float(miu2.sampler.weights[held].sum()) == 0.0
    assert not set(miu2.sampler.draw().tolist()) & set(held.tolist())
