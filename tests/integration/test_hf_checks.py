"""The Trainer route: NaN messages count the steps that ran, NaN inputs are a data error,
and a tap of the wrong width stops the run on its first forward, before any update.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from miu_hooks.config import MIUConfig
from miu_hooks.data import GroupTensorDataset
from miu_hooks.errors import FeatureModuleNotFoundError, NonFiniteLossError
from miu_hooks.integrations.hf import as_trainer_dataset, prepare_trainer

pytestmark = pytest.mark.integration

B = 8
CFG = MIUConfig(forget_epochs=2, mine_hidden=8, mine_warmup_iters=3, mine_iters=2, batch_size=B,
                guard=False)  # fmt: skip


class Net(nn.Module):
    """A Trainer-compatible classifier; ``tokens=True`` applies its head per token."""

    def __init__(self, tokens: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.tokens = tokens
        self.body = nn.Linear(4, 24 if tokens else 8)
        self.classifier = nn.Linear(8, 2)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        h = torch.relu(self.body(pixel_values))
        if self.tokens:  # [B, 3, 8] into the head: it flattens to 24 values, not 8
            logits = self.classifier(h.view(-1, 3, 8)).mean(1)
        else:
            logits = self.classifier(h)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def data(n: int, seed: int, nan_at: int | None = None) -> GroupTensorDataset:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    x = torch.randn(n, 4, generator=gen)
    if nan_at is not None:
        x[nan_at, 1] = float("nan")
    return GroupTensorDataset(x, y, 2 * y + (torch.arange(n) % 2))


def train(tmp_path, model: nn.Module, retain, forget, *callbacks: TrainerCallback) -> Any:
    args = TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=2,
        per_device_train_batch_size=B,
        learning_rate=1e-2,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_strategy="no",
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=as_trainer_dataset(retain),
                      callbacks=list(callbacks))  # fmt: skip
    callback = prepare_trainer(trainer, as_trainer_dataset(forget), config=CFG)
    try:
        trainer.train()
    finally:
        callback.remove()
    return trainer, callback


class BreakAtEpoch1(TrainerCallback):
    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        if state.epoch and state.epoch >= 1:
            with torch.no_grad():
                model.body.weight.fill_(float("nan"))


def test_step_counters_are_right_and_named_in_a_nan_message(tmp_path) -> None:
    trainer, callback = train(tmp_path / "ok", Net(), data(4 * B, 0), data(2 * B, 1))
    assert callback.handle.counters == {"tune": 3 + 2, "forget": 2 * 2, "retain": 2 * 4}
    assert trainer.state.global_step == 2 * 4
    with pytest.raises(NonFiniteLossError) as e:
        train(tmp_path / "nan", Net(), data(4 * B, 0), data(2 * B, 1), BreakAtEpoch1())
    # MIU's epoch start runs before the breaking callback (prepare_trainer places it first):
    # 3 + 2 tuning, 2 + 2 forget and the 4 retain steps of epoch 0 ran before epoch 1's first.
    assert "retain step at epoch 1 (finished before it: 5 critic-tuning, 4 forget and 4 " \
           "retain steps)" in str(e.value)  # fmt: skip


def test_nan_inputs_are_a_data_error_on_the_trainer_route(tmp_path) -> None:
    from miu_hooks.errors import NonFiniteInputError

    with pytest.raises(NonFiniteInputError, match="hold NaN or Inf") as e:
        train(tmp_path, Net(), data(4 * B, 0, nan_at=5), data(2 * B, 1))
    assert not isinstance(e.value, NonFiniteLossError)


def test_a_tap_of_the_wrong_width_stops_before_any_update(tmp_path) -> None:
    model = Net(tokens=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FeatureModuleNotFoundError, match=r"'classifier' flattens to 24 values .*"
                       r"feature_module="):  # fmt: skip
        train(tmp_path, model, data(4 * B, 0), data(2 * B, 1))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_tap_of_the_wrong_width_stops_the_accelerate_route_before_any_update() -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from torch.utils.data import DataLoader

    from miu_hooks.integrations.accelerate import prepare_miu, reweighted_loader

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        retain, forget = data(4 * B, 0), data(2 * B, 1)
        accelerator = Accelerator(cpu=True)
        model = Net(tokens=True)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        loaders = (reweighted_loader(retain, forget, B, config=CFG),
                   DataLoader(forget, batch_size=B, shuffle=True))  # fmt: skip
        model, opt, retain_loader, forget_loader = accelerator.prepare(model, opt, *loaders)
        with pytest.raises(FeatureModuleNotFoundError, match=r"'classifier' flattens to 24 "
                           r"values .*feature_module="):  # fmt: skip
            miu = prepare_miu(accelerator, model, opt, retain_loader, forget_loader, config=CFG)
            miu.epoch_start(0)  # critic tuning and the forget pass: the first forwards
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
