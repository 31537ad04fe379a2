"""Feature resolution on Hugging Face text classifiers: the tap reads the logits layer's input.

Every family is an ``AutoModelForSequenceClassification`` from a tiny config
(hidden 32, 2 layers, random weights). For each, the tapped tensor is [B, 32]
and equals, value for value, the input of the linear layer that emits the
logits, recorded by an independent forward hook on that layer (for RoBERTa,
XLM-RoBERTa and ELECTRA that is ``classifier.out_proj``, after pooling, dense
and activation). The engine's tap on the frozen original model, the width it
infers and the feature cache (filled through a padding collator) use the same
layer.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from model_trace import assert_no_trace, snapshot
from text_data import FAMILIES, build, perturbed_copy, tokenized, tokenizer
from transformers import DataCollatorWithPadding

from miu_hooks.config import MIUConfig
from miu_hooks.engine import attach
from miu_hooks.errors import FeatureModuleNotFoundError
from miu_hooks.integrations.hf import find_features
from miu_hooks.taps import FeatureTap

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

AVAILABLE = [f for f in FAMILIES if hasattr(tf, FAMILIES[f][0])]  # ModernBERT is recent


@pytest.fixture(scope="module")
def models():
    """One model per family, built once for the module (tests copy what they change)."""
    return {family: build(family) for family in AVAILABLE}


@pytest.fixture(scope="module")
def batch():
    rows = tokenized(6, seed=3)
    padded = DataCollatorWithPadding(tokenizer())([dict(r) for r in rows])
    assert int(padded["attention_mask"].sum(1).min()) < padded["input_ids"].shape[1]  # padding
    return {k: padded[k] for k in ("input_ids", "attention_mask")}


def logits_layer_input(model, name, inputs):
    """The first positional input of ``model.<name>`` on a forward, by a plain forward hook."""
    seen = []
    handle = model.get_submodule(name).register_forward_hook(
        lambda mod, args, out: seen.append((args[0].detach().clone(), out.detach().clone()))
    )
    try:
        logits = model(**inputs).logits
    finally:
        handle.remove()
    assert len(seen) == 1
    z, out = seen[0]
    assert torch.equal(out, logits)  # this layer emits the logits
    return z


def test_modernbert_covered_when_installed():
    assert ("modernbert" in AVAILABLE) == hasattr(tf, "ModernBertConfig")
    assert {"bert", "distilbert", "roberta", "xlm_roberta", "electra", "deberta_v2", "albert"} <= (
        set(AVAILABLE)
    )


@pytest.mark.parametrize("family", AVAILABLE)
def test_tap_reads_the_input_of_the_logits_layer(family, models, batch):
    model = models[family].eval()
    expected = FAMILIES[family][2]
    assert find_features(model) == (expected, 32)
    clean = snapshot(model)
    with torch.no_grad():
        want = logits_layer_input(model, expected, batch)
        with FeatureTap(model) as tap:
            model(**batch)
            z = tap.pop()
    assert tap.name == expected and want.shape == z.shape == (6, 32)
    assert torch.equal(z, want)
    assert_no_trace(model, clean)


@pytest.mark.parametrize("family", ["roberta", "electra"])
def test_composite_head_override_is_tapped_as_given(family, models, batch):
    """``feature_module="classifier"`` taps the head itself: the token sequence, refused."""
    model = models[family].eval()
    handle = attach(
        model, MIUConfig(mine_hidden=8), num_groups=4, original=None,
        feature_module="classifier",
    )  # fmt: skip
    try:
        assert handle.tap.name == "classifier" and handle.feature_dim == 32
        with torch.no_grad(), handle.tap.capturing():
            model(**batch)
        z = handle.tap.pop()
        assert z.shape == (6, batch["input_ids"].shape[1] * 32)  # [B, seq x hidden]
        with pytest.raises(FeatureModuleNotFoundError, match="classifier"):
            handle.forget_loss(z, torch.zeros(6, dtype=torch.long))
    finally:
        handle.remove()


@pytest.mark.parametrize("family", ["bert", "roberta", "deberta_v2"])
def test_original_tap_width_and_cache_use_the_same_layer(family, models):
    model = models[family]
    original = perturbed_copy(model)  # its features are its own
    data = tokenized(10, seed=5)
    collate = DataCollatorWithPadding(tokenizer())
    handle = attach(model, MIUConfig(mine_hidden=8, batch_size=4), num_groups=4, original=original)
    try:
        expected = FAMILIES[family][2]
        assert handle.tap.name == handle.tap_original.name == expected
        assert handle.feature_dim == 32  # read off the logits layer, before any batch
        assert handle.cache_features(data, collate_fn=collate)
        rows = collate([dict(r) for r in data])
        inputs = {k: rows[k] for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            want = logits_layer_input(handle.original, expected, inputs)
        assert handle.feature_cache.shape == (10, 32)
        # The cache is filled in batches padded to their own longest sequence; the mask makes
        # the features those of the unpadded sequences.
        torch.testing.assert_close(handle.feature_cache, want, rtol=1e-4, atol=1e-5)
    finally:
        handle.remove()
