"""The MIU engine: one handle holding critics, taps and the per-epoch schedule.

``attach`` validates its inputs, taps the model in place and returns an
:class:`MIUHandle`. The plain loop (:func:`miu_hooks.unlearn`), the Trainer
callback and the Accelerate integration all drive this one handle:

* :meth:`MIUHandle.epoch_start` tunes both critics, then runs the forget pass
  while ``epoch < forget_epochs`` (docs/method.md §3.3 steps 1-2);
* :meth:`MIUHandle.retain_loss` is CE + λ·(Î_u − sg Î_o)² on a retain batch (step 3);
  with ``clip="adaptive"`` the calibration term is scaled by MINE's factor
  (:meth:`MIUHandle.retain_objective`).

The handle's bases hold the rest: the critics and their estimates on the global batch
(:class:`~miu_hooks.critic_estimates.CriticEstimates`), the original's features, their
cache and T_o's score table (:class:`~miu_hooks.original_features.OriginalFeatures`),
the tuning phases (:class:`~miu_hooks.critic_tuning.CriticTuning`), and the checks,
logs and checkpoint state (:class:`~miu_hooks.handle_state.HandleBookkeeping`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from miu_hooks.checks import deferred
from miu_hooks.clipping import adaptive_calibration_scale
from miu_hooks.config import MIUConfig
from miu_hooks.critic_estimates import critic_hidden
from miu_hooks.critic_tuning import CriticTuning, _cycle, batchnorm_buffers_restored
from miu_hooks.data import Batch, forward_logits
from miu_hooks.errors import ConfigError, ConfigTypeError
from miu_hooks.estimators import MIEstimator
from miu_hooks.functional import (
    calibration_loss,
    check_group_range,
    checked_cross_entropy,
    forget_objective,
)
from miu_hooks.original import copy_frozen, load_original
from miu_hooks.precision import autocast_dtype
from miu_hooks.runtime import LocalRuntime, Runtime, resolve_device
from miu_hooks.taps import FeatureTap, infer_feature_dim, unwrap_model
from miu_hooks.wrappers import refuse_unsupported

__all__ = [
    "MIUHandle",
    "attach",
    "batchnorm_buffers_restored",
    "critic_hidden",
    "resolve_original",
]

logger = logging.getLogger(__name__)

OriginalSpec = nn.Module | str | os.PathLike[str] | None


def resolve_original(model: nn.Module, original: OriginalSpec) -> nn.Module:
    """Return the frozen original model for ``original`` (see :func:`attach`)."""
    if original is None:
        return load_original(unwrap_model(model))
    if isinstance(original, (str, os.PathLike)):
        return load_original(unwrap_model(model), original)
    if isinstance(original, nn.Module):
        # Used as is: put in eval mode, weights and requires_grad untouched (every
        # forward of the original runs under no_grad).
        return original.eval()
    raise ConfigTypeError(
        f"original must be None, a safetensors path or an nn.Module; got {type(original).__name__}"
    )


class MIUHandle(CriticTuning):
    """State and steps of MIU attached to one model (returned by :func:`attach`).

    Attributes:
        model: The unlearned model (tapped in place, never wrapped).
        original: The frozen original model (eval mode, no gradients).
        config: The run's :class:`MIUConfig`.
        runtime: How steps are executed (device, precision, collectives).
        tap: Feature tap on the model's head.
        critic_model: T_u, the critic on the unlearned model's features.
        critic_original: T_o, the critic on the original model's features.
        log_counts: Values logged per ``miu/*`` key since the last :meth:`pop_logs`
            (their running sums stay on the device: one scalar per key).
        original_scoring: How retain steps score cached z_o with T_o: ``"auto"`` (by
            cost, :meth:`uses_score_table`), ``"table"`` or ``"direct"``; the values
            are the same either way.
        tie_critics: Compute a tuning step once when T_o is T_u's exact copy and z_o
            equals z_u (:meth:`_tune_step`); the critics are the same either way.
    """

    original_scoring = "auto"
    tie_critics = True

    def __init__(
        self,
        model: nn.Module,
        config: MIUConfig,
        *,
        original: nn.Module,
        num_groups: int,
        feature_module: str | nn.Module | None = None,
        runtime: Runtime | None = None,
        forward_model: nn.Module | None = None,
        tap_when: str = "always",
    ) -> None:
        refuse_unsupported(model, forward_model)
        self.model = unwrap_model(model)
        self.forward_model = forward_model if forward_model is not None else model
        self.config = config
        self.num_groups = int(num_groups)
        self.runtime = runtime or LocalRuntime(resolve_device(config.device), config.precision)
        if config.clip == "adaptive" and getattr(self.runtime, "sharded", False):
            raise ConfigError(
                "MIUConfig.clip='adaptive' needs full per-parameter gradients, which sharded "
                "models (FSDP, DeepSpeed, Megatron) do not expose; use clip='norm'"
            )
        dtype = autocast_dtype(self.runtime.precision)
        if config.original_precision == "compute" and dtype is not None:
            original = copy_frozen(original).to(dtype)  # the caller's module is left as it is
        self.original = original.to(self.runtime.device)
        self.tap = FeatureTap(self.model, feature_module, when=tap_when)  # type: ignore[arg-type]
        try:
            self.tap_original = FeatureTap(self.original, self.tap.name)
        except Exception:
            self.tap.remove()
            raise
        self.critic_model: MIEstimator | None = None
        self.critic_original: MIEstimator | None = None
        self.opt_critic_model: torch.optim.Optimizer | None = None
        self.opt_critic_original: torch.optim.Optimizer | None = None
        # Marginal groups are drawn on the run's device: no host-to-device copy per step.
        self.generator = torch.Generator(device=self.runtime.device)
        self.generator.manual_seed(config.seed + 7919)
        self.feature_cache: Tensor | None = None
        # T_o(z_o_i, g) for every cached sample and group; valid until T_o changes.
        self._original_scores: Tensor | None = None
        #: Retain rows drawn between two tuning phases (one epoch), when the loop knows it.
        self.retain_rows_per_epoch: int | None = None
        self.epoch = 0
        self.counters = {"tune": 0, "forget": 0, "retain": 0}
        self.tied_steps = 0  # tuning steps computed once for both critics
        self.reused_steps = 0  # tuning steps whose z_u were a row's features of its phase
        self._tune_estimate: Tensor | None = None  # (Î_u + Î_o)/2 of the last tuning step
        self.warmup_steps: int | None = None  # steps the first tuning phase ran
        self.batch: Batch | None = None  # the batch being processed (blamed for NaN inputs)
        self.log_counts: dict[str, int] = {}
        self._log_sums: dict[str, Tensor] = {}
        self.enabled = True
        dim = infer_feature_dim(self.tap.module)
        if dim is not None:
            self._build_critics(dim)

    # -- the three steps ---------------------------------------------------------------
    def forget_loss(self, z_model: Tensor, groups: Tensor) -> Tensor:
        """L_f on a forget batch (critic fixed): Î_u floored at zero by default.

        ``config.forget_objective`` picks the objective
        (:func:`~miu_hooks.functional.forget_objective`; docs/method.md §3.2):
        ``"floor"`` max(0, Î_u), ``"smile"`` SMILE's clipped estimate floored at zero,
        ``"dv"`` Î_u itself (the paper's, unbounded below). ``miu/forget_mi`` logs Î_u.
        """
        z, groups, _ = self._global_batch(z_model, groups, None)
        # Same value on every rank; clamped so a bad id cannot fault the device first.
        groups = check_group_range(groups, self.num_groups, local=False)
        crit_u, _ = self._critics(z)
        marginal = self._marginal(z.shape[0], z.device)
        joint, marg = crit_u.scores_pair(z.float(), groups, marginal, check_groups=False)
        mi_u = crit_u.bound(joint, marg)
        self.check_finite(mi_u, "forget", "I_u", local=False)
        self._log("miu/forget_mi", mi_u)
        cfg = self.config
        return forget_objective(joint, marg, mi_u, cfg.forget_objective, cfg.smile_tau)

    def retain_penalty(self, z_model: Tensor, batch: Batch) -> Tensor:
        """λ·(Î_u − sg Î_o)² on a retain batch, both with the same marginal groups."""
        self.batch = batch
        with deferred(self._reduce_max()):
            cal = self._calibration(z_model, batch)
            self.check_finite(cal, "retain", "calibration", local=False)
        self.counters["retain"] += 1
        return self.config.mi_weight * cal

    def _calibration(self, z_model: Tensor, batch: Batch) -> Tensor:
        rows = self._cached_original_rows(batch)
        mi_o: Tensor | None
        if rows is not None:
            mi_u, mi_o = self._mi_pair_cached(z_model, rows, batch.groups)
        else:
            mi_u, mi_o = self.mi_pair(z_model, self.original_features(batch), batch.groups)
        assert mi_o is not None
        cal = calibration_loss(mi_u, mi_o)
        self._log("miu/mi_model", mi_u)
        self._log("miu/mi_original", mi_o)
        self._log("miu/calibration", cal)
        return cal

    def retain_loss(self, logits: Tensor, batch: Batch) -> Tensor:
        """MIU's retain loss: CE(logits, y) + λ·(Î_u − sg Î_o)² (the tap's features).

        Under ``clip="adaptive"`` the calibration term is scaled by MINE's factor
        (:meth:`retain_objective`).
        """
        self.batch = batch
        # Every check of the step is read once: here, or by the caller's step when
        # one is open (miu_hooks.unlearn reads them right before its optimiser step).
        with deferred(self._reduce_max()):
            ce = checked_cross_entropy(logits, batch.labels)
            self.check_finite(ce, "retain", "cross-entropy")
            z_model = self.tap.pop()
            if not (self.enabled and self.config.calibrate and self.config.mi_weight > 0):
                self.counters["retain"] += 1
                return ce
            cal = self._calibration(z_model, batch)
            self.check_finite(cal, "retain", "calibration", local=False)
            loss = self.retain_objective(ce, self.config.mi_weight * cal)
            self._log("miu/ce", ce)
        self.counters["retain"] += 1
        return loss

    def retain_objective(self, ce: Tensor, term: Tensor) -> Tensor:
        """Combine the task loss and the weighted calibration term of a retain batch.

        With ``config.clip == "norm"`` this is ``ce + term``. With ``"adaptive"``
        it is ``ce + s·term``, where s = min(1, ‖∇ce‖/‖∇term‖) over the model's
        trainable parameters is detached and logged as ``miu/adaptive_scale``
        (:func:`~miu_hooks.clipping.adaptive_calibration_scale`; two extra
        backward passes, squared norms averaged over processes). Its gradient
        is MINE's g_CE + min(1, ‖g_CE‖/‖g_cal‖)·g_cal (docs/method.md §8.1).

        Args:
            ce: Scalar task loss of the batch (with its graph).
            term: Scalar λ·(Î_u − sg Î_o)², weighted as it enters the loss.

        Returns:
            The scalar retain loss.
        """
        if self.config.clip != "adaptive":
            return ce + term
        scale = adaptive_calibration_scale(
            ce,
            term,
            self.model.parameters(),
            all_reduce=self.runtime.all_reduce_mean,
            scale_loss=self.runtime.scale_loss,
        )
        self._log("miu/adaptive_scale", scale)
        return ce + scale * term

    def forget_pass(self, loader: Iterable[Any], optimizer: torch.optim.Optimizer) -> None:
        """One pass over the forget loader minimising Î_u (docs/method.md §3.3 step 2)."""
        rt, cfg = self.runtime, self.config
        self.forward_model.train()
        for raw in loader:
            batch = self.split(raw)
            with deferred(self._reduce_max()) as checks:
                optimizer.zero_grad(set_to_none=True)
                with rt.autocast():
                    forward_logits(self.forward_model, batch.inputs)
                loss = self.forget_loss(self.tap.pop(), batch.groups)
                rt.backward(loss)
                rt.sync_model_grads(self.model)
                if cfg.max_grad_norm is not None:
                    rt.clip_grad_norm(optimizer, self.model.parameters(), cfg.max_grad_norm)
                self._flush(checks, optimizer=optimizer)  # the step's one host read
                rt.step(optimizer)
            self.counters["forget"] += 1

    def epoch_start(
        self,
        epoch: int,
        *,
        optimizer: torch.optim.Optimizer,
        forget_loader: Iterable[Any],
        tune_loader: Iterable[Any],
    ) -> None:
        """Tune the critics, then (for ``epoch < forget_epochs``) run the forget pass."""
        self.epoch = epoch
        cfg = self.config
        if epoch == 0:
            self.warmup_steps = self.tune(
                _cycle(tune_loader, epoch), cfg.mine_warmup_iters, tol=cfg.mine_warmup_tol
            )
        else:
            self.tune(
                _cycle(tune_loader, epoch),
                cfg.mine_iters,
                original=cfg.tune_original == "every_epoch",
            )
        if epoch < self.config.forget_epochs:
            self.forget_pass(forget_loader, optimizer)

    # -- bookkeeping -----------------------------------------------------------------------
    def remove(self) -> None:
        """Remove both taps; idempotent. The model is left exactly as attached."""
        self.tap.remove()
        self.tap_original.remove()
        self.enabled = False

    def __enter__(self) -> MIUHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach(
    model: nn.Module,
    config: MIUConfig | None = None,
    *,
    num_groups: int,
    original: OriginalSpec = None,
    feature_module: str | nn.Module | None = None,
    runtime: Runtime | None = None,
    forward_model: nn.Module | None = None,
    tap_when: str = "always",
) -> MIUHandle:
    """Attach MIU to ``model`` in place and return the handle that drives it.

    Build (or pass) the original model *before* attaching: a deep copy of a
    tapped model would carry the tap. ``original=None`` snapshots ``model`` as
    it is now.

    Args:
        model: The classifier to unlearn (never wrapped; hooks only).
        config: Run configuration (defaults to ``MIUConfig()``).
        num_groups: |G|, the number of (label, attribute) groups.
        original: ``None`` (snapshot of ``model``), a safetensors path, or a module.
        feature_module: Head override for the feature tap.
        runtime: Execution runtime (default: a :class:`LocalRuntime` from the config).
        forward_model: The module to call for training forwards when ``model`` is
            wrapped (e.g. by DDP); hooks are still placed on the unwrapped model.
        tap_when: ``"always"`` or ``"train"`` (see :class:`FeatureTap`).

    Returns:
        The :class:`MIUHandle`; ``handle.remove()`` (or ``with``) detaches it.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> with attach(net, MIUConfig(device="cpu", mine_hidden=16), num_groups=4) as h:
        ...     h.feature_dim
        8
        >>> len(net[2]._forward_pre_hooks)
        0
    """
    config = config or MIUConfig()
    if num_groups < 1:
        raise ConfigError(f"num_groups must be >= 1; got {num_groups}")
    frozen = resolve_original(model, original)
    if frozen is unwrap_model(model):
        raise ConfigError("original must be a separate module, not the model being unlearned")
    return MIUHandle(
        model,
        config,
        original=frozen,
        num_groups=num_groups,
        feature_module=feature_module,
        runtime=runtime,
        forward_model=forward_model,
        tap_when=tap_when,
    )
