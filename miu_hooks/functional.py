r"""Pure tensor functions of REWEIGHT and MIU (docs/method.md §1-§3).

Everything stateful (critics, EMA buffers, samplers) lives in thin classes
that call these functions, so each quantity has one implementation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from miu_hooks.checks import GROUP_RANGE, LABEL_RANGE, require
from miu_hooks.errors import ConfigError, EmptyGroupError, GroupRangeError

__all__ = [
    "calibration_loss",
    "check_group_range",
    "checked_cross_entropy",
    "dv_bound",
    "ema_log_mean_exp",
    "forget_objective",
    "group_counts",
    "group_index",
    "group_weights",
    "log_mean_exp",
]


def group_index(labels: Tensor, sensitive: Tensor, num_sensitive: int) -> Tensor:
    r"""Return group ids :math:`g = s + y \cdot S` for labels ``y`` and attributes ``s``.

    Args:
        labels: LongTensor[N] of target labels y >= 0.
        sensitive: LongTensor[N] of sensitive attributes s in [0, S).
        num_sensitive: S, the number of sensitive-attribute values.

    Returns:
        LongTensor[N] of group ids.

    Raises:
        GroupRangeError: A label is negative or an attribute lies outside [0, S).

    Example:
        >>> group_index(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1]), 2).tolist()
        [0, 1, 2, 3]
    """
    labels = torch.as_tensor(labels).long()
    sensitive = torch.as_tensor(sensitive).long()
    if num_sensitive < 1:
        raise GroupRangeError(f"num_sensitive must be >= 1; got {num_sensitive}")
    if labels.shape != sensitive.shape:
        raise GroupRangeError(
            f"labels and sensitive must have the same shape; got {tuple(labels.shape)} "
            f"and {tuple(sensitive.shape)}"
        )
    if labels.numel() and int(labels.min()) < 0:
        raise GroupRangeError(f"labels must be >= 0; got {int(labels.min())}")
    if sensitive.numel() and (int(sensitive.min()) < 0 or int(sensitive.max()) >= num_sensitive):
        bad = sensitive[(sensitive < 0) | (sensitive >= num_sensitive)][0]
        raise GroupRangeError(f"sensitive attribute {int(bad)} is outside [0, {num_sensitive})")
    return sensitive + labels * num_sensitive


def group_counts(groups: Tensor, num_groups: int) -> Tensor:
    """Return LongTensor[num_groups] with the number of samples in each group.

    Raises:
        GroupRangeError: A group id lies outside ``[0, num_groups)``.

    Example:
        >>> group_counts(torch.tensor([0, 2, 2]), 3).tolist()
        [1, 0, 2]
    """
    groups = torch.as_tensor(groups).long().reshape(-1)
    check_group_range(groups, num_groups)
    return torch.bincount(groups, minlength=num_groups)


def check_group_range(groups: Tensor, num_groups: int, *, local: bool = True) -> Tensor:
    """Require every id to lie in ``[0, num_groups)``; return the ids clamped into it.

    Outside a :func:`~miu_hooks.checks.deferred` scope this raises
    :class:`GroupRangeError` at once (one host sync, whatever the device); inside
    one the check is read with the step's other checks, and the clamped ids keep
    a device lookup (an embedding row per group) from faulting meanwhile.

    Example:
        >>> check_group_range(torch.tensor([0, 3]), 4).tolist()
        [0, 3]
        >>> check_group_range(torch.tensor([0, 4]), 4)
        Traceback (most recent call last):
        ...
        miu_hooks.errors.GroupRangeError: group id 4 is outside [0, 4)
    """
    if not groups.numel():
        return groups
    bad = (groups < 0) | (groups >= num_groups)

    def error() -> GroupRangeError:
        return GroupRangeError(f"group id {int(groups[bad][0])} is outside [0, {num_groups})")

    require(bad.logical_not(), error, GROUP_RANGE, local=local)
    return groups.clamp(0, num_groups - 1)


def group_weights(
    train_groups: Tensor, retain_groups: Tensor, num_groups: int | None = None
) -> Tensor:
    r"""Return REWEIGHT weights :math:`w_g = N_g(D) / N_g(D_r)` per group.

    Sampling retain samples with probability proportional to their group's
    weight reproduces the group mixture of the original training set D.

    Args:
        train_groups: LongTensor[N] of group ids of the full training set D.
        retain_groups: LongTensor[N_r] of group ids of the retain set D_r.
        num_groups: Number of groups |G|; default ``max id + 1``.

    Returns:
        FloatTensor[num_groups]; 1.0 for groups absent from both sets.

    Raises:
        EmptyGroupError: A group is present in D but has no retain sample.
        GroupRangeError: A retain group is absent from D or an id is out of range.

    Example:
        >>> group_weights(torch.tensor([0, 0, 1, 1, 1, 1]), torch.tensor([0, 0, 1, 1])).tolist()
        [1.0, 2.0]
    """
    train_groups = torch.as_tensor(train_groups).long().reshape(-1)
    retain_groups = torch.as_tensor(retain_groups).long().reshape(-1)
    if num_groups is None:
        both = torch.cat([train_groups, retain_groups])
        num_groups = int(both.max()) + 1 if both.numel() else 0
    n_train = group_counts(train_groups, num_groups)
    n_retain = group_counts(retain_groups, num_groups)
    emptied = ((n_train > 0) & (n_retain == 0)).nonzero().flatten().tolist()
    if emptied:
        raise EmptyGroupError(
            f"group {emptied[0]} has {int(n_train[emptied[0]])} training samples but none left "
            "in the retain set: REWEIGHT cannot restore it (forget fewer samples of that group)"
        )
    extra = (n_retain > n_train).nonzero().flatten().tolist()
    if extra:
        raise GroupRangeError(
            f"group {extra[0]} has more retain samples ({int(n_retain[extra[0]])}) than training "
            f"samples ({int(n_train[extra[0]])}): the retain set must be a subset of D"
        )
    weights = torch.ones(num_groups, dtype=torch.float32)
    present = n_retain > 0
    weights[present] = n_train[present].double().div(n_retain[present].double()).float()
    return weights


def log_mean_exp(scores: Tensor) -> Tensor:
    r"""Return :math:`\log \frac{1}{B}\sum_i e^{s_i}` computed stably in fp32.

    Example:
        >>> round(float(log_mean_exp(torch.zeros(5))), 6)
        0.0
    """
    scores = scores.float().reshape(-1)
    return torch.logsumexp(scores, 0) - math.log(scores.numel())


class _EMALogMeanExp(torch.autograd.Function):
    """log-mean-exp whose gradient uses a running mean as the denominator (MINE)."""

    @staticmethod
    def forward(ctx: Any, scores: Tensor, log_running_mean: Tensor, value: Tensor | None) -> Tensor:
        ctx.save_for_backward(scores, log_running_mean)
        if value is not None:  # the caller's log-mean-exp of these scores
            return value.clone()
        return torch.logsumexp(scores, 0) - math.log(scores.numel())

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor, None, None]:
        scores, log_running_mean = ctx.saved_tensors
        grad = torch.exp(scores - log_running_mean) / scores.numel()
        return grad_output * grad, None, None


def ema_log_mean_exp(
    scores: Tensor, log_running_mean: Tensor, value: Tensor | None = None
) -> Tensor:
    r"""log-mean-exp of ``scores`` with MINE's bias-corrected gradient.

    The value is the plain :math:`\log \frac{1}{B}\sum_i e^{s_i}`; the gradient
    with respect to :math:`s_i` is :math:`e^{s_i} / (B\, m)`, where
    :math:`m = e^{\text{log\_running\_mean}}` is the moving average of
    :math:`\frac{1}{B}\sum_i e^{s_i}` (already updated with this batch).

    Args:
        scores: FloatTensor[B] of critic scores on marginal samples.
        log_running_mean: Scalar tensor, the log of the moving average m.
        value: ``log_mean_exp(scores)`` when the caller has it already (not recomputed).

    Returns:
        A differentiable scalar.

    Example:
        >>> s = torch.zeros(4, requires_grad=True)
        >>> ema_log_mean_exp(s, torch.tensor(math.log(2.0))).backward()
        >>> s.grad.tolist()
        [0.125, 0.125, 0.125, 0.125]
    """
    return _EMALogMeanExp.apply(
        scores.float().reshape(-1),
        log_running_mean.detach().float(),
        None if value is None else value.detach().float(),
    )


def dv_bound(joint_scores: Tensor, marginal_scores: Tensor) -> Tensor:
    r"""Donsker-Varadhan lower bound from critic scores, in nats.

    .. math::
        \hat I = \frac{1}{B}\sum_i T(z_i, g_i) - \log \frac{1}{B}\sum_i e^{T(z_i, \tilde g_i)}

    Args:
        joint_scores: FloatTensor[B], scores of the paired samples.
        marginal_scores: FloatTensor[B], scores of the samples with marginal groups.

    Returns:
        A differentiable scalar (plain gradient; see :class:`MIEstimator` for MINE's).

    Example:
        >>> float(dv_bound(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0])))
        1.0
    """
    return joint_scores.float().mean() - log_mean_exp(marginal_scores)


def forget_objective(
    joint_scores: Tensor,
    marginal_scores: Tensor,
    mi: Tensor,
    kind: str = "floor",
    tau: float = 5.0,
) -> Tensor:
    r"""MIU's forget-step loss on a forget batch, from the critic's scores and estimate.

    * ``"floor"``: :math:`\max(0, \hat I)`. The DV estimate is a lower bound on a
      non-negative quantity, so a value below zero carries no information about the
      group; the floor stops rewarding features pushed past "no information"
      (minimising :math:`\hat I` itself is unbounded below with the critic fixed).
    * ``"smile"``: the SMILE estimate (Song & Ermon, 2020), the joint mean minus the
      log-mean-exp of the marginal scores clipped to :math:`[-\tau, \tau]`, also
      floored at zero.
    * ``"dv"``: :math:`\hat I` as is (the paper's objective; unbounded below).

    Args:
        joint_scores: FloatTensor[B], T(z_i, g_i).
        marginal_scores: FloatTensor[B], T(z_i, g̃_i).
        mi: The critic's DV estimate of the batch (with MINE's corrected gradient);
            used by ``"floor"`` and ``"dv"``.
        kind: ``"floor"``, ``"smile"`` or ``"dv"``.
        tau: SMILE's clipping bound τ.

    Returns:
        A differentiable scalar.

    Example:
        >>> j, m = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])
        >>> mi = dv_bound(j, m)
        >>> float(forget_objective(j, m, mi)), float(forget_objective(j, m, -mi))
        (2.0, 0.0)
        >>> float(forget_objective(j, m, -mi, kind="dv"))
        -2.0
    """
    if kind == "dv":
        return mi
    if kind == "floor":
        return F.relu(mi)
    if kind == "smile":
        clipped = marginal_scores.float().clamp(-tau, tau)
        return F.relu(joint_scores.float().mean() - log_mean_exp(clipped))
    raise ConfigError(f"unknown forget objective {kind!r}; choose floor, smile or dv")


def calibration_loss(mi_model: Tensor, mi_original: Tensor) -> Tensor:
    r"""MIU's calibration term :math:`(\hat I_u - \mathrm{sg}[\hat I_o])^2`.

    The original model's estimate is detached: only the unlearned model moves.

    Example:
        >>> round(float(calibration_loss(torch.tensor(0.5), torch.tensor(0.2))), 6)
        0.09
    """
    return (mi_model.float() - mi_original.detach().float()).pow(2)


def checked_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy in fp32, with a clear error for labels outside the logits.

    The label check goes through :func:`~miu_hooks.checks.require`: read at once
    outside a step scope, with the step's other checks inside one (the loss is
    then computed on clamped labels, so a bad label never reaches the device
    kernel, where it would be a fatal assert rather than an error).

    Example:
        >>> round(float(checked_cross_entropy(torch.zeros(2, 2), torch.tensor([0, 1]))), 4)
        0.6931
    """
    num_classes = logits.shape[-1]
    if not labels.numel():
        return F.cross_entropy(logits.float(), labels)
    bad = (labels < 0) | (labels >= num_classes)

    def error() -> GroupRangeError:
        return GroupRangeError(
            f"label {int(labels[bad][0])} is outside [0, {num_classes}) (the model's logits)"
        )

    require(bad.logical_not(), error, LABEL_RANGE)
    return F.cross_entropy(logits.float(), labels.clamp(0, num_classes - 1))
