"""No training-mode pass feeds the model a batch of one sample (BatchNorm cannot train on it).

A last batch of one joins the batch before it (``TrainBatchSampler``), for the
retain, forget and critic-tuning passes of every method; sets of k·B + 1 samples
and a BatchNorm model run to the end. A set of a single sample (or a batch size
of 1) cannot be merged: ``validate`` refuses it when the model cannot train on one
sample, and lets it through when it can (BatchNorm2d over several pixels).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from miu_hooks import GroupTensorDataset, ModelError, unlearn, validate
from miu_hooks.methods import available_methods, config_class

pytestmark = pytest.mark.unit

B = 8


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))


def data(n: int, seed: int) -> GroupTensorDataset:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    return GroupTensorDataset(torch.randn(n, 4, generator=gen), y, 2 * y + (torch.arange(n) % 2))


def config(method: str, **kw):
    if method == "miu":
        kw.update(mine_hidden=8, mine_warmup_iters=3, mine_iters=2)
    # guard=False: the collapse guard would hold retain samples out and change the set sizes
    return config_class(method)(**{"epochs": 2, "batch_size": B, "device": "cpu", "guard": False,
                                   **kw})  # fmt: skip


def training_batch_sizes(model: nn.Module) -> list[int]:
    sizes: list[int] = []
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    bn.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])) if m.training else None)
    return sizes


# retain, forget (tuning runs on both: 4B+1 + B gives 5B+1, 4B + B+1 too)
SIZES = {"retain+forget": (4 * B + 1, B + 1), "retain+tune": (4 * B + 1, B),
         "forget+tune": (4 * B, B + 1)}  # fmt: skip


@pytest.mark.parametrize("sizes", sorted(SIZES))
@pytest.mark.parametrize("method", available_methods())
def test_sets_of_k_batches_plus_one_train_a_batchnorm_model(method: str, sizes: str) -> None:
    n_retain, n_forget = SIZES[sizes]
    model = bn_net()
    seen = training_batch_sizes(model)
    unlearn(model, data(n_retain, 0), data(n_forget, 1), config=config(method), method=method,
            num_groups=4)  # fmt: skip
    assert seen and min(seen) >= 2, (method, sorted(set(seen)))


def test_the_single_sample_joins_the_last_batch_and_every_sample_is_seen() -> None:
    from miu_hooks.sampling import TrainBatchSampler

    model = bn_net()
    seen = training_batch_sizes(model)
    unlearn(model, data(4 * B + 1, 0), data(B, 1), config=config("finetune"), method="finetune",
            num_groups=4)  # fmt: skip
    assert seen == [B, B, B, B + 1] * 2  # two epochs of the 33 retain samples
    assert [len(b) for b in TrainBatchSampler(range(17), 8)] == [8, 9]
    assert [len(b) for b in TrainBatchSampler(range(17), 8, merge_single=False)] == [8, 8, 1]
    assert [len(b) for b in TrainBatchSampler(range(18), 8)] == [8, 8, 2]
    assert [len(b) for b in TrainBatchSampler(range(1), 8)] == [1]
    assert len(TrainBatchSampler(range(17), 8)) == 2 and len(TrainBatchSampler(range(1), 8)) == 1


def test_a_set_of_one_sample_is_refused_when_the_model_cannot_train_on_one() -> None:
    retain, forget = data(4 * B, 0), data(1, 1)
    problems = validate(bn_net(), retain, forget, config("finetune"), method="finetune")
    assert [type(p) for p in problems] == [ModelError]
    assert "the forget set has one sample" in str(problems[0])
    assert "at least 2 samples" in str(problems[0])
    problems = validate(bn_net(), retain, data(B, 1), config("miu", batch_size=1))
    assert [type(p) for p in problems] == [ModelError] and "batch_size >= 2" in str(problems[0])
    with pytest.raises(ModelError, match="forget set has one sample"):
        unlearn(bn_net(), retain, forget, config=config("finetune"), method="finetune")
    # Without BatchNorm (or when BatchNorm sees several pixels) one sample is fine.
    plain = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    assert validate(plain, retain, forget, config("finetune"), method="finetune") == []


def test_batchnorm2d_over_several_pixels_may_train_on_one_sample() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Flatten(), nn.Linear(64, 2))  # fmt: skip
    y = torch.tensor([0, 1] * 8)
    retain = GroupTensorDataset(torch.randn(16, 1, 4, 4), y, 2 * y)
    forget = GroupTensorDataset(torch.randn(1, 1, 4, 4), y[:1], 2 * y[:1])
    cfg = config("finetune")
    assert validate(net, retain, forget, cfg, method="finetune") == []
    unlearn(net, retain, forget, config=cfg, method="finetune")
    assert all(torch.isfinite(p).all() for p in net.parameters())
