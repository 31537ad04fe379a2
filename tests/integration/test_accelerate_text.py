"""Tokenized text of varying length in a raw Accelerate loop, with no ``tune_loader``.

The data is a ``datasets.Dataset`` of token ids of varying length; the user's
loaders batch it with ``DataCollatorWithPadding``. ``prepare_miu`` builds the
critic-tuning loader, the feature-cache loader and the guard's loader itself, and
batches them with the retain loader's collator (or an explicit ``collate_fn=``).
The cached original features are checked against the original model run on each
sentence alone, unpadded. The model is a tiny BERT from a config.
"""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import Accelerator
from text_data import build, tokenized, tokenizer
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from miu_hooks.config import MIUConfig
from miu_hooks.integrations.accelerate import prepare_miu, reweighted_loader

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

CFG = MIUConfig(
    forget_epochs=1, mine_hidden=8, mine_warmup_iters=2, mine_iters=1, batch_size=8, seed=0
)
FORWARD_KEYS = ("input_ids", "attention_mask")


class Spy:
    """A collator that records, per call, the items' positions (``None`` when not indexed)."""

    def __init__(self, collate):
        self.collate = collate
        self.calls: list[list[int | None]] = []

    def __call__(self, items):
        self.calls.append([item.get("__index__") for item in items])
        return self.collate(items)


@pytest.fixture(scope="module")
def model():
    return build("bert")


@pytest.fixture(scope="module")
def data():
    """(retain, forget, val, collator): forget = 2 of the sentences of group 2 (y=1, film)."""
    train = tokenized(40, seed=0)
    forget_ids = [r["id"] for r in train if r["group"] == 2][:2]
    assert len(forget_ids) == 2
    retain = train.filter(lambda r: r["id"] not in forget_ids)
    forget = train.filter(lambda r: r["id"] in forget_ids)
    assert len({len(r["input_ids"]) for r in train}) > 1  # lengths vary: batches need padding
    return retain, forget, tokenized(16, seed=1), DataCollatorWithPadding(tokenizer())


def loaders(accelerator, net, data, collate):
    retain, forget, val, _ = data
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    retain_loader = reweighted_loader(
        retain, forget, 8, config=CFG, val=val, index=True, collate_fn=collate
    )
    forget_loader = DataLoader(forget, batch_size=2, collate_fn=collate)
    return accelerator.prepare(net, opt, retain_loader, forget_loader)


def alone(original, dataset):
    """The input of the original's ``classifier`` for each sentence run alone, unpadded."""
    seen: list[torch.Tensor] = []
    hook = original.classifier.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    try:
        with torch.no_grad():
            for row in dataset:
                original(**{k: torch.tensor([row[k]]) for k in FORWARD_KEYS})
    finally:
        hook.remove()
    return torch.cat(seen)


def test_raw_loop_on_padded_text_uses_the_retain_loaders_collator(model, data):
    retain, forget, val, collate = data
    accelerator = Accelerator(cpu=True)
    net, opt, retain_loader, forget_loader = loaders(accelerator, copy.deepcopy(model), data,
                                                     collate)  # fmt: skip
    miu = prepare_miu(accelerator, net, opt, retain_loader, forget_loader, config=CFG, val=val,
                      register_for_checkpointing=False)  # fmt: skip
    handle = miu.handle
    try:
        # The cache was filled in batches padded to their own longest sentence; the mask makes
        # the features those of the unpadded sentences (D = retain, then forget).
        cache = handle.feature_cache
        assert cache is not None and cache.shape == (len(retain) + len(forget), 32)
        want = torch.cat([alone(handle.original, retain), alone(handle.original, forget)])
        torch.testing.assert_close(cache, want, rtol=1e-4, atol=1e-5)

        lengths: list[int] = []
        for epoch in range(2):
            miu.epoch_start(epoch)
            for step, batch in enumerate(retain_loader):
                lengths.append(int(batch["input_ids"].shape[1]))
                out = net(**{k: batch[k] for k in FORWARD_KEYS})
                accelerator.backward(miu.retain_loss(out, batch))
                opt.step()
                opt.zero_grad()
                if step == 2:
                    break
            if not miu.epoch_end(epoch):  # the guard read val through the collator
                break
        logs = miu.pop_logs()
        epochs = len(miu.guard.outcome.accuracies) if miu.guard is not None else 0
        assert miu.guard.outcome.samples == len(val) and epochs >= 1
        assert handle.counters["forget"] > 0 and handle.counters["tune"] > 0
        assert handle.counters["retain"] == 3 * epochs
        assert torch.isfinite(torch.tensor(logs["miu/calibration"]))
        assert len(set(lengths)) > 1  # padded per batch, not to one length
    finally:
        miu.remove()


def test_explicit_collate_fn_batches_the_loaders_prepare_miu_builds(model, data):
    retain, forget, val, collate = data
    accelerator = Accelerator(cpu=True)
    net, opt, retain_loader, forget_loader = loaders(accelerator, copy.deepcopy(model), data,
                                                     collate)  # fmt: skip
    spy = Spy(collate)
    miu = prepare_miu(accelerator, net, opt, retain_loader, forget_loader, config=CFG, val=val,
                      collate_fn=spy, register_for_checkpointing=False)  # fmt: skip
    try:
        size = len(retain) + len(forget)
        cached = sorted(i for call in spy.calls for i in call if i is not None)
        assert cached == list(range(size))  # the feature cache: every sample of D once
        guarded = sum(len(call) for call in spy.calls if call[0] is None)
        assert guarded == len(val)  # the guard read the original's accuracy on val
        before = len(spy.calls)
        miu.epoch_start(0)
        tuned = spy.calls[before:]  # the forget loader is the user's: only tuning batches here
        assert tuned and all(i is not None for call in tuned for i in call)
        assert miu.handle.counters["tune"] > 0
    finally:
        miu.remove()
