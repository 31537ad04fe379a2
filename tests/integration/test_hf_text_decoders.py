"""Decoder text classifiers (GPT-2, Llama): features at the last non-padding token.

These models apply ``score`` to every token, [B, T, 32] -> [B, T, 2], and keep the
logits of each row's last real token. The tap must give [B, 32] features at that
token. The reference here is independent of the pooling code: the token sequence
``score`` receives, recorded by a plain forward hook, read at the position the
attention mask says is last (right padding: ``mask.sum(1) - 1``; left padding: the
last column), and ``score`` of the tapped features must reproduce the model's logits.
Then the engine (frozen original, feature cache through a padding collator) and a
Trainer run with ``prepare_trainer`` use the same features.
"""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator
from model_trace import assert_no_trace, snapshot
from text_data import DECODERS, build, perturbed_copy, tokenized, tokenizer
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from miu_hooks.config import MIUConfig
from miu_hooks.engine import attach
from miu_hooks.integrations.accelerate import prepare_miu, reweighted_loader
from miu_hooks.integrations.hf import find_features, prepare_trainer
from miu_hooks.taps import FeatureTap

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

FAMILIES = sorted(DECODERS)
FAST = MIUConfig(forget_epochs=1, mine_hidden=8, mine_warmup_iters=2, mine_iters=1)


@pytest.fixture(scope="module")
def models():
    return {family: build(family) for family in FAMILIES}


def padded(side: str) -> dict[str, torch.Tensor]:
    """Six sentences of different lengths, padded on ``side`` with the pad id 0."""
    collate = DataCollatorWithPadding(tokenizer())
    rows = collate([dict(r) for r in tokenized(6, seed=3)])
    ids, mask = rows["input_ids"], rows["attention_mask"]
    assert int(mask.sum(1).min()) < ids.shape[1]  # some rows are padded
    if side == "left":  # move each row's padding to its front
        order = torch.argsort(mask, dim=1, stable=True)
        ids, mask = ids.gather(1, order), mask.gather(1, order)
        assert bool((mask[:, -1] == 1).all())
    return {"input_ids": ids, "attention_mask": mask}


def last_real_token(mask: torch.Tensor) -> torch.Tensor:
    right = bool((mask[:, 0] == 1).all())
    return mask.sum(1) - 1 if right else torch.full((mask.shape[0],), mask.shape[1] - 1)


def score_input(model, inputs):
    """The [B, T, d] sequence ``score`` receives, by a plain forward hook, and the logits."""
    seen = []
    handle = model.score.register_forward_hook(lambda m, a, out: seen.append(a[0].detach()))
    try:
        logits = model(**inputs).logits
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0].dim() == 3
    return seen[0], logits


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_tap_reads_score_input_at_the_last_real_token(family, side, models):
    model = models[family].eval()
    assert find_features(model) == ("score", 32)
    inputs = padded(side)
    clean = snapshot(model)
    with torch.no_grad():
        tokens, logits = score_input(model, inputs)
        with FeatureTap(model) as tap:
            model(**inputs)
            z = tap.pop()
    assert tap.name == "score" and tap.pooling == "last_token" and z.shape == (6, 32)
    rows = torch.arange(6)
    assert torch.equal(z, tokens[rows, last_real_token(inputs["attention_mask"])])
    torch.testing.assert_close(model.score(z), logits, rtol=1e-5, atol=1e-6)
    assert_no_trace(model, clean)  # the model-level hook is gone with the tap


def test_positional_input_ids_and_inputs_embeds(models):
    """``input_ids`` given positionally pool the same; ``inputs_embeds`` use the last token."""
    model = models["gpt2"].eval()
    inputs = padded("right")
    with torch.no_grad(), FeatureTap(model) as tap:
        model(**inputs)
        by_name = tap.pop()
        model(inputs["input_ids"], attention_mask=inputs["attention_mask"])
        assert torch.equal(tap.pop(), by_name)
        embeds = model.transformer.wte(inputs["input_ids"])
        tokens, _ = score_input(model, {"inputs_embeds": embeds})
        assert torch.equal(tap.pop(), tokens[:, -1])


def test_gradient_reaches_the_real_tokens_only(models):
    """Through the pooled rows the backbone gets a gradient, and right padding none (causal)."""
    model = copy.deepcopy(models["gpt2"]).train()
    inputs = padded("right")
    with FeatureTap(model, when="train") as tap:
        model(**inputs)
        z = tap.pop()
    assert z.shape == (6, 32)
    z.pow(2).sum().backward()
    grad = model.transformer.wte.weight.grad  # GPT-2's embedding has no padding_idx
    real = inputs["input_ids"][inputs["attention_mask"].bool()].unique()
    assert 0 not in real.tolist() and float(grad[real].abs().sum()) > 0
    assert float(grad[0].abs().max()) == 0.0  # pad id 0 sits after every last real token


