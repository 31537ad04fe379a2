r"""NegGrad (gradient ascent on the forget set; docs/method.md §6).

.. math::

    \min_\theta\; -\frac{1}{|B_f|}\sum_{i \in B_f} \mathrm{CE}(f_\theta(x_i), y_i)
    \qquad \text{for every forget batch } B_f \text{ of every epoch.}

There is no retain pass, so REWEIGHT does not apply: there is no
``neggrad_reweight``, and ``reweight=True`` with ``neggrad`` is refused.
Settings: :class:`~miu_hooks.config.NegGradConfig` (learning rate 3e-4 by
default). The objective is unbounded below; ``max_grad_norm`` bounds each
step, the collapse guard stops a run whose held-out accuracy collapses, and a
non-finite loss raises :class:`~miu_hooks.errors.NonFiniteLossError`.
"""

from __future__ import annotations

from torch import Tensor

from miu_hooks.config import NegGradConfig
from miu_hooks.data import Batch
from miu_hooks.functional import checked_cross_entropy
from miu_hooks.methods import register_method
from miu_hooks.methods.base import RunContext, UnlearningMethod

__all__ = ["NegGrad", "negative_cross_entropy"]


def negative_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    r"""Return :math:`-\mathrm{CE}`, the mean cross-entropy negated (fp32).

    Args:
        logits: FloatTensor[B, C].
        labels: LongTensor[B] of true classes.

    Returns:
        A differentiable scalar; minimising it raises the forget loss.

    Example:
        >>> import torch
        >>> round(float(negative_cross_entropy(torch.zeros(2, 2), torch.tensor([0, 1]))), 4)
        -0.6931
    """
    return -checked_cross_entropy(logits, labels)


@register_method("neggrad", config=NegGradConfig)
class NegGrad(UnlearningMethod):
    r"""NegGrad / GA: each epoch, one pass over D_f minimising :math:`-\mathrm{CE}`.

    Runs for every one of the ``epochs`` epochs. The retain set is never
    visited, so REWEIGHT does not apply.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from miu_hooks import TrainConfig, unlearn
        >>> from miu_hooks.data import GroupTensorDataset
        >>> _ = torch.manual_seed(0)
        >>> x, y = torch.randn(12, 3), torch.tensor([0, 1] * 6)
        >>> ds = GroupTensorDataset(x, y, 2 * y)
        >>> net = nn.Linear(3, 2)
        >>> before = float(nn.functional.cross_entropy(net(x[:4]), y[:4]))
        >>> cfg = TrainConfig(epochs=3, lr=0.1, batch_size=4, device="cpu")
        >>> _ = unlearn(net, ds, GroupTensorDataset(x[:4], y[:4], 2 * y[:4]),
        ...             config=cfg, method="neggrad", num_groups=4)
        >>> float(nn.functional.cross_entropy(net(x[:4]), y[:4])) > before
        True
    """

    reweight_rule = "not_applicable"

    def run_epoch(self, ctx: RunContext, epoch: int) -> None:
        ctx.model.train()
        for batch in ctx.batches(ctx.forget_loader, f"epoch {epoch} forget"):
            ctx.step(self.forget_loss(ctx, batch), "forget")

    def forget_loss(self, ctx: RunContext, batch: Batch) -> Tensor:
        r"""Return :math:`-\mathrm{CE}` of the model on one forget batch."""
        return negative_cross_entropy(ctx.logits(batch), batch.labels)
