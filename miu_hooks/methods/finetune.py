"""Fine-tuning on the retain set, and Retrain (the same loop from a fresh model)."""

from __future__ import annotations

from miu_hooks.functional import checked_cross_entropy
from miu_hooks.methods import register_method
from miu_hooks.methods.base import RunContext, UnlearningMethod

__all__ = ["FineTune", "Retrain"]


@register_method("finetune")
class FineTune(UnlearningMethod):
    """FT: minimise cross-entropy on D_r (REWEIGHT-sampled as ``finetune_reweight``)."""

    def run_epoch(self, ctx: RunContext, epoch: int) -> None:
        self.retain_epoch(ctx, lambda logits, batch: checked_cross_entropy(logits, batch.labels))


@register_method("retrain")
class Retrain(FineTune):
    """Retrain: train the model passed in (a fresh initialisation) on D_r only.

    Exact unlearning; ``retrain_reweight`` is Retrain+REWEIGHT, the paper's
    group-robust exact unlearning and our reference for Avg. Gap.
    """
