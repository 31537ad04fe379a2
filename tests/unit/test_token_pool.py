"""``LastTokenPool`` on a torch-only stand-in for a decoder classifier (no transformers).

The stand-in embeds tokens, applies ``score`` to every token and keeps the logits at the
last non-padding token, with the same rule as Hugging Face's decoder classifiers. Its
positions are checked against ones written out by hand.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from miu_hooks.taps import FeatureTap
from miu_hooks.token_pool import LastTokenPool, pools_after_logits


class Config:
    def __init__(self, pad_token_id: int | None) -> None:
        self.pad_token_id = pad_token_id


class TinyForSequenceClassification(nn.Module):
    def __init__(self, pad_token_id: int | None = 0) -> None:
        super().__init__()
        self.config = Config(pad_token_id)
        self.embed = nn.Embedding(10, 4)
        self.score = nn.Linear(4, 3)

    def forward(self, input_ids=None, inputs_embeds=None):
        hidden = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        logits = self.score(hidden)
        if self.config.pad_token_id is None or input_ids is None:
            last = torch.full((hidden.shape[0],), hidden.shape[1] - 1)
        else:
            last = torch.tensor(
                [
                    max(i for i, t in enumerate(row) if t != self.config.pad_token_id)
                    for row in input_ids.tolist()
                ]
            )
        return logits[torch.arange(hidden.shape[0]), last]


IDS = torch.tensor([[4, 5, 0, 0], [0, 0, 7, 8], [1, 2, 3, 9], [0, 6, 0, 0]])
LAST = [1, 3, 3, 1]  # by hand: right, left, no padding, padding on both sides


def test_positions_are_the_last_non_pad_tokens():
    net = TinyForSequenceClassification()
    pool = LastTokenPool(net)
    net(input_ids=IDS)
    assert pool.positions(4, 4, torch.device("cpu")).tolist() == LAST
    hidden = torch.randn(4, 4, 5)
    assert torch.equal(pool(hidden), hidden[torch.arange(4), torch.tensor(LAST)])
    assert torch.equal(pool(hidden), hidden[:, -1])  # the ids were used: no forward, last token
    assert torch.equal(pool(hidden[:, 0]), hidden[:, 0])  # a [B, d] tensor passes unchanged
    pool.remove()
    pool.remove()  # idempotent
    assert len(net._forward_pre_hooks) == 0


@pytest.mark.parametrize("pad", [None, 0])
def test_no_pad_id_or_no_input_ids_take_the_last_position(pad):
    net = TinyForSequenceClassification(pad_token_id=pad)
    pool = LastTokenPool(net)
    if pad is None:
        net(input_ids=IDS)
    else:
        net(inputs_embeds=torch.randn(4, 4, 4))
    assert pool.positions(4, 4, torch.device("cpu")).tolist() == [3, 3, 3, 3]
    net(input_ids=IDS)
    assert pool.positions(4, 6, torch.device("cpu")).tolist() == [5] * 4  # ids of another shape
    pool.remove()


def test_tap_features_reproduce_the_pooled_logits():
    net = TinyForSequenceClassification()
    with FeatureTap(net) as tap:
        logits = net(input_ids=IDS)
        z = tap.pop()
        assert tap.name == "score" and tap.pooling == "last_token"
    assert z.shape == (4, 4)
    torch.testing.assert_close(net.score(z), logits)
    assert len(net._forward_pre_hooks) == 0 and len(net.score._forward_pre_hooks) == 0


def test_only_the_score_layer_of_a_sequence_classifier_pools():
    net = TinyForSequenceClassification()
    assert pools_after_logits(net, net.score)
    assert not pools_after_logits(net, net.embed)
    plain = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    assert not pools_after_logits(plain, plain[1])
    with FeatureTap(plain) as tap:
        assert tap.pooling is None
        plain(torch.randn(2, 4))
        assert tap.pop().shape == (2, 4)
