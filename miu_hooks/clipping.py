r"""MINE's adaptive gradient clipping of MIU's retain step (docs/method.md §8.1).

MINE bounds the gradient of the MI term by the gradient of the task loss:

.. math::

    g = g_{CE} + \min\left(1, \frac{\lVert g_{CE} \rVert}{\lVert g_{cal} \rVert}\right) g_{cal}

where :math:`g_{CE}` is the gradient of the cross-entropy and :math:`g_{cal}`
the gradient of the weighted calibration term λ·(Î_u − sg Î_o)², both with
respect to the model's parameters. Written as a loss, ``ce + s · cal`` with the
factor ``s`` detached, this is one ordinary backward for the caller, so every
entry point (plain loop, Trainer hooks, Accelerate) applies it the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

__all__ = ["adaptive_calibration_scale"]


def _squared_grad_norm(loss: Tensor, params: list[nn.Parameter], device: torch.device) -> Tensor:
    """Squared global norm (fp32) of the gradient of ``loss`` w.r.t. ``params``."""
    if not loss.requires_grad:
        return torch.zeros((), dtype=torch.float32, device=device)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for grad in grads:
        if grad is not None:  # unused parameter: no contribution
            total = total + grad.detach().float().pow(2).sum().to(device)
    return total


def adaptive_calibration_scale(
    ce: Tensor,
    cal: Tensor,
    params: Iterable[nn.Parameter],
    all_reduce: Callable[[Tensor], Tensor] | None = None,
    scale_loss: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    r"""MINE's factor :math:`s = \min(1, \lVert \nabla ce \rVert / \lVert \nabla cal \rVert)`.

    The gradient of ``ce + s * cal`` is then
    :math:`g_{CE} + \min(1, \lVert g_{CE} \rVert / \lVert g_{cal} \rVert) \, g_{cal}`.
    Both gradients come from ``torch.autograd.grad`` with ``retain_graph=True``,
    so this costs **two extra backward passes** through the graph; parameters
    that do not require grad are skipped and unused ones contribute zero. The
    graph is kept for the caller's own backward.

    Args:
        ce: Scalar task loss (the cross-entropy).
        cal: Scalar weighted calibration term (λ·(Î_u − sg Î_o)²).
        params: The model's parameters (those with ``requires_grad`` are used).
        all_reduce: Averages a tensor over processes (e.g.
            :meth:`Runtime.all_reduce_mean <miu_hooks.runtime.Runtime.all_reduce_mean>`).
            The two local squared norms are averaged before the ratio, so every
            rank uses the same ``s`` (the norms of the rank-averaged gradients
            would need two extra gradient all-reduces). ``None``: one process.
        scale_loss: Multiplies a loss by the fp16 loss scale (e.g.
            :meth:`Runtime.scale_loss <miu_hooks.runtime.Runtime.scale_loss>`).
            Both gradients are taken of scaled losses, so fp16 activation
            gradients do not underflow; the ratio does not depend on the scale.
            When a scaled gradient overflows, ``s`` is 1 (the scaler then skips
            the step anyway). ``None``: no scaling.

    Returns:
        Detached fp32 scalar ``s`` in (0, 1]; 1 when the calibration gradient is
        zero or a norm is not finite.

    Example:
        >>> w = nn.Parameter(torch.tensor([1.0, 2.0]))
        >>> ce, cal = w.sum(), 4 * w.sum()  # gradients (1, 1) and (4, 4)
        >>> float(adaptive_calibration_scale(ce, cal, [w]))
        0.25
        >>> float(adaptive_calibration_scale(cal, ce, [w]))  # ratio > 1: no scaling
        1.0
    """
    trainable = [p for p in params if p.requires_grad]
    device = ce.device
    if not trainable:
        return torch.ones((), dtype=torch.float32, device=device)
    scale = scale_loss or (lambda loss: loss)
    squared = torch.stack(
        [
            _squared_grad_norm(scale(ce), trainable, device),
            _squared_grad_norm(scale(cal), trainable, device),
        ]
    )
    if all_reduce is not None:
        squared = all_reduce(squared)
    sq_ce, sq_cal = squared[0], squared[1]
    ratio = (sq_ce / sq_cal.clamp_min(torch.finfo(torch.float32).tiny)).sqrt()
    one = torch.ones((), dtype=torch.float32, device=device)
    usable = (sq_cal > 0) & torch.isfinite(squared).all()
    return torch.where(usable, ratio.clamp(max=1.0), one).detach()