@pytest.mark.parametrize("family", FAMILIES)
def test_original_tap_and_cache_pool_the_same_token(family, models):
    model = copy.deepcopy(models[family])
    original = perturbed_copy(model)  # its features are its own
    data = tokenized(10, seed=5)
    collate = DataCollatorWithPadding(tokenizer())
    handle = attach(model, MIUConfig(mine_hidden=8, batch_size=4), num_groups=4, original=original)
    try:
        assert handle.tap.name == handle.tap_original.name == "score"
        assert handle.tap_original.pooling == "last_token" and handle.feature_dim == 32
        assert handle.cache_features(data, collate_fn=collate)
        rows = collate([dict(r) for r in data])
        inputs = {k: rows[k] for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            tokens, _ = score_input(handle.original, inputs)
        want = tokens[torch.arange(10), last_real_token(inputs["attention_mask"])]
        # Batches of 4 are padded to their own longest row; with causal attention and right
        # padding the last real token does not see the padding.
        assert handle.feature_cache.shape == (10, 32)
        torch.testing.assert_close(handle.feature_cache, want, rtol=1e-4, atol=1e-5)
    finally:
        handle.remove()


def test_prepare_trainer_unlearns_a_gpt2_classifier(models, tmp_path):
    train = tokenized(56, seed=0)
    forget_ids = [r["id"] for r in train if r["group"] == 2][:2]
    retain = train.filter(lambda r: r["id"] not in forget_ids)
    forget = train.filter(lambda r: r["id"] in forget_ids)
    net = copy.deepcopy(models["gpt2"])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    targs = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=16, use_cpu=True,
        report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0,
    )  # fmt: skip
    trainer = Trainer(
        model=net, args=targs, train_dataset=retain,
        data_collator=DataCollatorWithPadding(tokenizer()),
    )  # fmt: skip
    callback = prepare_trainer(trainer, forget, config=FAST)
    trainer.train()
    handle = callback.handle
    assert handle.tap.pooling == handle.tap_original.pooling == "last_token"
    assert handle.feature_cache is not None and handle.feature_cache.shape == (56, 32)
    assert handle.counters["forget"] > 0 and handle.counters["tune"] > 0
    assert callback.hooks.terms_added == trainer.state.global_step == 3
    calibration = [
        h["miu/calibration"] for h in trainer.state.log_history if "miu/calibration" in h
    ]
    assert calibration and all(torch.isfinite(torch.tensor(calibration)))
    assert set(net.state_dict()) == set(before)  # keys unchanged: the model is not wrapped
    assert any(not torch.equal(net.state_dict()[k], v) for k, v in before.items())
    callback.remove()


def test_accelerate_loop_caches_each_sentences_last_token(models):
    """``prepare_miu`` on Llama: the cache holds, per sentence, ``score``'s input at its last
    token when the sentence runs alone and unpadded; the MI terms then train."""
    train = tokenized(40, seed=0)
    forget_ids = [r["id"] for r in train if r["group"] == 2][:2]
    retain = train.filter(lambda r: r["id"] not in forget_ids)
    forget = train.filter(lambda r: r["id"] in forget_ids)
    collate = DataCollatorWithPadding(tokenizer())
    accelerator = Accelerator(cpu=True)
    net = copy.deepcopy(models["llama"])
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    retain_loader = reweighted_loader(retain, forget, 8, config=FAST, index=True,
                                      collate_fn=collate)  # fmt: skip
    forget_loader = DataLoader(forget, batch_size=2, collate_fn=collate)
    net, opt, retain_loader, forget_loader = accelerator.prepare(
        net, opt, retain_loader, forget_loader
    )
    miu = prepare_miu(accelerator, net, opt, retain_loader, forget_loader, config=FAST,
                      register_for_checkpointing=False)  # fmt: skip
    try:
        handle = miu.handle
        alone = []
        with torch.no_grad():
            for row in [*retain, *forget]:
                tokens, _ = score_input(
                    handle.original, {"input_ids": torch.tensor([row["input_ids"]])}
                )
                alone.append(tokens[0, -1])
        assert handle.feature_cache is not None
        torch.testing.assert_close(handle.feature_cache, torch.stack(alone), rtol=1e-4, atol=1e-5)
        miu.epoch_start(0)
        for step, batch in enumerate(retain_loader):
            out = net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            accelerator.backward(miu.retain_loss(out, batch))
            opt.step()
            opt.zero_grad()
            if step == 1:
                break
        logs = miu.pop_logs()
        assert handle.counters["forget"] > 0 and handle.counters["retain"] == 2
        assert torch.isfinite(torch.tensor(logs["miu/calibration"]))
    finally:
        miu.remove()
