r"""SalUn: random labels restricted to the weights salient for the forget set (docs/method.md §6).

The saliency mask is computed **once**, before the first step, on the original
model (the model passed to :func:`~miu_hooks.unlearn`, in ``eval()`` mode):

.. math::

    s = \Bigl|\sum_{B_f} \nabla_\theta \bigl(-\mathrm{CE}(f_\theta(x), y)\bigr)\Bigr|,
    \qquad m_j = \mathbb{1}\bigl[s_j \text{ is among the } \lfloor\rho N\rfloor
    \text{ largest entries of } s\bigr],

a *global* top-:math:`\rho` over all N trainable weights (the sum runs over the
forget batches, each a batch mean). Training then runs RL
(:mod:`~miu_hooks.methods.random_labels`) with gradients multiplied by m in
both passes, and the update obeys :math:`\theta = \theta_o + m \odot \Delta\theta`:
after every step the non-salient entries are put back to their original
values, so neither momentum nor weight decay moves them. Settings:
:class:`~miu_hooks.config.SalUnConfig` (``salun_ratio`` is :math:`\rho`, the
fraction of weights that may change).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from miu_hooks.config import SalUnConfig
from miu_hooks.data import Batch
from miu_hooks.errors import ConfigError, EmptyForgetSetError, ModelError, StateError
from miu_hooks.functional import checked_cross_entropy
from miu_hooks.methods import register_method
from miu_hooks.methods.base import RunContext
from miu_hooks.methods.random_labels import RandomLabels

__all__ = ["SalUn", "saliency_mask", "saliency_scores", "top_fraction_mask"]


def top_fraction_mask(scores: dict[str, Tensor], ratio: float) -> dict[str, Tensor]:
    r"""Return 0/1 masks keeping the global top :math:`\lfloor\rho N\rfloor` entries of ``scores``.

    Args:
        scores: ``{name: non-negative tensor}``, e.g. absolute gradients.
        ratio: :math:`\rho \in (0, 1]`.

    Returns:
        ``{name: tensor of 0.0/1.0}`` shaped and typed like each score.

    Raises:
        ConfigError: ``ratio`` is outside (0, 1].
        ModelError: ``scores`` is empty (no trainable parameters).

    Example:
        >>> scores = {"a": torch.tensor([3.0, 0.1]), "b": torch.tensor([2.0, 0.5])}
        >>> m = top_fraction_mask(scores, 0.5)
        >>> m["a"].tolist(), m["b"].tolist()
        ([1.0, 0.0], [1.0, 0.0])
    """
    if not (isinstance(ratio, (int, float)) and 0 < ratio <= 1):
        raise ConfigError(f"the saliency ratio must lie in (0, 1]; got {ratio!r}")
    if not scores:
        raise ModelError("top_fraction_mask: no scores (the model has no trainable parameters)")
    names = list(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).float() for n in names])
    keep = torch.zeros_like(flat)
    k = math.floor(ratio * flat.numel())
    if k > 0:
        keep[torch.topk(flat, k, sorted=False).indices] = 1.0
    out: dict[str, Tensor] = {}
    offset = 0
    for n in names:
        t = scores[n]
        out[n] = keep[offset : offset + t.numel()].reshape(t.shape).to(t.dtype)
        offset += t.numel()
    return out


def saliency_scores(
    model: nn.Module,
    batches: Iterable[Batch],
    logits_fn: Callable[[Batch], Tensor] | None = None,
    scale_loss: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    r"""SalUn's scores :math:`|\sum_{B_f}\nabla_\theta(-\mathrm{CE})|`, times the loss scale.

    ``scale_loss`` multiplies each batch's loss by the fp16 loss scale before the
    backward (:meth:`Runtime.scale_loss <miu_hooks.runtime.Runtime.scale_loss>`), so
    gradients through fp16 activations do not underflow; a common factor does not
    change which entries are largest. See :func:`saliency_mask` for the rest.

    Raises:
        EmptyForgetSetError: ``batches`` is empty.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    modes = {m: m.training for m in model.modules()}
    forward = logits_fn or (lambda b: model(b.inputs))
    scale = scale_loss or (lambda loss: loss)
    model.eval()
    try:
        for p in params.values():
            p.grad = None
        seen = 0
        for batch in batches:
            scale(-checked_cross_entropy(forward(batch), batch.labels)).backward()
            seen += 1
        if seen == 0:
            raise EmptyForgetSetError("saliency_mask: the forget set yielded no batch")
        return {
            n: (p.grad.detach().abs() if p.grad is not None else torch.zeros_like(p))
            for n, p in params.items()
        }
    finally:
        for p in params.values():
            p.grad = None
        for module, mode in modes.items():
            module.training = mode


