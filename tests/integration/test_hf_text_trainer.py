"""Tokenized ``datasets`` text through ``MIUCallback``, ``prepare_trainer`` and ``MIUTrainer``.

The data is a ``datasets.Dataset`` of token ids of varying length with an int
``group`` column; the Trainer batches it with ``DataCollatorWithPadding``
(dynamic padding), and the callback's own loaders (forget pass, critic tuning,
feature cache) use the same collator. The model is a tiny RoBERTa, whose head is
composite (features: the input of ``classifier.out_proj``). Evaluation metrics
(``make_compute_metrics`` in the Trainer, :func:`miu_hooks.evaluate`) are checked
against accuracies computed by hand from the model's logits.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from model_trace import assert_no_trace, snapshot
from text_data import build, tokenized, tokenizer
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from miu_hooks import evaluate
from miu_hooks.config import MIUConfig
from miu_hooks.integrations.hf import (
    MIUCallback,
    MIUTrainer,
    find_features,
    make_compute_metrics,
    prepare_trainer,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

FAST = MIUConfig(forget_epochs=1, mine_hidden=8, mine_warmup_iters=2, mine_iters=1)


@pytest.fixture(scope="module")
def model():
    return build("roberta")


@pytest.fixture(scope="module")
def data():
    """(retain, forget, test, collator): forget = 2 of the 3 sentences of group 2 (y=1, film)."""
    train = tokenized(56, seed=0)
    forget_ids = [r["id"] for r in train if r["group"] == 2][:2]
    assert len(forget_ids) == 2
    retain = train.filter(lambda r: r["id"] not in forget_ids)
    forget = train.filter(lambda r: r["id"] in forget_ids)
    return retain, forget, tokenized(24, seed=1), DataCollatorWithPadding(tokenizer())


def args(tmp_path, **extra):
    return TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=16,
        use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True,
        logging_steps=1, seed=0, **extra,
    )  # fmt: skip


def record_lengths(net):
    """Sequence lengths of the training forwards (a pre-hook; returns (lengths, handle))."""
    lengths: list[int] = []

    def hook(module, a, kw):
        if module.training and torch.is_grad_enabled():
            lengths.append(int(kw["input_ids"].shape[1]))

    return lengths, net.register_forward_pre_hook(hook, with_kwargs=True)


def by_hand(net, dataset, collate):
    """Predictions, labels and groups of ``net`` on ``dataset``, batched in one padded batch."""
    rows = collate([dict(r) for r in dataset])
    net.eval()
    with torch.no_grad():
        logits = net(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
    return logits.argmax(-1).numpy(), rows["labels"].numpy(), rows["group"].numpy()


def check_run(callback, trainer, lengths):
    assert callback.handle.tap.name == callback.handle.tap_original.name == "classifier.out_proj"
    assert callback.handle.feature_dim == 32
    assert callback.handle.counters["forget"] > 0
    assert callback.hooks.terms_added == trainer.state.global_step == 3  # max_steps
    assert any("miu/calibration" in h for h in trainer.state.log_history)
    assert len(set(lengths)) > 1 and max(lengths) <= 16  # padded per batch, not to one length


def test_callback_in_trainer_with_dynamic_padding(model, data, tmp_path):
    retain, forget, _, collate = data
    net = copy.deepcopy(model)
    clean = snapshot(net)
    callback = MIUCallback(forget, config=FAST)
    trainer = Trainer(
        model=net, args=args(tmp_path, max_steps=3), train_dataset=retain,
        data_collator=collate, callbacks=[callback],
    )  # fmt: skip
    lengths, handle = record_lengths(net)
    try:
        trainer.train()
    finally:
        handle.remove()
    check_run(callback, trainer, lengths)
    assert callback.handle.feature_cache is None  # the callbacks= route runs the original
    callback.remove()
    assert_no_trace(net, clean)


def test_prepare_trainer_caches_features_through_the_collator(model, data, tmp_path):
    retain, forget, test, collate = data
    net = copy.deepcopy(model)
    trainer = Trainer(
        model=net, args=args(tmp_path, max_steps=3), train_dataset=retain,
        data_collator=collate,
    )  # fmt: skip
    callback = prepare_trainer(trainer, forget, config=FAST)
    lengths, handle = record_lengths(net)
    try:
        trainer.train()
    finally:
        handle.remove()
    check_run(callback, trainer, lengths)
    cache = callback.handle.feature_cache
    assert cache is not None and cache.shape == (len(retain) + len(forget), 32)
    callback.remove()
    assert trainer.train_dataset is retain  # the Trainer's own dataset is back


def test_miu_trainer_evaluates_text_with_group_metrics(model, data, tmp_path):
    retain, forget, test, collate = data
    net = copy.deepcopy(model)
    trainer = MIUTrainer(
        model=net, args=args(tmp_path, max_steps=3), train_dataset=retain,
        eval_dataset=test, data_collator=collate, forget_dataset=forget, miu_config=FAST,
        compute_metrics=make_compute_metrics(test, forget_groups=[2]),  # groups read off test
    )  # fmt: skip
    lengths, handle = record_lengths(net)
    try:
        trainer.train()
    finally:
        handle.remove()
    check_run(trainer.miu, trainer, lengths)
    metrics = trainer.evaluate()
    trainer.miu.remove()

    pred, y, g = by_hand(net, test, collate)
    assert metrics["eval_miu/accuracy"] == pytest.approx(100 * np.mean(pred == y))
    for group in range(4):
        mask = g == group
        assert metrics[f"eval_miu/group_{group}_acc"] == pytest.approx(
            100 * np.mean(pred[mask] == y[mask])
        )
    assert metrics["eval_miu/forget_group_acc"] == metrics["eval_miu/group_2_acc"]

    report = evaluate(
        net, retain=retain, forget=forget, test=test, forget_groups=[2], collate_fn=collate
    )
    assert report["TA"] == pytest.approx(metrics["eval_miu/accuracy"])
    pred_f, y_f, _ = by_hand(net, forget, collate)
    assert report["FA"] == pytest.approx(100 * np.mean(pred_f == y_f))
    assert report.per_group == {
        k: pytest.approx(metrics[f"eval_miu/group_{k}_acc"]) for k in range(4)
    }


def test_find_features_on_the_text_model(model):
    assert find_features(model) == ("classifier.out_proj", 32)
