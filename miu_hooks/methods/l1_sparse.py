r"""L1-sparse: fine-tuning on the retain set with a decaying L1 penalty (docs/method.md §6).

.. math::

    \min_\theta\; \mathrm{CE}(f_\theta(x), y) + \alpha_e \lVert\theta\rVert_1,
    \qquad \alpha_e = \alpha_0 \left(1 - \frac{e}{E}\right),

over the retain batches of epoch ``e`` of ``E = epochs``; the norm runs over
every trainable parameter. Settings: :class:`~miu_hooks.config.L1SparseConfig`
(``l1_alpha`` is :math:`\alpha_0`). With ``l1_sparse_reweight`` the retain pass
reads the REWEIGHT stream (docs/method.md §2).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from miu_hooks.config import L1SparseConfig
from miu_hooks.data import Batch
from miu_hooks.errors import ConfigError, ModelError
from miu_hooks.functional import checked_cross_entropy
from miu_hooks.methods import register_method
from miu_hooks.methods.base import RunContext, UnlearningMethod

__all__ = ["L1Sparse", "l1_alpha", "l1_norm"]


def l1_alpha(epoch: int, epochs: int, alpha: float = L1SparseConfig.l1_alpha) -> float:
    r"""Return :math:`\alpha_e = \alpha_0 (1 - e/E)`, the penalty weight of epoch ``e``.

    Args:
        epoch: e, counted from 0.
        epochs: E, the number of unlearning epochs.
        alpha: :math:`\alpha_0`.

    Raises:
        ConfigError: ``epochs < 1`` or ``epoch`` outside ``[0, epochs)``.

    Example:
        >>> [round(l1_alpha(e, 4), 8) for e in range(4)]
        [0.0005, 0.000375, 0.00025, 0.000125]
    """
    if epochs < 1 or not 0 <= epoch < epochs:
        raise ConfigError(f"l1_alpha needs 0 <= epoch < epochs; got epoch={epoch}, epochs={epochs}")
    return float(alpha) * (1.0 - epoch / epochs)


def l1_norm(model: nn.Module) -> Tensor:
    r"""Return :math:`\lVert\theta\rVert_1 = \sum_j |\theta_j|` over trainable parameters (fp32).

    Example:
        >>> lin = nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     _ = lin.weight.copy_(torch.tensor([[1.0, -2.0]])), lin.bias.fill_(-0.5)
        >>> float(l1_norm(lin).detach())
        3.5
    """
    terms = [p.abs().sum(dtype=torch.float32) for p in model.parameters() if p.requires_grad]
    if not terms:
        raise ModelError("l1_norm: the model has no trainable parameters")
    return torch.stack(terms).sum()


@register_method("l1_sparse", config=L1SparseConfig)
class L1Sparse(UnlearningMethod):
    r"""L1-sparse: CE on D_r plus :math:`\alpha_e\lVert\theta\rVert_1` (see the module docstring).

    Example:
        >>> L1Sparse.alpha_for(L1SparseConfig(epochs=10, l1_alpha=1e-3), 5)
        0.0005
    """

    def __init__(self) -> None:
        self.alpha = 0.0

    @staticmethod
    def alpha_for(config: L1SparseConfig, epoch: int) -> float:
        r"""Return :math:`\alpha_e` for ``epoch`` under ``config``."""
        return l1_alpha(epoch, config.epochs, config.l1_alpha)

    def run_epoch(self, ctx: RunContext, epoch: int) -> None:
        self.alpha = self.alpha_for(ctx.config_as(L1SparseConfig), epoch)
        model = ctx.model

        def loss_fn(logits: Tensor, batch: Batch) -> Tensor:
            ce = checked_cross_entropy(logits, batch.labels)
            return ce + self.alpha * l1_norm(model) if self.alpha > 0 else ce

        self.retain_epoch(ctx, loss_fn)
