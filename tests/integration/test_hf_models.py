"""Head and feature discovery, and the Trainer route, across image-classification families.

Every model is an ``AutoModelForImageClassification`` built from a tiny config
(random weights, nothing downloaded), plus a plain ``nn.Module`` whose head is an
``nn.Sequential``. For each: the tap finds the penultimate features (the input of
the linear layer that emits the logits, equal to what a forward hook on that
layer sees) with the expected width, and a short ``Trainer`` run with gradient
accumulation 2 adds the MI term to every training forward, scaled like the
model's own loss: the callback's reading of whether the model divides its loss
by ``num_items_in_batch`` is checked against the model itself.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers as tf
from model_trace import assert_no_trace, snapshot
from torch import nn
from transformers import AutoModelForImageClassification, Trainer, TrainingArguments

from miu_hooks.config import MIUConfig
from miu_hooks.data import GroupTensorDataset
from miu_hooks.integrations.hf import MIUCallback, as_trainer_dataset, find_features
from miu_hooks.taps import FeatureTap

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

SIZE = 16
VIT_LIKE = dict(
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    image_size=SIZE,
    patch_size=4,
)
FAMILIES = {
    # name: (config class, kwargs, architecture, expected feature width)
    "vit": ("ViTConfig", VIT_LIKE, "ViTForImageClassification", 32),
    "deit": ("DeiTConfig", VIT_LIKE, "DeiTForImageClassification", 32),
    "beit": ("BeitConfig", VIT_LIKE, "BeitForImageClassification", 32),
    "dinov2": ("Dinov2Config", VIT_LIKE, "Dinov2ForImageClassification", 64),  # [CLS; mean patch]
    "swin": (
        "SwinConfig",
        dict(
            image_size=SIZE,
            patch_size=2,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[2, 2],
            window_size=4,
        ),
        "SwinForImageClassification",
        32,
    ),
    "convnext": (
        "ConvNextConfig",
        dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2),
        "ConvNextForImageClassification",
        16,
    ),
    "resnet": (
        "ResNetConfig",
        dict(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"),
        "ResNetForImageClassification",
        16,
    ),  # head = Sequential(Flatten, Linear)
}


def build(family):
    cfg_cls, kw, arch, _ = FAMILIES[family]
    cfg = getattr(tf, cfg_cls)(num_labels=2, num_channels=3, **kw)
    cfg.architectures = [arch]  # DeiT maps to two classes; pick the plain classifier
    torch.manual_seed(0)
    model = AutoModelForImageClassification.from_config(cfg)
    assert type(model).__name__ == arch
    return model


class SequentialHead(nn.Module):
    """A non-HF classifier whose head is an ``nn.Sequential``; returns a loss dict."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 24), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 2))

    def forward(self, pixel_values, labels=None):
        logits = self.head(self.body(pixel_values))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def data():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (40,), generator=gen)
    g = y * 2 + torch.randint(0, 2, (40,), generator=gen)
    x = torch.randn(40, 3, SIZE, SIZE, generator=gen)
    return (
        as_trainer_dataset(GroupTensorDataset(x[8:], y[8:], g[8:])),
        as_trainer_dataset(GroupTensorDataset(x[:8], y[:8], g[:8])),
    )


def divides_by_num_items(model) -> bool:
    """Ground truth: does the model's loss change when num_items_in_batch is passed?"""
    x, y = torch.randn(4, 3, SIZE, SIZE), torch.tensor([0, 1, 1, 0])
    model.train()
    with torch.no_grad():
        plain = float(model(pixel_values=x, labels=y)["loss"])
        scaled = float(model(pixel_values=x, labels=y, num_items_in_batch=torch.tensor(8))["loss"])
    return not math.isclose(plain, scaled, rel_tol=1e-4)


@pytest.mark.parametrize("family", [*FAMILIES, "sequential_head"])
def test_features_found_and_trainer_route_works(family, tmp_path):
    if family == "sequential_head":  # the composite head's last Linear emits the logits
        model, expected_name, width = SequentialHead(), "head.2", 12
    else:
        model, width = build(family), FAMILIES[family][3]
        expected_name = "classifier.1" if family == "resnet" else "classifier"  # after Flatten
    name, dim = find_features(model)
    assert (name, dim) == (expected_name, width)
    seen = []
    hook = model.get_submodule(expected_name).register_forward_hook(
        lambda mod, args, out: seen.append((args[0].detach().clone(), out.detach().clone()))
    )
    try:
        with FeatureTap(model) as tap, torch.no_grad():
            out = model(pixel_values=torch.randn(3, 3, SIZE, SIZE))
            z = tap.pop()
    finally:
        hook.remove()
    logits = out["logits"] if isinstance(out, dict) else out.logits
    assert z.shape == (3, width) and torch.equal(seen[0][1], logits)  # the logits layer
    assert torch.equal(z, seen[0][0])

    model.train()
    clean = snapshot(model)
    retain, forget = data()
    callback = MIUCallback(
        forget, config=MIUConfig(forget_epochs=1, mine_hidden=8, mine_warmup_iters=2, mine_iters=1)
    )
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=retain, callbacks=[callback])
    trainer.train()
    assert callback.hooks.terms_added == 4  # 2 steps x 2 micro-batches
    assert callback.handle.tap.name == expected_name and callback.handle.feature_dim == width
    assert all("miu/calibration" in h for h in trainer.state.log_history if "loss" in h)
    expected = divides_by_num_items(model) if trainer.model_accepts_loss_kwargs else None
    assert callback.hooks.loss_normalized is expected
    callback.remove()
    assert_no_trace(model, clean)
