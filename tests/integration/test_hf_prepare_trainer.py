"""The three Trainer routes on a real ``transformers.Trainer``: logging, placement, no trace.

Routes: ``prepare_trainer(trainer, forget)`` (recommended; places the callback
through ``trainer.callback_handler``), ``Trainer(callbacks=[MIUCallback(...)])``
(finds the callback list on the call stack at train start) and ``MIUTrainer``.

A real ``report_to`` backend is used: a ``TrainerCallback`` class registered in
transformers' table of reporting integrations under a test name, so the
Trainer instantiates it and puts it where it puts W&B or TensorBoard (right
after ``DefaultFlowCallback``, before user callbacks). It records what
``on_log`` hands it. A plain user callback listed before MIU records too.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import pytest
import torch
from model_trace import assert_no_trace, snapshot
from transformers import Trainer, TrainerCallback, TrainingArguments, ViTConfig
from transformers import ViTForImageClassification as ViT
from transformers.integrations import integration_utils
from transformers.trainer_callback import DefaultFlowCallback

from miu_hooks.config import MIUConfig
from miu_hooks.data import GroupTensorDataset
from miu_hooks.errors import ConfigError, ConfigTypeError, MIUError
from miu_hooks.integrations import hf_callback
from miu_hooks.integrations.hf import (
    MIUCallback,
    MIUTrainer,
    as_trainer_dataset,
    make_miu_trainer,
    prepare_trainer,
)

pytestmark = pytest.mark.integration

BACKEND = "miu_probe"
MIU_KEYS = {"miu/calibration", "miu/mi_model", "miu/mi_original"}
CFG = MIUConfig(forget_epochs=1, mine_hidden=8, mine_warmup_iters=2, mine_iters=1)


class ProbeBackend(TrainerCallback):
    """A report_to backend: the Trainer builds it from its name in ``report_to``."""

    records: ClassVar[list[dict]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        ProbeBackend.records.append(dict(logs))


class UserReporter(TrainerCallback):
    """A user's own logging callback, listed before MIU."""

    def __init__(self):
        self.records = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.records.append(dict(logs))


@pytest.fixture(autouse=True)
def _backend(monkeypatch):
    monkeypatch.setitem(integration_utils.INTEGRATION_TO_CALLBACK, BACKEND, ProbeBackend)
    ProbeBackend.records = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_vit() -> ViT:
    torch.manual_seed(0)
    model = ViT(
        ViTConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=8,
            patch_size=4,
            num_labels=2,
        )
    )
    model.train()
    return model


def data():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, 8, 8, generator=gen), torch.randint(0, 2, (40,), generator=gen)
    g = 2 * y + torch.randint(0, 2, (40,), generator=gen)
    return (
        as_trainer_dataset(GroupTensorDataset(x[8:], y[8:], g[8:])),
        as_trainer_dataset(GroupTensorDataset(x[:8], y[:8], g[:8])),
    )


