"""Fine-tuning on the retain set (Retrain, in ``retrain.py``, runs the same loop)."""

from __future__ import annotations

from miu_hooks.functional import checked_cross_entropy
from miu_hooks.methods import register_method
from miu_hooks.methods.base import RunContext, UnlearningMethod

__all__ = ["FineTune"]


@register_method("finetune")
class FineTune(UnlearningMethod):
    """FT: minimise cross-entropy on D_r (REWEIGHT-sampled as ``finetune_reweight``)."""

    def run_epoch(self, ctx: RunContext, epoch: int) -> None:
        self.retain_epoch(ctx, lambda logits, batch: checked_cross_entropy(logits, batch.labels))
