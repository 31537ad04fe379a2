r"""L1-sparse: fine-tuning on the retain set with a decaying L1 penalty (METHOD.md §6).

.. math::

    \min_\theta\; \mathrm{CE}(f_\theta(x), y) + \alpha_e \lVert\theta\rVert_1,
    \qquad \alpha_e = \alpha_0 \left(1 - \frac{e}{E}\right),

over the retain batches of epoch ``e`` of ``E = MIUConfig.epochs``; the norm
runs over every trainable parameter. ``MIUConfig.extra`` key:

* ``"l1_alpha"``: :math:`\alpha_0`, default ``5e-4``.

With ``reweight`` the retain pass reads the REWEIGHT stream (METHOD.md §2).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from miu_hooks.config import MIUConfig
from miu_hooks.data import Batch
from miu_hooks.functional import checked_cross_entropy
from miu_hooks.methods import register_method
from miu_hooks.methods.base import RunContext, UnlearningMethod

__all__ = ["DEFAULT_L1_ALPHA", "L1Sparse", "l1_alpha", "l1_norm"]

DEFAULT_L1_ALPHA = 5e-4


def l1_alpha(epoch: int, epochs: int, alpha: float = DEFAULT_L1_ALPHA) -> float:
    r"""Return :math:`\alpha_e = \alpha_0 (1 - e/E)`, the penalty weight of epoch ``e``.

    Args:
        epoch: e, counted from 0.
        epochs: E, the number of unlearning epochs.
        alpha: :math:`\alpha_0`.

    Raises:
        ValueError: ``epochs < 1`` or ``epoch`` outside ``[0, epochs)``.

    Example:
        >>> [round(l1_alpha(e, 4), 8) for e in range(4)]
        [0.0005, 0.000375, 0.00025, 0.000125]
    """
    if epochs < 1 or not 0 <= epoch < epochs:
        raise ValueError(f"l1_alpha needs 0 <= epoch < epochs; got epoch={epoch}, epochs={epochs}")
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
        raise ValueError("l1_norm: the model has no trainable parameters")
    return torch.stack(terms).sum()


def _alpha0(config: MIUConfig) -> float:
    value: Any = config.extra.get("l1_alpha", DEFAULT_L1_ALPHA)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"MIUConfig.extra['l1_alpha']={value!r} is invalid: use a number >= 0")
    if value < 0:
        raise ValueError(f"MIUConfig.extra['l1_alpha']={value!r} is invalid: use a number >= 0")
    return float(value)


@register_method("l1_sparse")
class L1Sparse(UnlearningMethod):
    r"""L1-sparse: CE on D_r plus :math:`\alpha_e\lVert\theta\rVert_1` (see the module docstring).

    Example:
        >>> from miu_hooks import MIUConfig
        >>> L1Sparse.alpha_for(MIUConfig(epochs=10, extra={"l1_alpha": 1e-3}), 5)
        0.0005
    """

    def __init__(self) -> None:
        self.alpha = 0.0

    def setup(self, ctx: RunContext) -> None:
        _alpha0(ctx.config)  # fail before the first step on a bad setting

    @staticmethod
    def alpha_for(config: MIUConfig, epoch: int) -> float:
        r"""Return :math:`\alpha_e` for ``epoch`` under ``config`` (``extra["l1_alpha"]``)."""
        return l1_alpha(epoch, config.epochs, _alpha0(config))

    def run_epoch(self, ctx: RunContext, epoch: int) -> None:
        self.alpha = self.alpha_for(ctx.config, epoch)
        model = ctx.model

        def loss_fn(logits: Tensor, batch: Batch) -> Tensor:
            ce = checked_cross_entropy(logits, batch.labels)
            return ce + self.alpha * l1_norm(model) if self.alpha > 0 else ce

        self.retain_epoch(ctx, loss_fn)
