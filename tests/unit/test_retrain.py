"""Retrain means retrain: the model is re-initialised (seeded) unless told to keep it."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn
from toy_problem import toy_net, toy_split

from miu_hooks import RetrainConfig, TrainConfig, reinitialize, unlearn

pytestmark = pytest.mark.unit

LOOP = TrainConfig(epochs=2, batch_size=16, lr=0.05, device="cpu", guard=False)


def _trained() -> nn.Module:
    """The toy net after a few steps of training: weights far from any fresh init."""
    full, _, _ = toy_split()
    net = toy_net(bn=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    x, y, _ = full.tensors
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([v.detach().float().reshape(-1) for v in model.state_dict().values()])


def test_retrain_does_not_fine_tune_the_given_weights():
    _, retain, forget = toy_split()
    trained = _trained()
    ft = unlearn(copy.deepcopy(trained), retain, forget, config=LOOP, method="finetune")
    rt = unlearn(copy.deepcopy(trained), retain, forget, config=LOOP, method="retrain")
    kept = unlearn(copy.deepcopy(trained), retain, forget, method="retrain",
                   config=RetrainConfig(**{**LOOP.to_dict(), "reinit": False}))  # fmt: skip
    assert not torch.allclose(_flat(ft), _flat(rt))
    assert torch.equal(_flat(kept), _flat(ft))  # reinit=False: the loop of fine-tuning
    # A fresh start: retraining forgets the trained weights, so the first layer of the
    # retrained model is closer to a fresh init's scale than to the trained one.
    assert (rt[0].weight - trained[0].weight).abs().mean() > 0.1


def test_same_seed_same_init_other_seed_other_init():
    a, b, c = _trained(), _trained(), _trained()
    assert reinitialize(a, seed=0) == [] and reinitialize(b, seed=0) == []
    reinitialize(c, seed=1)
    assert torch.equal(_flat(a), _flat(b)) and not torch.equal(_flat(a), _flat(c))
    # Every reset module is back to its fresh state: BatchNorm's statistics included.
    bn = a[1]
    assert isinstance(bn, nn.BatchNorm1d)
    assert torch.equal(bn.running_mean, torch.zeros(12)) and int(bn.num_batches_tracked) == 0


def test_reinitialize_keeps_the_caller_rng_and_names_what_it_cannot_reset(caplog):
    class WithToken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.token = nn.Parameter(torch.ones(3))
            self.head = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x + self.token)

    net = WithToken()
    state = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="miu_hooks.methods.retrain"):
        missed = reinitialize(net, seed=0)
    assert missed == ["token"] and "token" in caplog.text
    assert torch.equal(net.token.detach(), torch.ones(3))
    assert torch.equal(torch.get_rng_state(), state)


def test_retrain_runs_are_seeded():
    _, retain, forget = toy_split()
    runs = [
        unlearn(_trained(), retain, forget, config=LOOP.replace(seed=s), method="retrain_reweight")
        for s in (0, 0, 1)
    ]
    assert torch.equal(_flat(runs[0]), _flat(runs[1]))
    assert not torch.equal(_flat(runs[0]), _flat(runs[2]))