def saliency_mask(
    model: nn.Module,
    batches: Iterable[Batch],
    ratio: float = SalUnConfig.salun_ratio,
    logits_fn: Callable[[Batch], Tensor] | None = None,
    scale_loss: Callable[[Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    r"""SalUn's mask: the global top-``ratio`` of :math:`|\sum_{B_f}\nabla_\theta(-\mathrm{CE})|`.

    ``model`` runs in ``eval()`` mode (its training flags are restored after) and
    its ``.grad`` fields are left as ``None``; the weights are not changed.

    Args:
        model: The original model.
        batches: The forget batches (:class:`~miu_hooks.data.Batch`).
        ratio: :math:`\rho`, the fraction of weights kept (mask 1).
        logits_fn: ``fn(batch) -> logits``; default ``model(batch.inputs)``.
        scale_loss: fp16 loss scaling of each batch's loss (see :func:`saliency_scores`).

    Returns:
        ``{parameter name: 0/1 tensor}`` for every trainable parameter.

    Raises:
        EmptyForgetSetError: ``batches`` is empty.
        ConfigError: ``ratio`` is outside (0, 1].

    Example:
        >>> net = nn.Linear(2, 2)
        >>> b = Batch(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), torch.zeros(4).long())
        >>> m = saliency_mask(net, [b], 0.5)
        >>> sorted(m), int(sum(t.sum() for t in m.values()))
        (['bias', 'weight'], 3)
    """
    return top_fraction_mask(saliency_scores(model, batches, logits_fn, scale_loss), ratio)


@register_method("salun", config=SalUnConfig)
class SalUn(RandomLabels):
    """SalUn: RL with the saliency mask on gradients and on the update (module docstring).

    Attributes:
        mask: ``{parameter name: 0/1 tensor}``; 1 marks a salient weight that may change.
        pinned: ``{parameter name: (1 - mask) * original value}``, restored after each step.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pinned: dict[str, Tensor] = {}
        self._model: nn.Module | None = None

    def setup(self, ctx: RunContext) -> None:
        ratio = ctx.config_as(SalUnConfig).salun_ratio
        if getattr(ctx.runtime, "scaler", None) is None:
            batches = ctx.batches(ctx.forget_loader, "saliency mask")
            self.mask = saliency_mask(ctx.model, batches, ratio, ctx.logits)
        else:
            self.mask = top_fraction_mask(self._scaled_scores(ctx), ratio)
        self._model = ctx.model
        self._pin(ctx.model)

    def _scaled_scores(self, ctx: RunContext) -> dict[str, Tensor]:
        """Saliency scores under fp16: losses scaled like a training step's.

        When a scaled gradient overflows, the pass is repeated without scaling.
        """
        for scale in (ctx.runtime.scale_loss, None):
            batches = ctx.batches(ctx.forget_loader, "saliency mask")
            scores = saliency_scores(ctx.model, batches, ctx.logits, scale)
            if bool(torch.stack([torch.isfinite(v).all() for v in scores.values()]).all()):
                break
        return scores

    def _pin(self, model: nn.Module) -> None:
        # Non-salient entries never move, so the current model holds theta_o there.
        assert self.mask is not None
        with torch.no_grad():
            self.pinned = {
                n: p.detach() * (1 - self.mask[n])
                for n, p in model.named_parameters()
                if n in self.mask
            }

    def after_step(self, ctx: RunContext) -> None:
        r"""Enforce :math:`\theta = m \odot \theta + (1 - m) \odot \theta_o` after a step."""
        assert self.mask is not None
        with torch.no_grad():
            for n, p in ctx.model.named_parameters():
                if n in self.mask:
                    p.mul_(self.mask[n]).add_(self.pinned[n])

    def state_dict(self) -> dict[str, Tensor]:
        return {f"mask.{n}": m.to(torch.uint8) for n, m in (self.mask or {}).items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.mask is None or self._model is None:
            raise StateError("setup() must run before load_state_dict()")
        for n in self.mask:
            key = f"mask.{n}"
            if key in state:
                self.mask[n] = state[key].to(self.mask[n].device, self.mask[n].dtype)
        self._pin(self._model)
