"""Retrain re-initialises a Transformers model with the model's own initialisation."""

from __future__ import annotations

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from miu_hooks import reinitialize

pytestmark = pytest.mark.integration

CONFIG = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
              image_size=16, patch_size=4, num_labels=2, initializer_range=0.02)  # fmt: skip


def _flags(model: torch.nn.Module) -> set[int]:
    objects = [*model.modules(), *model.parameters()]
    return {i for i, o in enumerate(objects) if getattr(o, "_is_hf_initialized", False)}


def _loaded(tmp_path) -> ViTForImageClassification:
    """A saved and reloaded ViT (from_pretrained marks its weights as initialised)."""
    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(**CONFIG))
    with torch.no_grad():  # "trained" weights: nothing like a fresh init
        for p in model.parameters():
            p.add_(0.5)
    model.save_pretrained(tmp_path)
    return ViTForImageClassification.from_pretrained(tmp_path)


def test_hf_model_gets_its_own_init_seeded_and_no_trace(tmp_path):
    a, b, c = _loaded(tmp_path), _loaded(tmp_path), _loaded(tmp_path)
    flags = _flags(a)
    given = {k: v.clone() for k, v in a.state_dict().items()}
    assert reinitialize(a, seed=0) == [] and reinitialize(b, seed=0) == []
    reinitialize(c, seed=1)
    state = a.state_dict()
    assert list(state) == list(given)
    assert all(not torch.equal(given[k], v) for k, v in state.items() if v.numel() > 1)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in state.items())
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in state.items())
    # ViT's own initialisation: truncated normal with initializer_range, unit LayerNorms,
    # zero biases (PyTorch's default Linear init would give std 1/sqrt(3 * 64) = 0.072).
    # (Modules are found by type and shape: their names differ across Transformers 5.x.)
    dense = next(m for m in a.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 128)
    assert 0.015 < float(dense.weight.detach().std()) < 0.025
    assert torch.equal(dense.bias.detach(), torch.zeros_like(dense.bias))
    norms = [m for m in a.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(torch.equal(m.weight.detach(), torch.ones(64)) for m in norms)
    assert _flags(a) == flags  # Transformers' "initialised" marks are as they were
