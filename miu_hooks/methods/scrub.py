r"""SCRUB: a student moving away from the original model on D_f and towards it on D_r.

METHOD.md §6. The teacher t is the frozen original model (``eval()`` mode),
the student s the model being unlearned, and

.. math::

    \mathrm{KL}_T(s, t) = T^2 \cdot \frac{1}{B}\sum_{i=1}^{B}
        \mathrm{KL}\bigl(\mathrm{softmax}(t_i/T)\,\big\|\,\mathrm{softmax}(s_i/T)\bigr).

Epoch e runs, in order:

1. if :math:`e < E_f` (``MIUConfig.forget_epochs``), a *max* pass over D_f minimising
   :math:`-\mathrm{KL}_T`;
2. a *min* pass over D_r minimising :math:`\gamma\,\mathrm{CE} + \alpha\,\mathrm{KL}_T`,
   with retain batches of ``scrub_retain_batch_size`` samples drawn from the same
   sampler as the run's retain loader (REWEIGHT when configured).

``MIUConfig.extra`` keys and defaults:

* ``"scrub_temperature"``: T, ``4.0``;
* ``"scrub_kl_weight"``: :math:`\alpha`, ``0.001``;
* ``"scrub_ce_weight"``: :math:`\gamma`, ``0.99``;
* ``"scrub_retain_batch_size"``: ``128`` (``None``: ``MIUConfig.batch_size``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from miu_hooks.config import MIUConfig
from miu_hooks.data import Batch
from miu_hooks.functional import checked_cross_entropy
from miu_hooks.methods import register_method
from miu_hooks.methods.base import RunContext, SeededLoader, UnlearningMethod

__all__ = ["SCRUB", "SCRUB_DEFAULTS", "distill_kl", "scrub_settings"]

SCRUB_DEFAULTS: dict[str, Any] = {
    "scrub_temperature": 4.0,
    "scrub_kl_weight": 0.001,
    "scrub_ce_weight": 0.99,
    "scrub_retain_batch_size": 128,
}


def distill_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    r"""Return :math:`\mathrm{KL}_T = T^2 \frac{1}{B}\sum_i \mathrm{KL}(p^t_i \| p^s_i)` in fp32.

    :math:`p_i = \mathrm{softmax}(\text{logits}_i / T)`; the teacher is detached.

    Args:
        student_logits: FloatTensor[B, C] of the model being unlearned.
        teacher_logits: FloatTensor[B, C] of the original model.
        temperature: T > 0.

    Returns:
        A differentiable scalar (0 when the two distributions agree).

    Raises:
        ValueError: ``temperature`` is not positive, or the shapes differ.

    Example:
        >>> t = torch.tensor([[2.0, 0.0]])
        >>> round(float(distill_kl(t, t)), 6)
        0.0
        >>> round(float(distill_kl(torch.zeros(1, 2), t, temperature=1.0)), 4)
        0.3278
    """
    if not temperature > 0:
        raise ValueError(f"the distillation temperature must be > 0; got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}"
        )
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p_t = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return F.kl_div(log_p_s, p_t, reduction="batchmean") * temperature**2


def scrub_settings(config: MIUConfig) -> dict[str, Any]:
    """Return SCRUB's settings: :data:`SCRUB_DEFAULTS` overridden by ``config.extra``.

    Raises:
        ValueError: A value is out of range (the message names the key).

    Example:
        >>> scrub_settings(MIUConfig(extra={"scrub_temperature": 2}))["scrub_temperature"]
        2.0
    """
    out = {k: config.extra.get(k, v) for k, v in SCRUB_DEFAULTS.items()}

    def bad(key: str, fix: str) -> ValueError:
        return ValueError(f"MIUConfig.extra[{key!r}]={out[key]!r} is invalid: {fix}")

    for key, positive in (("scrub_temperature", True), ("scrub_kl_weight", False),
                          ("scrub_ce_weight", False)):  # fmt: skip
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise bad(key, "use a finite number")
        if v < 0 or (positive and v == 0):
            raise bad(key, "use a number > 0" if positive else "use a number >= 0")
        out[key] = float(v)
    bs = out["scrub_retain_batch_size"]
    if bs is None:
        out["scrub_retain_batch_size"] = config.batch_size
    elif isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise bad("scrub_retain_batch_size", "use an integer >= 1, or None for batch_size")
    return out


@register_method("scrub")
class SCRUB(UnlearningMethod):
    """SCRUB: max passes on D_f for ``forget_epochs`` epochs, a min pass on D_r every epoch.

    Attributes:
        settings: The resolved :func:`scrub_settings`.
        retain_loader: Retain batches of ``scrub_retain_batch_size``, sharing the
            run's retain sampler (so ``set_epoch`` and REWEIGHT carry over).
    """

    needs_original = True

    def __init__(self) -> None:
        self.settings: dict[str, Any] = dict(SCRUB_DEFAULTS)
        self.retain_loader: SeededLoader | None = None

    def setup(self, ctx: RunContext) -> None:
        self.settings = scrub_settings(ctx.config)
        base = ctx.retain_loader
        self.retain_loader = SeededLoader(
            base.dataset,
            sampler=base.sampler,
            batch_size=self.settings["scrub_retain_batch_size"],
            num_workers=ctx.config.num_workers,
        )

    def kl(self, ctx: RunContext, batch: Batch, student_logits: Tensor) -> Tensor:
        """:func:`distill_kl` of the student against the original model on ``batch``."""
        with torch.no_grad():
            teacher_logits = ctx.logits(batch, ctx.original)
        return distill_kl(student_logits, teacher_logits, self.settings["scrub_temperature"])

    def forget_loss(self, ctx: RunContext, batch: Batch) -> Tensor:
        r"""The max step's loss on a forget batch, :math:`-\mathrm{KL}_T`."""
        return -self.kl(ctx, batch, ctx.logits(batch))

    def retain_loss(self, ctx: RunContext, batch: Batch) -> Tensor:
        r"""The min step's loss on a retain batch, :math:`\gamma CE + \alpha KL_T`."""
        logits = ctx.logits(batch)
        s = self.settings
        ce = checked_cross_entropy(logits, batch.labels)
        return s["scrub_ce_weight"] * ce + s["scrub_kl_weight"] * self.kl(ctx, batch, logits)

    def run_epoch(self, ctx: RunContext, epoch: int) -> None:
        assert self.retain_loader is not None, "setup() must run first"
        ctx.model.train()
        if epoch < ctx.config.forget_epochs:
            for batch in ctx.batches(ctx.forget_loader, f"epoch {epoch} forget"):
                ctx.step(self.forget_loss(ctx, batch), "forget")
        for batch in ctx.batches(self.retain_loader, f"epoch {epoch} retain"):
            ctx.step(self.retain_loss(ctx, batch), "retain")
