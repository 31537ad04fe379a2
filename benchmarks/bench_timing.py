"""Timing: per-phase wall time of a run and the MIU retain-step overhead."""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from bench_models import flop_bound, linear_macs, train_original
from bench_settings import Settings, base_config, load_data, train_config
from torch import nn
from torch.utils.data import DataLoader

from miu_hooks import attach, unlearn
from miu_hooks.data import IndexedDataset, forward_logits, split_batch
from miu_hooks.demo import ColoredSplits
from miu_hooks.functional import checked_cross_entropy
from miu_hooks.sampling import GroupReweightSampler
from miu_hooks.splits import forget_split, subset
from miu_hooks.unlearn import build_optimizer


class PhaseTimer:
    """A ``progress`` wrapper timing each pass (first item to exhaustion, loop body included)."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.steps: dict[str, list[int]] = defaultdict(list)

    def __call__(self, it: Iterable[Any], desc: str) -> Iterator[Any]:
        phase = desc.rsplit(" ", 1)[-1] if desc.startswith("epoch ") else desc
        start, n = time.perf_counter(), 0
        for item in it:
            yield item
            n += 1
        self.seconds[phase].append(time.perf_counter() - start)
        self.steps[phase].append(n)


def step_overhead(model_fn: Callable[[int], nn.Module], data: ColoredSplits, s: Settings,
                  seed: int = 0, ratio: float = 0.5, steps: int | None = None,
                  reps: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Median retain-epoch time: plain CE vs MIU (cache on / off), interleaved on the same batches.

    Each of ``reps`` repetitions (after one warm-up) runs one epoch of each variant
    over the same ``steps`` REWEIGHT-sampled retain batches, in rotating order; the
    MIU step is the engine's (``MIUHandle.retain_loss``).
    """
    steps = s.overhead_steps if steps is None else steps
    reps = s.overhead_epochs if reps is None else reps
    r_idx, _ = forget_split(data.train, forget_groups=(s.forget_group,), ratio=ratio,
                                seed=seed)  # fmt: skip
    retain = subset(data.train, r_idx)
    sampler = GroupReweightSampler(retain.groups, data.train.groups, num_groups=4, seed=seed)
    loader = DataLoader(IndexedDataset(retain), batch_size=s.batch_size, sampler=sampler)
    batches = [split_batch(raw) for raw in loader][:steps]
    original = model_fn(seed).eval()
    cfg = base_config(s, seed)  # MIU's (REWEIGHT on)
    variants: dict[str, Any] = {}
    for name in ("ce", "miu_cache", "miu_nocache"):
        model = copy.deepcopy(original).train()
        opt = build_optimizer(model, cfg)
        handle = None
        if name != "ce":
            handle = attach(model, cfg, num_groups=4, original=copy.deepcopy(original))
            if name == "miu_cache":
                cache_loader = DataLoader(IndexedDataset(retain), batch_size=256)
                handle.build_feature_cache(cache_loader, len(retain))
        variants[name] = (model, opt, handle)
    times: dict[str, list[float]] = defaultdict(list)
    names = list(variants)
    for rep in range(reps + 1):  # the first repetition is a warm-up
        for name in names[rep % 3 :] + names[: rep % 3]:  # rotate the order: no position bias
            model, opt, handle = variants[name]
            start = time.perf_counter()
            for b in batches:
                logits = forward_logits(model, b.inputs)
                loss = (handle.retain_loss(logits, b) if handle is not None
                        else checked_cross_entropy(logits, b.labels))  # fmt: skip
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            times[name].append(time.perf_counter() - start)
    for _m, _o, handle in variants.values():
        if handle is not None:
            handle.remove()
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    # Paired ratios (the epochs of one repetition ran back to back under the same load).
    paired = {k: statistics.median(a / c for a, c in zip(times[k][1:], times["ce"][1:],
                                                         strict=True))
              for k in ("miu_cache", "miu_nocache")}  # fmt: skip
    params = sum(p.numel() for p in original.parameters())
    head = [m for m in original.modules() if isinstance(m, nn.Linear)][-1]
    macs = linear_macs(original, tuple(batches[0].inputs.shape[1:]))  # type: ignore[union-attr]
    bound, bound_nocache = flop_bound(macs, head.in_features, 4, cfg.mine_hidden)
    return dict(steps=len(batches), params=params, macs=macs, flop_bound=bound,
                flop_bound_nocache=bound_nocache, feature_dim=head.in_features, epoch_s=med,
                ratio_cache=paired["miu_cache"], ratio_nocache=paired["miu_nocache"],
                reps=reps)  # fmt: skip


def whole_run(model_fn: Callable[[int], nn.Module], s: Settings, size: int = 16,
              ratio: float = 0.5) -> dict[str, Any]:  # fmt: skip
    """Wall time of whole ``unlearn`` runs on one backbone: MIU vs Retrain+REWEIGHT.

    Per seed of ``s.timing_seeds``: Colored digits at ``size`` px (one copy per
    image), an original trained for 2 epochs (compute does not depend on the
    weights), then MIU, Finetune+REWEIGHT and Retrain+REWEIGHT with the benchmark's
    recipes, in an order rotated per seed. Returns per-seed seconds and ratios.
    """
    s_data = dataclasses.replace(s, size=size, digits_copies=1)
    runs: dict[str, list[float]] = defaultdict(list)
    order = ["miu", "finetune_reweight", "retrain_reweight"]
    for k, seed in enumerate(s.timing_seeds):
        data = load_data("digits", seed, s_data)
        r_idx, f_idx = forget_split(data.train, forget_groups=(s.forget_group,), ratio=ratio,
                                    seed=seed)  # fmt: skip
        retain, forget = subset(data.train, r_idx), subset(data.train, f_idx)
        init = model_fn(seed)
        original = train_original(copy.deepcopy(init), data.train,
                                  train_config(s, seed).replace(epochs=2))  # fmt: skip
        for method in order[k % 3 :] + order[: k % 3]:
            is_retrain = method.startswith("retrain")
            model = copy.deepcopy(init if is_retrain else original)
            # The guard is off on both sides: this measures the methods' own cost.
            cfg = train_config(s, seed) if is_retrain else base_config(s, seed, method,
                                                                       guard=False)  # fmt: skip
            start = time.perf_counter()
            unlearn(model, retain, forget, config=cfg, method=method, num_groups=4)
            runs[method].append(time.perf_counter() - start)
    ratios = {m: [a / b for a, b in zip(runs[m], runs["retrain_reweight"], strict=True)]
              for m in ("miu", "finetune_reweight")}  # fmt: skip
    return dict(seconds=dict(runs), ratios=ratios, n_retain=len(retain), size=size,
                params=sum(p.numel() for p in init.parameters()),
                epochs=dict(miu=base_config(s, 0).epochs,
                            retrain_reweight=train_config(s, 0).epochs))  # fmt: skip
