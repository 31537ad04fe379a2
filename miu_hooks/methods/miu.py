"""MIU: mutual-information unlearning with REWEIGHT (docs/method.md §3)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, SequentialSampler

from miu_hooks.config import MIUConfig
from miu_hooks.engine import MIUHandle, attach
from miu_hooks.methods import register_method
from miu_hooks.methods.base import RunContext, SeededLoader, UnlearningMethod, indexed

__all__ = ["MIU", "is_deterministic"]

logger = logging.getLogger(__name__)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(map(_same, a, b))
    return bool(a == b)


def is_deterministic(dataset: Dataset, probes: int = 2) -> bool:
    """Return whether reading the same items twice gives identical values (no augmentation).

    Example:
        >>> ds = [(torch.ones(2), 0, 1)] * 3
        >>> is_deterministic(ds)
        True
    """
    n = len(dataset)  # type: ignore[arg-type]
    for i in sorted({0, n - 1})[:probes]:
        if n and not _same(dataset[i], dataset[i]):
            return False
    return True


@register_method("miu", config=MIUConfig)
class MIU(UnlearningMethod):
    """Forget pass minimising Î_u on D_f; retain pass with CE + λ·(Î_u − sg Î_o)².

    Takes :class:`~miu_hooks.config.MIUConfig`; samples the retain set with
    REWEIGHT unless ``reweight=False`` (the paper's ablation, with a warning).
    """

    needs_original = True
    needs_features = True
    reweight_rule = "default_on"

    def __init__(self) -> None:
        self.handle: MIUHandle | None = None

    def setup(self, ctx: RunContext) -> None:
        cfg = ctx.config_as(MIUConfig)
        if not cfg.reweight:
            logger.warning(
                "MIU without REWEIGHT (config.reweight=False): the paper's ablate_rw setting; "
                "MIU samples the retain set with REWEIGHT by default"
            )
        self.handle = attach(
            ctx.model,
            cfg,
            num_groups=ctx.num_groups,
            original=ctx.original,
            feature_module=ctx.feature_module,
            runtime=ctx.runtime,
        )
        cache = cfg.feature_cache == "on" or (
            cfg.feature_cache == "auto" and is_deterministic(ctx.train)
        )
        if cache:
            size = len(ctx.train)  # type: ignore[arg-type]
            loader = SeededLoader(  # no batch of one: original_mode="train" runs BatchNorm
                indexed(ctx.train),
                sampler=SequentialSampler(range(size)),
                batch_size=max(cfg.batch_size, 256),
                num_workers=cfg.num_workers,
            )
            self.handle.build_feature_cache(ctx.progress(loader, "caching original features"), size)
            logger.info("cached original-model features of %d samples", size)

    def run_epoch(self, ctx: RunContext, epoch: int) -> None:
        handle = self.handle
        assert handle is not None
        handle.epoch_start(
            epoch,
            optimizer=ctx.optimizer,
            forget_loader=ctx.progress(ctx.forget_loader, f"epoch {epoch} forget"),
            tune_loader=ctx.tune_loader,
        )
        self.retain_epoch(ctx, handle.retain_loss)
        ctx.logs.update(handle.pop_logs())

    def teardown(self, ctx: RunContext) -> None:
        if self.handle is not None:
            self.handle.remove()

    def state_dict(self) -> dict[str, Tensor]:
        return self.handle.state_dict() if self.handle is not None else {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        assert self.handle is not None, "setup() must run before load_state_dict()"
        self.handle.load_state_dict(state)