def targs(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=8,
        logging_steps=1,
        use_cpu=True,
        report_to=[BACKEND],
        save_strategy="no",
        disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


def build(route, tmp_path, model=None, **kw):
    """A Trainer with MIU added by ``route``; returns ``(trainer, callback, model, reporter)``."""
    retain, forget = data()
    model, reporter = model if model is not None else tiny_vit(), UserReporter()
    common = dict(model=model, args=targs(tmp_path, **kw), train_dataset=retain)
    if route == "prepare_trainer":
        trainer = Trainer(**common, callbacks=[reporter])
        callback = prepare_trainer(trainer, forget, config=CFG)
    elif route == "callbacks":
        callback = MIUCallback(forget, config=CFG)
        trainer = Trainer(**common, callbacks=[reporter, callback])
    else:
        trainer = MIUTrainer(**common, callbacks=[reporter], forget_dataset=forget, miu_config=CFG)
        callback = trainer.miu
    return trainer, callback, model, reporter


ROUTES = ["prepare_trainer", "callbacks", "miu_trainer"]


@pytest.mark.parametrize("route", ROUTES)
def test_miu_keys_reach_log_history_and_every_reporter(route, tmp_path):
    trainer, callback, _, reporter = build(route, tmp_path)
    kinds = [type(cb) for cb in trainer.callback_handler.callbacks]
    assert ProbeBackend in kinds and kinds.index(ProbeBackend) < kinds.index(UserReporter)
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    backend = [r for r in ProbeBackend.records if "loss" in r]
    user = [r for r in reporter.records if "loss" in r]
    assert len(history) == len(backend) == len(user) == trainer.state.global_step == 3
    for records in (history, backend, user):
        assert all(MIU_KEYS <= set(r) for r in records), records
    assert sum("miu/forget_mi" in r for r in backend) == 1  # the forget pass of epoch 0
    assert [r["miu/calibration"] for r in backend] == [r["miu/calibration"] for r in history]
    kinds = [type(cb) for cb in trainer.callback_handler.callbacks]
    mine = next(i for i, cb in enumerate(trainer.callback_handler.callbacks) if cb is callback)
    assert kinds.index(DefaultFlowCallback) == mine - 1 and mine < kinds.index(ProbeBackend)
    callback.remove()


def test_callbacks_route_without_the_stack_walk_still_fills_log_history(
    tmp_path, monkeypatch, caplog
):
    """The fallback: the list is not found; log_history gets the keys, the backends do not."""
    monkeypatch.setattr(hf_callback, "calling_handler", lambda callback: None)
    trainer, callback, _, _ = build("callbacks", tmp_path)
    with caplog.at_level(logging.WARNING, logger=hf_callback.__name__):
        trainer.train()
    assert any("prepare_trainer" in r.getMessage() for r in caplog.records)
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert len(history) == 3 and all(MIU_KEYS <= set(h) for h in history)
    backend = [r for r in ProbeBackend.records if "loss" in r]
    assert len(backend) == 3 and not any(MIU_KEYS & set(r) for r in backend)
    callback.remove()


@pytest.mark.parametrize("route", ROUTES)
def test_route_leaves_no_trace(route, tmp_path):
    model = tiny_vit()
    before = snapshot(model)
    trainer, callback, _, _ = build(route, tmp_path, model, remove_unused_columns=True)
    assert trainer.args.remove_unused_columns is False  # switched (with a warning) ...
    trainer.train()
    assert callback.hooks.terms_added == 3  # the MI term reached every training step
    assert callback.handle.counters["forget"] > 0
    callback.remove()
    assert_no_trace(model, before)
    assert trainer.args.remove_unused_columns is True  # ... and switched back by remove()


def test_prepare_trainer_switches_columns_with_a_warning(tmp_path, caplog):
    retain, forget = data()
    trainer = Trainer(model=tiny_vit(), args=targs(tmp_path), train_dataset=retain)
    assert trainer.args.remove_unused_columns is True
    with caplog.at_level(logging.WARNING, logger=hf_callback.__name__):
        callback = prepare_trainer(trainer, forget, config=CFG)
    assert trainer.args.remove_unused_columns is False
    assert any("remove_unused_columns=False" in r.getMessage() for r in caplog.records)
    callback.remove()
    assert trainer.args.remove_unused_columns is True


def test_prepare_trainer_refuses_a_second_miu_and_non_trainers(tmp_path):
    retain, forget = data()
    trainer = Trainer(model=tiny_vit(), args=targs(tmp_path), train_dataset=retain)
    first = prepare_trainer(trainer, forget, config=CFG)
    with pytest.raises(ConfigError, match="already has an MIUCallback"):
        prepare_trainer(trainer, forget, config=CFG)
    first.remove()
    sub = MIUTrainer(
        model=tiny_vit(), args=targs(tmp_path), train_dataset=retain, forget_dataset=forget
    )
    with pytest.raises(ConfigError, match=r"trainer\.miu"):
        prepare_trainer(sub, forget)
    sub.miu.remove()
    with pytest.raises(ConfigTypeError) as err:
        prepare_trainer(object(), forget)  # type: ignore[arg-type]
    assert isinstance(err.value, TypeError) and isinstance(err.value, MIUError)
    with pytest.raises(ConfigTypeError):
        make_miu_trainer(dict)
    with pytest.raises(ConfigError) as err:
        MIUCallback(forget, batch_size=0)
    assert isinstance(err.value, ValueError)
