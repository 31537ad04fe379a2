"""``miu_hooks.unlearn`` on tokenized text of varying length, through ``collate_fn``.

A ``datasets.Dataset`` of token ids is batched by ``DataCollatorWithPadding``
(each batch padded to its own longest sentence). Every loader of the run (the
checks, training, critic tuning, the feature cache, the guard) must use it; the
feature cache is compared with the features of each sentence run alone, unpadded.
The command line's :class:`~miu_hooks.cli.text.TrimPadding` (set-padded items cut
per batch) must give the same model as set-wide padding, within float round-off.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import pytest
import torch
from text_data import build, tokenized, tokenizer
from torch import nn
from transformers import DataCollatorWithPadding

import miu_hooks as mh
from miu_hooks.cli.text import TokenDataset, TrimPadding
from miu_hooks.config import MIUConfig, SCRUBConfig
from miu_hooks.errors import DataError

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

CFG = MIUConfig(
    epochs=2, forget_epochs=1, batch_size=8, mine_hidden=8, mine_warmup_iters=3, mine_iters=2,
    guard_samples=60, device="cpu",
)  # fmt: skip


class Spy:
    """A collator that records the padded length of every batch it makes."""

    def __init__(self, collate):
        self.collate = collate
        self.lengths: list[int] = []
        self.sizes: list[int] = []

    def __call__(self, items):
        self.sizes.append(len(items))
        batch = self.collate(items)
        ids = batch["input_ids"] if isinstance(batch, Mapping) else batch[0]["input_ids"]
        self.lengths.append(int(ids.shape[1]))
        return batch


@pytest.fixture(scope="module")
def data():
    """(retain, forget, val): forget = 2 of the sentences of group 2 (y=1, film)."""
    train = tokenized(48, seed=0)
    forget_ids = [r["id"] for r in train if r["group"] == 2][:2]
    retain = train.filter(lambda r: r["id"] not in forget_ids)
    forget = train.filter(lambda r: r["id"] in forget_ids)
    return retain, forget, tokenized(60, seed=1)


def record_caches(monkeypatch) -> list[torch.Tensor]:
    """Copies of every feature cache an MIU run fills (the run's handle is gone afterwards)."""
    from miu_hooks.engine import MIUHandle

    caches: list[torch.Tensor] = []
    fill = MIUHandle.cache_features

    def recording(self, *args, **kwargs):
        done = fill(self, *args, **kwargs)
        if self.feature_cache is not None:
            caches.append(self.feature_cache.detach().clone())
        return done

    monkeypatch.setattr(MIUHandle, "cache_features", recording)
    return caches


def alone(model, name, dataset):
    """The input of ``model.<name>`` for each sentence run alone, unpadded (a decoder's
    ``score`` sees every token: its last one)."""
    seen: list[torch.Tensor] = []
    layer = model.get_submodule(name)

    def keep(module, args, out):
        z = args[0].detach()
        seen.append(z[:, -1] if z.dim() == 3 else z)

    hook = layer.register_forward_hook(keep)
    try:
        with torch.no_grad():
            for row in dataset:
                model(input_ids=torch.tensor([row["input_ids"]]))
    finally:
        hook.remove()
    return torch.cat(seen)


@pytest.mark.parametrize(("family", "layer"), [("bert", "classifier"), ("gpt2", "score")])
def test_unlearn_batches_text_with_the_given_collator(family, layer, data, monkeypatch):
    retain, forget, val = data
    net = build(family)
    original = copy.deepcopy(net).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    caches = record_caches(monkeypatch)
    spy = Spy(DataCollatorWithPadding(tokenizer()))
    logs: list[dict[str, float]] = []
    outcomes = []
    mh.unlearn(net, retain, forget, config=CFG, num_groups=4, val=val, collate_fn=spy,
               original=original, on_epoch_end=lambda e, lg: logs.append(lg),
               on_guard=outcomes.append)  # fmt: skip
    assert len(logs) == 2 and all(
        torch.isfinite(torch.tensor(lg["miu/calibration"])) for lg in logs
    )
    assert outcomes and outcomes[0].samples == 60 and not outcomes[0].fired  # val read via spy
    assert any(not torch.equal(net.state_dict()[k], v) for k, v in before.items())
    assert len(set(spy.lengths)) > 1 and max(spy.lengths) <= 16  # padded per batch
    # The cache of D = retain then forget, filled in batches padded to their own longest
    # sentence, holds the original's features of the unpadded sentences.
    want = torch.cat([alone(original, layer, retain), alone(original, layer, forget)])
    assert len(caches) == 1
    torch.testing.assert_close(caches[0], want, rtol=1e-4, atol=1e-5)


def test_scrub_builds_its_own_loader_with_the_collator(data):
    retain, forget, _ = data
    spy = Spy(DataCollatorWithPadding(tokenizer()))
    cfg = SCRUBConfig(epochs=1, forget_epochs=1, batch_size=8, scrub_retain_batch_size=4,
                      guard=False, device="cpu")  # fmt: skip
    mh.unlearn(build("bert"), retain, forget, config=cfg, num_groups=4, collate_fn=spy)
    assert 4 in spy.sizes  # only SCRUB's own retain loader makes batches of 4 here


def test_token_lists_without_a_collator_are_refused_in_one_line(data):
    retain, forget, _ = data
    with pytest.raises(DataError, match="collate_fn=") as info:
        mh.unlearn(build("bert"), retain, forget, config=CFG, num_groups=4)
    assert "\n" not in str(info.value)


def no_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def test_trimmed_batches_give_the_set_padded_model(tmp_path):
    """TrimPadding (the command's collator) and set-wide padding train the same model."""
    from miu_hooks.cli.data_index import read_data_index

    tokenized(48, seed=0).save_to_disk(str(tmp_path / "train"))
    data = TokenDataset(read_data_index(tmp_path / "train"), pad_id=0)
    retain = torch.utils.data.Subset(data, list(range(40)))
    forget = torch.utils.data.Subset(data, list(range(40, 48)))
    cfg = MIUConfig(epochs=1, forget_epochs=1, batch_size=8, mine_hidden=8, mine_warmup_iters=3,
                    mine_iters=2, guard=False, device="cpu")  # fmt: skip
    base = no_dropout(build("bert"))
    padded, trimmed = copy.deepcopy(base), copy.deepcopy(base)
    spy = Spy(TrimPadding(0))
    mh.unlearn(padded, retain, forget, config=cfg, num_groups=4)
    mh.unlearn(trimmed, retain, forget, config=cfg, num_groups=4, collate_fn=spy)
    assert max(spy.lengths) == data.length and min(spy.lengths) < data.length  # trimmed
    for (name, a), b in zip(padded.state_dict().items(), trimmed.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
