"""MIU: mutual-information unlearning with REWEIGHT (docs/method.md §3)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from torch import Tensor

from miu_hooks.config import MIUConfig
from miu_hooks.data import is_deterministic
from miu_hooks.engine import MIUHandle, attach
from miu_hooks.methods import register_method
from miu_hooks.methods.base import RunContext, UnlearningMethod

__all__ = ["MIU", "is_deterministic"]

logger = logging.getLogger(__name__)


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
        # The retain rows between two tuning phases decide how T_o scores cached features.
        self.handle.retain_rows_per_epoch = len(ctx.retain_loader.index_sampler)
        self.handle.cache_features(
            ctx.train, num_workers=cfg.num_workers, progress=ctx.progress, collate_fn=ctx.collate_fn
        )

    def run_epoch(self, ctx: RunContext, epoch: int) -> None:
        handle = self.handle
        assert handle is not None
        forget_loader: Iterable[Any] = ctx.forget_loader
        if epoch < handle.config.forget_epochs:  # no progress bar for a pass that does not run
            forget_loader = ctx.progress(forget_loader, f"epoch {epoch} forget")
        handle.epoch_start(
            epoch,
            optimizer=ctx.optimizer,
            forget_loader=forget_loader,
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
