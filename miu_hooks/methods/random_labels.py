r"""RL: relabel the forget set at random, then fine-tune on the retain set (docs/method.md §6).

Each epoch runs two passes:

.. math::

    \text{forget: } \min_\theta \mathrm{CE}(f_\theta(x), \tilde y),\;
    \tilde y \sim \mathcal U\{0..K-1\} \text{ drawn afresh per sample and epoch};
    \qquad
    \text{retain: } \min_\theta \mathrm{CE}(f_\theta(x), y).

K is read from the logits. The random labels come from a generator seeded by
``(config.seed, epoch)`` in a stream of their own
(:data:`~miu_hooks.seeding.RANDOM_LABELS_STREAM`), so a resumed run draws the
same labels. Settings: :class:`~miu_hooks.config.TrainConfig`; with
``random_labels_reweight`` the retain pass reads the REWEIGHT stream
(docs/method.md §2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from miu_hooks.data import Batch
from miu_hooks.errors import ModelError
from miu_hooks.functional import checked_cross_entropy
from miu_hooks.methods import register_method
from miu_hooks.methods.base import RunContext, UnlearningMethod
from miu_hooks.seeding import RANDOM_LABELS_STREAM, epoch_generator

__all__ = ["RandomLabels", "uniform_random_labels"]

LossFn = Callable[[Tensor, Batch], Tensor]


def uniform_random_labels(
    labels: Tensor, num_classes: int, generator: torch.Generator | None = None
) -> Tensor:
    r"""Draw :math:`\tilde y_i \sim \mathcal U\{0..K-1\}` independently of ``labels``.

    A random label equals the true one with probability 1/K, as in the
    reference (it does not exclude the true class).

    Args:
        labels: LongTensor[B] of true labels (only their shape and device are used).
        num_classes: K, the number of classes.
        generator: CPU generator for the draw.

    Returns:
        LongTensor[B] on ``labels.device``.

    Raises:
        ModelError: ``num_classes < 2`` (random relabelling needs two classes).

    Example:
        >>> y = uniform_random_labels(torch.zeros(6, dtype=torch.long), 3, epoch_generator(0, 0))
        >>> y.shape, bool(((y >= 0) & (y < 3)).all())
        (torch.Size([6]), True)
    """
    if num_classes < 2:
        raise ModelError(f"random labels need at least 2 classes; the logits have {num_classes}")
    drawn = torch.randint(0, int(num_classes), tuple(labels.shape), generator=generator)
    return drawn.to(labels.device)


@register_method("random_labels")
class RandomLabels(UnlearningMethod):
    """RL: a forget pass with uniform random labels, then a retain pass with CE.

    Subclasses (SalUn) set :attr:`mask` to restrict which weights move.

    Attributes:
        mask: ``{parameter name: 0/1 tensor}`` applied to gradients in both
            passes, or ``None`` (every weight is updated).
    """

    def __init__(self) -> None:
        self.mask: dict[str, Tensor] | None = None
        self.generator: torch.Generator | None = None

    def run_epoch(self, ctx: RunContext, epoch: int) -> None:
        self.generator = epoch_generator(ctx.config.seed, epoch, RANDOM_LABELS_STREAM)
        self.run_pass(ctx, ctx.forget_loader, f"epoch {epoch} forget", self.forget_loss)
        self.run_pass(ctx, ctx.retain_loader, f"epoch {epoch} retain", self.retain_loss)

    def forget_loss(self, logits: Tensor, batch: Batch) -> Tensor:
        r"""Return :math:`\mathrm{CE}(\text{logits}, \tilde y)` with fresh uniform labels."""
        targets = uniform_random_labels(batch.labels, int(logits.shape[-1]), self.generator)
        return checked_cross_entropy(logits, targets)

    def retain_loss(self, logits: Tensor, batch: Batch) -> Tensor:
        """Return the plain cross-entropy on a retain batch."""
        return checked_cross_entropy(logits, batch.labels)

    def run_pass(self, ctx: RunContext, loader: Iterable[Any], desc: str, loss_fn: LossFn) -> None:
        """One pass over ``loader`` minimising ``loss_fn(logits, batch)`` under :attr:`mask`."""
        ctx.model.train()
        phase = desc.rsplit(" ", 1)[-1]
        for batch in ctx.batches(loader, desc):
            ctx.step(loss_fn(ctx.logits(batch), batch), phase, mask=self.mask)
            self.after_step(ctx)

    def after_step(self, ctx: RunContext) -> None:
        """Called after every optimiser step (SalUn re-pins its frozen weights here)."""
