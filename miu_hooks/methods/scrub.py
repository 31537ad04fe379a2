r"""SCRUB: a student moving away from the original model on D_f and towards it on D_r.

docs/method.md §6. The teacher t is the frozen original model (``eval()`` mode),
the student s the model being unlearned, and

.. math::

    \mathrm{KL}_T(s, t) = T^2 \cdot \frac{1}{B}\sum_{i=1}^{B}
        \mathrm{KL}\bigl(\mathrm{softmax}(t_i/T)\,\big\|\,\mathrm{softmax}(s_i/T)\bigr).

Epoch e runs, in order:

1. if :math:`e < E_f` (``forget_epochs``), a *max* pass over D_f minimising
   :math:`-\mathrm{KL}_T`;
2. a *min* pass over D_r minimising :math:`\gamma\,\mathrm{CE} + \alpha\,\mathrm{KL}_T`,
   with retain batches of ``scrub_retain_batch_size`` samples drawn from the same
   sampler as the run's retain loader (REWEIGHT with ``scrub_reweight``).

Settings: :class:`~miu_hooks.config.SCRUBConfig` (``scrub_temperature`` is T,
``scrub_kl_weight`` :math:`\alpha`, ``scrub_ce_weight`` :math:`\gamma`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from miu_hooks.config import SCRUBConfig
from miu_hooks.data import Batch
from miu_hooks.errors import ConfigError, ModelError
from miu_hooks.functional import checked_cross_entropy
from miu_hooks.loader_options import loader_options
from miu_hooks.methods import register_method
from miu_hooks.methods.base import RunContext, SeededLoader, UnlearningMethod

__all__ = ["SCRUB", "distill_kl"]


def distill_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = SCRUBConfig.scrub_temperature,
) -> Tensor:
    r"""Return :math:`\mathrm{KL}_T = T^2 \frac{1}{B}\sum_i \mathrm{KL}(p^t_i \| p^s_i)` in fp32.

    :math:`p_i = \mathrm{softmax}(\text{logits}_i / T)`; the teacher is detached.

    Args:
        student_logits: FloatTensor[B, C] of the model being unlearned.
        teacher_logits: FloatTensor[B, C] of the original model.
        temperature: T > 0.

    Returns:
        A differentiable scalar (0 when the two distributions agree).

    Raises:
        ConfigError: ``temperature`` is not positive.
        ModelError: The shapes differ.

    Example:
        >>> t = torch.tensor([[2.0, 0.0]])
        >>> round(float(distill_kl(t, t)), 6)
        0.0
        >>> round(float(distill_kl(torch.zeros(1, 2), t, temperature=1.0)), 4)
        0.3278
    """
    if not temperature > 0:
        raise ConfigError(f"the distillation temperature must be > 0; got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ModelError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}"
        )
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p_t = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * temperature**2


@register_method("scrub", config=SCRUBConfig)
class SCRUB(UnlearningMethod):
    """SCRUB: max passes on D_f for ``forget_epochs`` epochs, a min pass on D_r every epoch.

    Attributes:
        config: The run's :class:`~miu_hooks.config.SCRUBConfig`.
        retain_loader: Retain batches of ``scrub_retain_batch_size``, sharing the
            run's retain sampler (so ``set_epoch`` and REWEIGHT carry over).
    """

    needs_original = True

    def __init__(self) -> None:
        self.config = SCRUBConfig()
        self.retain_loader: SeededLoader | None = None

    def setup(self, ctx: RunContext) -> None:
        self.config = cfg = ctx.config_as(SCRUBConfig)
        base = ctx.retain_loader
        self.retain_loader = SeededLoader(
            base.dataset,
            sampler=base.index_sampler,
            batch_size=cfg.scrub_retain_batch_size or cfg.batch_size,
            collate_fn=ctx.collate_fn,
            **loader_options(base.dataset, ctx.runtime.device, cfg.num_workers),
        )

    def kl(self, ctx: RunContext, batch: Batch, student_logits: Tensor) -> Tensor:
        """:func:`distill_kl` of the student against the original model on ``batch``."""
        with torch.no_grad():
            teacher_logits = ctx.logits(batch, ctx.original)
        return distill_kl(student_logits, teacher_logits, self.config.scrub_temperature)

    def forget_loss(self, ctx: RunContext, batch: Batch) -> Tensor:
        r"""The max step's loss on a forget batch, :math:`-\mathrm{KL}_T`."""
        return -self.kl(ctx, batch, ctx.logits(batch))

    def retain_loss(self, ctx: RunContext, batch: Batch) -> Tensor:
        r"""The min step's loss on a retain batch, :math:`\gamma CE + \alpha KL_T`."""
        logits = ctx.logits(batch)
        cfg = self.config
        ce = checked_cross_entropy(logits, batch.labels)
        return cfg.scrub_ce_weight * ce + cfg.scrub_kl_weight * self.kl(ctx, batch, logits)

    def run_epoch(self, ctx: RunContext, epoch: int) -> None:
        assert self.retain_loader is not None, "setup() must run first"
        ctx.model.train()
        if epoch < self.config.forget_epochs:
            for batch in ctx.batches(ctx.forget_loader, f"epoch {epoch} forget"):
                ctx.step(self.forget_loss(ctx, batch), "forget")
        for batch in ctx.batches(self.retain_loader, f"epoch {epoch} retain"):
            ctx.step(self.retain_loss(ctx, batch), "retain")
