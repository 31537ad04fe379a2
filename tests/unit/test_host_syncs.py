"""Host reads per training step, counted on CPU (each is a device sync on a GPU).

``benchmarks/host_syncs.py`` patches the ``torch.Tensor`` methods that read a
value on the host and counts the calls made from ``miu_hooks`` code (DataLoader
and sampler internals, which only touch host tensors, are not counted). The
per-step number is the difference between two runs that differ only in the
number of epochs (or forget epochs), so one-off set-up reads (validation, the
REWEIGHT weights) cancel out.

Pinned: one read per optimiser step (fine-tuning, MIU retain and forget steps),
one per critic-tuning phase (its checks are batched, with a rollback), one per
epoch for MIU's logged means. Before these numbers were pinned the same runs
made 2.0 reads per REWEIGHT fine-tuning step and 4.2 per MIU step.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from miu_hooks import MIUConfig, TrainConfig, unlearn

pytestmark = pytest.mark.unit

_spec = importlib.util.spec_from_file_location(
    "miu_host_syncs", Path(__file__).resolve().parents[2] / "benchmarks" / "host_syncs.py"
)
assert _spec is not None and _spec.loader is not None
host_syncs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host_syncs)
HostReadCounter = host_syncs.HostReadCounter

N_RETAIN, N_FORGET, BS = 128, 32, 16
RETAIN_STEPS, FORGET_STEPS = math.ceil(N_RETAIN / BS), math.ceil(N_FORGET / BS)


def _data() -> tuple[TensorDataset, TensorDataset]:
    gen = torch.Generator().manual_seed(0)
    n = N_RETAIN + N_FORGET
    x, y = torch.randn(n, 4, generator=gen), torch.randint(0, 2, (n,), generator=gen)
    g = y * 2 + torch.randint(0, 2, (n,), generator=gen)
    return TensorDataset(x[N_FORGET:], y[N_FORGET:], g[N_FORGET:]), TensorDataset(
        x[:N_FORGET], y[:N_FORGET], g[:N_FORGET]
    )


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))


def _reads(method: str, cfg: TrainConfig) -> Any:
    cfg = cfg.replace(guard=False)  # the guard's evaluation adds reads per epoch, not per step
    retain, forget = _data()
    with HostReadCounter() as reads:
        unlearn(_net(), retain, forget, config=cfg, num_groups=4, method=method)
    return reads


def test_counter_sees_reads_from_library_code_only() -> None:
    from miu_hooks.functional import check_group_range

    before = {name: getattr(torch.Tensor, name) for name in host_syncs.READS}
    with HostReadCounter() as reads:
        check_group_range(torch.tensor([0, 1]), 2)  # one bool() inside miu_hooks
        bool(torch.tensor(True))  # this test's own read: not counted
        list(DataLoader(range(4), batch_size=2))  # loader internals: not counted
    assert reads.count == 1, reads.report()
    assert {name: getattr(torch.Tensor, name) for name in host_syncs.READS} == before


def test_reweight_finetune_reads_once_per_step() -> None:
    cfg = TrainConfig(epochs=2, batch_size=BS, device="cpu")
    short = _reads("finetune_reweight", cfg)
    long = _reads("finetune_reweight", cfg.replace(epochs=4))
    assert long.count - short.count == 2 * RETAIN_STEPS, long.report()


def test_miu_reads_once_per_step_tuning_phase_and_epoch_log() -> None:
    cfg = MIUConfig(epochs=2, forget_epochs=1, batch_size=BS, mine_hidden=16,
                    mine_warmup_iters=5, mine_iters=3, device="cpu")  # fmt: skip
    short, long = _reads("miu", cfg), _reads("miu", cfg.replace(epochs=4))
    # Each extra epoch: one read per retain step, one for its 3 tuning steps, one for the logs.
    assert long.count - short.count == 2 * (RETAIN_STEPS + 1 + 1), long.report()
    more_forget = _reads("miu", cfg.replace(epochs=4, forget_epochs=2))
    assert more_forget.count - long.count == FORGET_STEPS, more_forget.report()


def test_other_methods_read_once_per_step() -> None:
    from miu_hooks.config import SCRUBConfig

    for method, cfg, steps_per_epoch in (
        ("neggrad", TrainConfig(epochs=1, batch_size=BS, device="cpu"), FORGET_STEPS),
        ("random_labels", TrainConfig(epochs=1, batch_size=BS, device="cpu"),
         FORGET_STEPS + RETAIN_STEPS),
        ("scrub", SCRUBConfig(epochs=1, forget_epochs=0, batch_size=BS,
                              scrub_retain_batch_size=BS, device="cpu"), RETAIN_STEPS),
    ):  # fmt: skip
        short, long = _reads(method, cfg), _reads(method, cfg.replace(epochs=3))
        assert long.count - short.count == 2 * steps_per_epoch, (method, long.report())


def test_accelerate_loop_reads_once_per_retain_step(fresh_accelerate: None) -> None:
    pytest.importorskip("accelerate")
    from accelerate import Accelerator

    from miu_hooks.integrations.accelerate import prepare_miu, reweighted_loader

    retain, forget = _data()
    cfg = MIUConfig(batch_size=BS, mine_hidden=16, mine_warmup_iters=4, mine_iters=2)
    acc = Accelerator(cpu=True)
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for index in (False, True):  # without and with the feature cache
        retain_loader = reweighted_loader(retain, forget, BS, config=cfg, index=index)
        model, optimizer, loader = acc.prepare(net, opt, retain_loader)
        miu = prepare_miu(acc, model, optimizer, loader, DataLoader(forget, batch_size=BS),
                          config=cfg, register_for_checkpointing=False)  # fmt: skip
        assert (miu.handle.feature_cache is not None) == index
        with HostReadCounter() as reads:
            miu.epoch_start(0)
        assert reads.count == FORGET_STEPS + 1, reads.report()  # forget steps + tuning phase
        with HostReadCounter() as reads:
            for batch in loader:
                loss = miu.retain_loss(model(batch[0]), batch)
                acc.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
        assert reads.count == RETAIN_STEPS, reads.report()
        with HostReadCounter() as reads:
            logs = miu.pop_logs()
        assert reads.count == 1 and "miu/calibration" in logs
        miu.remove()


@pytest.fixture
def fresh_accelerate() -> Any:
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
