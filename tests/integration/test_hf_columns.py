"""The column trap: ``remove_unused_columns=True`` (the default) drops ``group`` unless handled."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments, ViTConfig
from transformers import ViTForImageClassification as ViT

from miu_hooks.config import MIUConfig
from miu_hooks.data import GroupTensorDataset
from miu_hooks.errors import DataError
from miu_hooks.integrations.hf import MIUCallback, as_trainer_dataset

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]


CFG = MIUConfig(forget_epochs=1, mine_hidden=8, mine_warmup_iters=2, mine_iters=1)


def tiny(seed=0):
    torch.manual_seed(seed)
    return ViT(
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


def sets():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (40,), generator=gen)
    g = y * 2 + torch.randint(0, 2, (40,), generator=gen)
    data = GroupTensorDataset(torch.randn(40, 3, 8, 8, generator=gen), y, g)
    retain = GroupTensorDataset(data.inputs[8:], data.labels[8:], data.groups[8:])
    forget = GroupTensorDataset(data.inputs[:8], data.labels[:8], data.groups[:8])
    return as_trainer_dataset(retain), as_trainer_dataset(forget)


def args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=8,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
    )
    base.update(kw)
    return TrainingArguments(**base)


class Renamed(Dataset):
    """Dict items with one column renamed (or dropped when ``new`` is None)."""

    def __init__(self, base, old, new):
        self.base, self.old, self.new = base, old, new

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        item = dict(self.base[i])
        value = item.pop(self.old)
        if self.new is not None:
            item[self.new] = value
        return item


def test_default_arguments_are_switched_with_a_warning(tmp_path, caplog):
    retain, forget = sets()
    callback = MIUCallback(forget, config=CFG)
    a = args(tmp_path)
    assert a.remove_unused_columns is True
    with caplog.at_level(logging.WARNING, logger="miu_hooks"):
        trainer = Trainer(model=tiny(), args=a, train_dataset=retain, callbacks=[callback])
    assert a.remove_unused_columns is False
    assert [r for r in caplog.records if "remove_unused_columns=False" in r.getMessage()]
    trainer.train()
    assert callback.hooks.terms_added == 2  # the group column reached every training forward
    callback.remove()
    assert a.remove_unused_columns is True


def test_callback_added_late_fails_at_train_start_naming_the_setting(tmp_path):
    retain, forget = sets()
    callback = MIUCallback(forget, config=CFG)
    trainer = Trainer(model=tiny(), args=args(tmp_path), train_dataset=retain)
    trainer.add_callback(callback)  # too late to keep the column: the Trainer will drop it
    with pytest.raises(DataError, match=r"TrainingArguments\(remove_unused_columns=False\)"):
        trainer.train()
    callback.remove()
    trainer.args.remove_unused_columns = False  # ... and with the setting, the same callback works
    trainer.train()
    assert callback.hooks.terms_added == 2
    callback.remove()


def test_missing_group_column_in_forget_set_fails_at_construction():
    _, forget = sets()
    with pytest.raises(DataError, match="'group'"):
        MIUCallback(Renamed(forget, "group", "attribute"), config=CFG)
    with pytest.raises(DataError, match="'labels'"):
        MIUCallback(Renamed(forget, "labels", None), config=CFG)
    MIUCallback(Renamed(forget, "group", "attribute"), config=CFG.replace(group_key="attribute"))


def test_missing_group_column_in_retain_set_fails_at_train_start(tmp_path):
    retain, forget = sets()
    callback = MIUCallback(forget, config=CFG)
    trainer = Trainer(
        model=tiny(),
        args=args(tmp_path),
        train_dataset=Renamed(retain, "group", "g"),
        callbacks=[callback],
    )
    with pytest.raises(DataError, match="train \\(retain\\) dataset has no 'group' column"):
        trainer.train()
    callback.remove()
