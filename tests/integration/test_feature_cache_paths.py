"""The original model's feature cache on the Accelerate and Trainer paths.

With the cache, retain steps read T_o's scores of cached features instead of
running the original model: the original is never called during training, and
the result equals an uncached run (same draws, same batches) up to float error.
The Trainer steps also make one host read each (``benchmarks/host_syncs.py``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from miu_hooks.config import MIUConfig

pytestmark = pytest.mark.integration

_spec = importlib.util.spec_from_file_location(
    "miu_host_syncs", Path(__file__).resolve().parents[2] / "benchmarks" / "host_syncs.py"
)
assert _spec is not None and _spec.loader is not None
host_syncs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host_syncs)


@pytest.fixture
def fresh_accelerate() -> Any:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _count_calls(module: nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _accelerate_run(index: bool) -> tuple[list[float], int, Any]:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    from miu_hooks.integrations.accelerate import prepare_miu, reweighted_loader

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(72, 4, generator=gen), torch.randint(0, 2, (72,), generator=gen)
    g = y * 2 + torch.randint(0, 2, (72,), generator=gen)
    retain, forget = TensorDataset(x[8:], y[8:], g[8:]), TensorDataset(x[:8], y[:8], g[:8])
    cfg = MIUConfig(mine_hidden=16, mine_warmup_iters=4, mine_iters=2, mi_weight=5.0, seed=2)
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loader = reweighted_loader(retain, forget, 8, config=cfg, index=index)
    net, opt, loader = acc.prepare(net, opt, loader)
    miu = prepare_miu(acc, net, opt, loader, DataLoader(forget, batch_size=8), config=cfg,
                      register_for_checkpointing=False)  # fmt: skip
    calls = _count_calls(miu.handle.original)
    losses = []
    for epoch in range(2):
        miu.epoch_start(epoch)
        for batch in loader:
            loss = miu.retain_loss(net(batch[0]), batch)
            acc.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
    cache = miu.handle.feature_cache
    miu.remove()
    return losses, calls[0], cache


def test_accelerate_cache_skips_the_original_and_matches(fresh_accelerate: None) -> None:
    cached, cached_calls, cache = _accelerate_run(index=True)
    plain, plain_calls, no_cache = _accelerate_run(index=False)
    assert cache is not None and no_cache is None
    assert cache.shape == (72, 8)  # D = retain + forget, the head's 8 inputs
    assert cached_calls == 0 and plain_calls > 0
    assert torch.allclose(torch.tensor(cached), torch.tensor(plain), rtol=1e-5, atol=1e-6)


def test_accelerate_feature_cache_on_needs_indexed_batches(fresh_accelerate: None) -> None:
    from accelerate import Accelerator

    from miu_hooks.errors import ConfigError
    from miu_hooks.integrations.accelerate import prepare_miu, reweighted_loader

    ds = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)), torch.arange(16) % 4)
    cfg = MIUConfig(feature_cache="on")
    acc = Accelerator(cpu=True)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net, opt, loader = acc.prepare(net, opt, reweighted_loader(ds, ds, 4, config=cfg))
    with pytest.raises(ConfigError, match="index=True"):
        prepare_miu(acc, net, opt, loader, DataLoader(ds, batch_size=4), config=cfg)
    assert not net._forward_pre_hooks and not net[2]._forward_pre_hooks  # taps removed


class _StepReads:
    """A Trainer callback counting host reads between on_step_begin and on_step_end."""

    def __init__(self, counter: Any) -> None:
        self.counter, self.steps, self.reads, self._start = counter, 0, 0, 0

    def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
        self._start = self.counter.count

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.steps += 1
        self.reads += self.counter.count - self._start


def _trainer_run(tmp_path: Path, feature_cache: str) -> tuple[dict, int, Any, _StepReads]:
    from transformers import Trainer, TrainerCallback, TrainingArguments, ViTConfig
    from transformers import ViTForImageClassification as ViT

    from miu_hooks.data import GroupTensorDataset
    from miu_hooks.integrations.hf import as_trainer_dataset, prepare_trainer

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, 8, 8, generator=gen), torch.randint(0, 2, (40,), generator=gen)
    g = 2 * y + torch.randint(0, 2, (40,), generator=gen)
    retain = as_trainer_dataset(GroupTensorDataset(x[8:], y[8:], g[8:]))
    forget = as_trainer_dataset(GroupTensorDataset(x[:8], y[:8], g[:8]))
    torch.manual_seed(0)
    vit = ViT(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, image_size=8, patch_size=4,
                        num_labels=2))  # fmt: skip
    args = TrainingArguments(str(tmp_path / feature_cache), num_train_epochs=2,
                             per_device_train_batch_size=8, logging_steps=100, use_cpu=True,
                             report_to="none", save_strategy="no", disable_tqdm=True,
                             remove_unused_columns=False)  # fmt: skip
    counter = host_syncs.HostReadCounter()
    probe = _StepReads(counter)
    trainer = Trainer(model=vit, args=args, train_dataset=retain,
                      callbacks=[type("Probe", (TrainerCallback,), {
                          "on_step_begin": probe.on_step_begin,
                          "on_step_end": probe.on_step_end})()])  # fmt: skip
    cfg = MIUConfig(forget_epochs=1, mine_hidden=8, mine_warmup_iters=2, mine_iters=1,
                    mi_weight=5.0, feature_cache=feature_cache)  # fmt: skip
    callback = prepare_trainer(trainer, forget, config=cfg)
    calls = _count_calls(callback._original)
    with counter:
        trainer.train()
    cache = callback.handle.feature_cache
    callback.remove()
    assert trainer.train_dataset is retain  # the Trainer's own dataset is back
    weights = {k: v.detach().clone() for k, v in vit.state_dict().items()}
    return weights, calls[0], cache, probe


def test_trainer_cache_skips_the_original_matches_and_reads_once_per_step(tmp_path: Path) -> None:
    cached, cached_calls, cache, probe = _trainer_run(tmp_path, "auto")
    plain, plain_calls, no_cache, _ = _trainer_run(tmp_path, "off")
    assert cache is not None and no_cache is None and cache.shape == (40, 16)
    assert cached_calls == 1 and plain_calls > 8  # one batch filled the cache: nothing else
    for key in cached:
        assert torch.allclose(cached[key], plain[key], rtol=1e-4, atol=1e-6), key
    assert probe.steps == 8 and probe.reads == probe.steps  # one host read per step
