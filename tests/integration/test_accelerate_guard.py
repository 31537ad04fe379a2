"""The collapse guard in a raw Accelerate loop: ``miu.epoch_end`` restores and says stop."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from miu_hooks import CollapseWarning, MIUConfig
from miu_hooks.data import GroupTensorDataset
from miu_hooks.integrations.accelerate import prepare_miu, reweighted_loader
from miu_hooks.integrations.loaders import index_sampler

pytestmark = pytest.mark.integration

CFG = MIUConfig(epochs=3, forget_epochs=1, mine_hidden=8, mine_warmup_iters=2, mine_iters=1)


def _setup(n: int = 1200) -> tuple[nn.Module, GroupTensorDataset, ...]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(n, 4)
    with torch.no_grad():  # labels are the net's own predictions: the original is exact
        d = net(x)[:, 1] - net(x)[:, 0]
        net[2].bias[1] -= d.median()
        y = net(x).argmax(-1)
    g = 2 * y + (x[:, 1] > 0).long()
    forget = torch.nonzero(g == 3).reshape(-1)[:30]
    keep = torch.ones(n, dtype=torch.bool)
    keep[forget] = False
    keep[1000:] = False
    full = GroupTensorDataset(x, y, g)
    sets = [GroupTensorDataset(*(t[i] for t in full.tensors))
            for i in (torch.nonzero(keep).reshape(-1), forget, torch.arange(1000, n))]  # fmt: skip
    return net, *sets


def _loop(val: bool, wreck_at: int | None):
    net, retain, forget, val_ds = _setup()
    accelerator = Accelerator(cpu=True)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4)
    guard_val = val_ds if val else None
    retain_loader = reweighted_loader(retain, forget, 64, config=CFG, val=guard_val)
    forget_loader = DataLoader(forget, batch_size=64)
    net, opt, retain_loader, forget_loader = accelerator.prepare(net, opt, retain_loader,
                                                                 forget_loader)  # fmt: skip
    miu = prepare_miu(accelerator, net, opt, retain_loader, forget_loader, config=CFG,
                      val=guard_val, register_for_checkpointing=False)  # fmt: skip
    snaps = []
    for epoch in range(CFG.epochs):
        miu.epoch_start(epoch)
        if epoch == wreck_at:
            with torch.no_grad():
                net[2].bias[0] += 1e4
        for xb, yb, gb in retain_loader:
            loss = miu.retain_loss(net(xb), (xb, yb, gb))
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
        if not miu.epoch_end(epoch):
            break
        snaps.append({k: v.clone() for k, v in net.state_dict().items()})
    miu.remove()
    return net, miu, snaps, retain_loader


def test_epoch_end_restores_the_last_good_epoch_and_says_stop():
    with pytest.warns(CollapseWarning, match="after epoch 1"):
        net, miu, snaps, _ = _loop(val=True, wreck_at=1)
    outcome = miu.guard.outcome
    assert outcome.fired and outcome.restored_epoch == 0 and outcome.source == "val"
    assert len(snaps) == 1 and all(torch.equal(v, snaps[0][k]) for k, v in net.state_dict().items())


def test_without_val_the_loader_holds_the_guard_slice_out_of_the_draw():
    _, miu, snaps, loader = _loop(val=False, wreck_at=None)
    outcome = miu.guard.outcome
    assert outcome.source == "retain" and not outcome.fired and len(snaps) == CFG.epochs
    sampler = index_sampler(loader)
    excluded = set(miu.guard.data.indices)
    assert excluded == set(sampler.excluded.tolist()) and len(excluded) >= 50
    assert not set(sampler.draw().tolist()) & excluded
