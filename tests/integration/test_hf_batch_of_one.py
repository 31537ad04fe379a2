"""Trainer and Accelerate routes: no training-mode pass the library batches feeds a batch of one.

The model has a ``BatchNorm1d``, which cannot train on one sample. Forget and
critic-tuning sets of k·B + 1 samples run (their last single sample joins the
batch before it); a loader the library does not build (the Trainer's own retain
loader, the user's forget loader in an Accelerate loop) that would end with a
batch of one is refused before any step, with the fix in the message.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, TrainingArguments

from miu_hooks.config import MIUConfig
from miu_hooks.data import GroupTensorDataset
from miu_hooks.errors import ModelError
from miu_hooks.integrations.hf import as_trainer_dataset, prepare_trainer

pytestmark = pytest.mark.integration

B = 8
CFG = MIUConfig(forget_epochs=2, mine_hidden=8, mine_warmup_iters=3, mine_iters=2, batch_size=B,
                guard=False)  # fmt: skip


class BNNet(nn.Module):
    """A Trainer-compatible classifier with BatchNorm (dict output with loss and logits)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.classifier = nn.Linear(16, 2)
        self.sizes: list[int] = []
        self.body[1].register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if module.training:
            self.sizes.append(len(args[0]))

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        logits = self.classifier(self.body(pixel_values))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def data(n: int, seed: int) -> GroupTensorDataset:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    return GroupTensorDataset(torch.randn(n, 4, generator=gen), y, 2 * y + (torch.arange(n) % 2))


def trainer(tmp_path, model: nn.Module, retain, **kw: Any) -> Trainer:
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
        **kw,
    )
    return Trainer(model=model, args=args, train_dataset=as_trainer_dataset(retain))


def test_trainer_forget_and_tuning_sets_of_k_batches_plus_one(tmp_path) -> None:
    model = BNNet()
    # retain 4B (the Trainer's own loader), forget B+1, tuning on both: 5B+1
    t = trainer(tmp_path, model, data(4 * B, 0))
    callback = prepare_trainer(t, as_trainer_dataset(data(B + 1, 1)), config=CFG)
    t.train()
    callback.remove()
    assert callback.handle is not None and callback.handle.counters["forget"] == 2 * 1
    assert model.sizes and min(model.sizes) >= 2


def test_trainer_retain_loader_ending_with_one_sample_is_refused_up_front(tmp_path) -> None:
    model = BNNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t = trainer(tmp_path / "a", model, data(4 * B + 1, 0))
    callback = prepare_trainer(t, as_trainer_dataset(data(B, 1)), config=CFG)
    with pytest.raises(ModelError, match=r"Trainer's retain loader ends with a batch of one .*"
                       r"dataloader_drop_last=True"):  # fmt: skip
        t.train()
    callback.remove()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # The fix the message names runs (the probe's refused batch of one is not kept).
    model.sizes.clear()
    t = trainer(tmp_path / "b", model, data(4 * B + 1, 0), dataloader_drop_last=True)
    callback = prepare_trainer(t, as_trainer_dataset(data(B, 1)), config=CFG)
    t.train()
    callback.remove()
    assert min(model.sizes) >= 2


@pytest.fixture
def fresh_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _accelerate_run(forget_loader_kw: dict[str, Any]) -> BNNet:
    from accelerate import Accelerator

    from miu_hooks.integrations.accelerate import prepare_miu, reweighted_loader

    retain, forget = data(4 * B + 1, 0), data(B + 1, 1)  # tuning: 5B + 2
    accelerator = Accelerator(cpu=True)
    net = BNNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    retain_loader = reweighted_loader(retain, forget, B, config=CFG)
    forget_loader = DataLoader(forget, batch_size=B, shuffle=True, **forget_loader_kw)
    net, opt, retain_loader, forget_loader = accelerator.prepare(
        net, opt, retain_loader, forget_loader
    )
    miu = prepare_miu(accelerator, net, opt, retain_loader, forget_loader, config=CFG)
    for epoch in range(2):
        miu.epoch_start(epoch)
        for x, y, g in retain_loader:
            loss = miu.retain_loss(net(x)["logits"], (x, y, g))
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
    miu.remove()
    return accelerator.unwrap_model(net)


def test_accelerate_library_loaders_merge_and_user_loaders_are_checked(fresh_accelerate) -> None:
    with pytest.raises(ModelError, match=r"forget loader ends with a batch of one .*drop_last"):
        _accelerate_run({})
    net = _accelerate_run({"drop_last": True})  # the retain loader (4B+1) is the library's
    assert net.sizes and min(net.sizes) >= 2
