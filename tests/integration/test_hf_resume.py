"""Checkpoints: stop a Trainer + MIUCallback run after N steps, resume, compare with a full run.

Models: a tiny HF ResNet (BatchNorm, ``Sequential`` head) and a tiny ViT. Where
``save_pretrained`` writes renamed (legacy) keys that ``Trainer._load_from_checkpoint``
does not map back (ViT on transformers 5.24: the Trainer then restores no model
weights at all, with or without MIU), the callback warns with the fix, and the run
that applies it matches the uninterrupted one.

3 epochs of 8 steps, forget passes in epochs 0 and 1. N = 12 stops in the
middle of epoch 1 (after its tuning and forget pass, which must not run again);
N = 8 stops at the end of epoch 0 (epoch 1's tuning and forget pass must run
after resuming). The resumed run starts from a fresh model, Trainer and callback,
so everything it continues with comes from the checkpoint folder.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (
    ResNetConfig,
    ResNetForImageClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from miu_hooks.config import MIUConfig
from miu_hooks.demo import colored_digits
from miu_hooks.errors import CheckpointError
from miu_hooks.integrations.hf import MIUCallback, as_trainer_dataset
from miu_hooks.integrations.hf_state import META_FILE, STATE_FILE
from miu_hooks.splits import forget_split, subset

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def datasets():
    data = colored_digits(seed=1, size=8, label_noise=0.0, color_flip=0.2)
    r, f = forget_split(data.train, forget_groups=(3,), ratio=0.1, seed=0)
    retain, forget = subset(data.train, r[:256]), subset(data.train, f[:40])
    return as_trainer_dataset(retain), as_trainer_dataset(forget)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_save = True
            control.should_training_stop = True


def make_model(family):
    torch.manual_seed(0)
    if family == "resnet":
        return ResNetForImageClassification(
            ResNetConfig(
                embedding_size=8,
                hidden_sizes=[8, 16],
                depths=[1, 1],
                layer_type="basic",
                num_labels=2,
            )
        )
    return ViTForImageClassification(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=8,
            patch_size=4,
            num_labels=2,
        )
    )


def checkpoint_keys_round_trip(family, tmp):
    from safetensors import safe_open

    model = make_model(family)
    model.save_pretrained(tmp)
    with safe_open(str(tmp / "model.safetensors"), framework="pt") as f:
        return set(f.keys()) == set(model.state_dict())


def run(tmp, datasets, *, family="resnet", stop=None, resume=None, save_steps=None,
        restore=False):  # fmt: skip
    retain, forget = datasets
    model = make_model(family)
    args = TrainingArguments(
        output_dir=str(tmp),
        num_train_epochs=3,
        per_device_train_batch_size=32,
        learning_rate=2e-3,
        seed=0,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        logging_strategy="no",
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        remove_unused_columns=False,
    )
    cfg = MIUConfig(
        forget_epochs=2, mi_weight=5.0, mine_hidden=32, mine_warmup_iters=6, mine_iters=3
    )
    callback = MIUCallback(forget, config=cfg)
    extra = [StopAt(stop)] if stop else []
    trainer = Trainer(model=model, args=args, train_dataset=retain, callbacks=[callback, *extra])
    if restore:  # what the callback's warning says to do
        trainer.model.load_state_dict(type(trainer.model).from_pretrained(resume).state_dict())
    trainer.train(resume_from_checkpoint=resume)
    state = {k: v.clone() for k, v in callback.handle.state_dict().items()}
    callback.remove()
    return model, callback, state


@pytest.mark.parametrize(("family", "stop"), [("resnet", 12), ("resnet", 8), ("vit", 12)])
def test_resume_matches_uninterrupted_run(tmp_path, datasets, family, stop, caplog):
    renamed = not checkpoint_keys_round_trip(family, tmp_path / "keys")
    full, full_cb, full_state = run(tmp_path / "full", datasets, family=family)

    _, first_cb, _ = run(tmp_path / "run", datasets, family=family, stop=stop)
    ckpt = tmp_path / "run" / f"checkpoint-{stop}"
    assert (ckpt / STATE_FILE).is_file()
    meta = json.loads((ckpt / META_FILE).read_text())
    assert meta["started_epoch"] == (1 if stop == 12 else 0)
    assert meta["counters"] == first_cb.handle.counters

    if renamed:  # the Trainer restores no weights: the callback says so and how to fix it
        with caplog.at_level("WARNING", logger="miu_hooks.integrations.hf_state"):
            run(tmp_path / "run", datasets, family=family, resume=str(ckpt))
        assert "the Trainer (transformers" in caplog.text
        assert "did not restore them" in caplog.text and "from_pretrained(" in caplog.text
        caplog.clear()
    with caplog.at_level("WARNING", logger="miu_hooks.integrations.hf_state"):
        resumed, resumed_cb, resumed_state = run(
            tmp_path / "run", datasets, family=family, resume=str(ckpt), restore=renamed
        )
    assert "did not restore" not in caplog.text
    assert resumed_cb.handle.counters == full_cb.handle.counters  # no tuning/forget step repeated
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    assert full_state.keys() == resumed_state.keys()
    for key in full_state:
        assert torch.allclose(
            full_state[key].float(), resumed_state[key].float(), rtol=1e-5, atol=1e-6
        ), key


def test_resume_without_miu_state_fails_loudly(tmp_path, datasets):
    run(tmp_path / "run", datasets, stop=4)
    ckpt = tmp_path / "run" / "checkpoint-4"
    (ckpt / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"miu_state\.safetensors"):
        run(tmp_path / "run", datasets, resume=str(ckpt))


def test_weights_the_trainer_did_not_restore_are_detected_on_any_version(tmp_path, caplog):
    """The check behind the resume warning, independent of whether this transformers renames."""
    from safetensors.torch import save_model

    from miu_hooks.integrations.hf_state import (
        checkpoint_weights_restored,
        warn_if_weights_not_restored,
    )

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert checkpoint_weights_restored(model, tmp_path) is None  # no model.safetensors there
    save_model(model, str(tmp_path / "model.safetensors"))
    assert checkpoint_weights_restored(model, tmp_path) is True
    with caplog.at_level("WARNING", logger="miu_hooks.integrations.hf_state"):
        warn_if_weights_not_restored(model, tmp_path)
    assert caplog.text == ""
    with torch.no_grad():
        model[2].bias.add_(1e-3)  # the run's start weights, not the checkpoint's
    assert checkpoint_weights_restored(model, tmp_path) is False
    with caplog.at_level("WARNING", logger="miu_hooks.integrations.hf_state"):
        warn_if_weights_not_restored(model, tmp_path)
    assert "did not restore them" in caplog.text
    assert f"from_pretrained({str(tmp_path)!r})" in caplog.text
