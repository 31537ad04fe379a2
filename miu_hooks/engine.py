"""The MIU engine: one handle holding critics, taps and the per-epoch schedule.

``attach`` validates its inputs, taps the model in place and returns an
:class:`MIUHandle`. The plain loop (:func:`miu_hooks.unlearn`), the Trainer
callback and the Accelerate integration all drive this one handle:

* :meth:`MIUHandle.epoch_start` tunes both critics, then runs the forget pass
  while ``epoch < forget_epochs`` (docs/method.md §3.3 steps 1-2);
* :meth:`MIUHandle.retain_loss` is CE + λ·(Î_u − sg Î_o)² on a retain batch (step 3);
  with ``clip="adaptive"`` the calibration term is scaled by MINE's factor
  (:meth:`MIUHandle.retain_objective`).

The tuning phases are :class:`~miu_hooks.critic_tuning.CriticTuning`'s, the checks,
logs and checkpoint state :class:`~miu_hooks.handle_state.HandleBookkeeping`'s
(bases of the handle).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from miu_hooks.checks import active_checks, deferred
from miu_hooks.clipping import adaptive_calibration_scale
from miu_hooks.config import MIUConfig
from miu_hooks.critic_tuning import CriticTuning, _cycle, batchnorm_buffers_restored
from miu_hooks.data import Batch, forward_logits, is_deterministic, split_batch
from miu_hooks.errors import ConfigError, ConfigTypeError
from miu_hooks.estimators import MIEstimator
from miu_hooks.feature_cache import allocate_cache, cache_loader, chunked_score_table, read_rows
from miu_hooks.functional import (
    calibration_loss,
    check_group_range,
    checked_cross_entropy,
    forget_objective,
)
from miu_hooks.original import copy_frozen, load_original
from miu_hooks.precision import autocast_dtype
from miu_hooks.runtime import LocalRuntime, Runtime, resolve_device
from miu_hooks.taps import FeatureTap, feature_width_error, infer_feature_dim, unwrap_model
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


def critic_hidden(config: MIUConfig, feature_dim: int) -> int:
    """Hidden width of the critics for ``feature_dim``-wide features (``config.critic_width``).

    Example:
        >>> cfg = MIUConfig(critic_width="feature")
        >>> critic_hidden(MIUConfig(), 64), critic_hidden(cfg, 64), critic_hidden(cfg, 768)
        (512, 128, 512)
    """
    if config.critic_width == "feature":
        return min(config.mine_hidden, max(32, 2 * int(feature_dim)))
    return config.mine_hidden


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

    # -- critics -----------------------------------------------------------------
    def _build_critics(self, feature_dim: int) -> None:
        cfg = self.config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            hidden = critic_hidden(cfg, feature_dim)
            crit_u = MIEstimator(feature_dim, self.num_groups, hidden, cfg.ema)
            if cfg.critic_init == "shared":  # equal estimates while z_u == z_o
                crit_o = copy.deepcopy(crit_u)
            else:
                crit_o = MIEstimator(feature_dim, self.num_groups, hidden, cfg.ema)
        self.critic_model = crit_u.to(self.runtime.device).requires_grad_(False)
        self.critic_original = crit_o.to(self.runtime.device).requires_grad_(False)
        self.opt_critic_model = torch.optim.SGD(crit_u.parameters(), lr=cfg.mine_lr, momentum=0.9)
        self.opt_critic_original = torch.optim.SGD(
            crit_o.parameters(), lr=cfg.mine_lr, momentum=0.9
        )

    def _critics(self, z: Tensor) -> tuple[MIEstimator, MIEstimator]:
        if self.critic_model is None:
            self._build_critics(int(z.shape[1]))
        assert self.critic_model is not None and self.critic_original is not None
        if z.dim() != 2 or z.shape[1] != self.critic_model.feature_dim:
            # The first forward of a run (critic tuning, before any model update) gets here.
            raise feature_width_error(self.tap.name, z.shape, self.critic_model.feature_dim)
        return self.critic_model, self.critic_original

    @property
    def feature_dim(self) -> int | None:
        """Width d of the tapped features, once known."""
        return None if self.critic_model is None else self.critic_model.feature_dim

    # -- features ------------------------------------------------------------------
    def _original_ready(self) -> nn.Module:
        # Re-assert the mode before every use (docs/method.md §8.3); gradients are off
        # because every forward of the original runs under no_grad.
        self.original.train(self.config.original_mode == "train")
        return self.original

    @torch.no_grad()
    def original_features(self, batch: Batch) -> Tensor:
        """Return z_o for ``batch``: from the cache when indexed, else a no-grad forward."""
        if self.feature_cache is not None and batch.index is not None:
            return read_rows(self.feature_cache, batch.index, batch.host_index, self.runtime.device)
        original = self._original_ready()
        with self.runtime.autocast(), self.tap_original.capturing():
            forward_logits(original, batch.inputs)
        return self.tap_original.pop()

    @torch.no_grad()
    def build_feature_cache(self, loader: Iterable[Any], size: int) -> Tensor:
        """Compute the original model's features of every sample once.

        ``loader`` must yield indexed batches (see :class:`~miu_hooks.data.IndexedDataset`)
        covering positions ``0..size-1``; later batches carrying ``index`` read
        z_o from the cache instead of running the original model. On a GPU the
        cache is kept in fp32, in bf16 or on the host depending on its size
        (:mod:`miu_hooks.feature_cache`).
        """
        cache: Tensor | None = None
        self.feature_cache = None
        self._original_scores = None
        for raw in loader:
            batch = self.split(raw)
            assert batch.index is not None, "feature cache needs indexed batches"
            z = self.original_features(batch)
            if cache is None:
                cache = allocate_cache(size, int(z.shape[1]), z.device)
            cache[batch.index.to(cache.device)] = z.to(cache.device, cache.dtype)
        self.feature_cache = cache
        return cache if cache is not None else torch.zeros(0)

    def cache_features(
        self,
        train: Dataset,
        *,
        num_workers: int = 0,
        progress: Callable[[Iterable[Any], str], Iterable[Any]] | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> bool:
        """Cache z_o of every sample of ``train`` (= D) when ``config.feature_cache`` allows.

        ``"auto"`` caches when reading an item twice gives the same values (no
        random augmentation); ``"on"`` always; ``"off"`` never. Batches whose
        ``index`` is a position in ``train`` then read the cache. ``collate_fn``
        batches the items as training does (e.g. a Trainer's padding collator for
        text of varying length; default ``default_collate``). Returns whether the
        cache was built.
        """
        cfg = self.config
        if cfg.feature_cache == "off" or (
            cfg.feature_cache == "auto" and not is_deterministic(train)
        ):
            return False
        size = len(train)  # type: ignore[arg-type]
        device = self.runtime.device
        loader: Iterable[Any] = cache_loader(
            train, cfg.batch_size, device, num_workers, collate_fn=collate_fn
        )
        if progress is not None:
            loader = progress(loader, "caching original features")
        self.build_feature_cache(loader, size)
        logger.info("cached original-model features of %d samples", size)
        return True

    def split(self, raw: Any) -> Batch:
        """Split a raw batch with the config's keys and move it to the device."""
        cfg = self.config
        batch = (
            raw
            if isinstance(raw, Batch)
            else split_batch(
                raw,
                input_key=cfg.input_key,
                label_key=cfg.label_key,
                group_key=cfg.group_key,
                id_key=cfg.id_key,
            )
        )
        self.batch = batch.to(self.runtime.device)
        return self.batch

    # -- MI --------------------------------------------------------------------------
    def _marginal(self, n: int, device: torch.device) -> Tensor:
        gen = self.generator
        if gen.device == device:
            return torch.randint(0, self.num_groups, (n,), generator=gen, device=device)
        return torch.randint(0, self.num_groups, (n,), generator=gen, device=gen.device).to(device)

    def _global_batch(
        self, z_model: Tensor, groups: Tensor, extra: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Z (with autograd), groups and ``extra`` (detached rows) of the global batch.

        With several processes, the groups, ``extra`` and this rank's verdict on
        its pending local checks travel in one detached all-gather, so a check
        that failed on one rank fails the step on every rank
        (:meth:`~miu_hooks.checks.StepChecks.globalise`).
        """
        rt = self.runtime
        groups = groups.long().reshape(-1)
        if rt.world_size == 1:
            return z_model, groups, extra
        checks = active_checks()
        n = int(z_model.shape[0])
        code = checks.local_code(z_model.device) if checks is not None else z_model.new_zeros(())
        z_all = rt.gather(z_model)  # the step's batch-size check, when the runtime makes one
        cols = [groups.to(z_model.device).float().unsqueeze(1), code.float().expand(n, 1)]
        if extra is not None:
            cols.append(extra.detach().float())
        meta = rt.gather_detached(torch.cat(cols, 1))
        if checks is not None:
            checks.globalise(meta[::n, 1])
        return z_all, meta[:, 0].round().long(), (meta[:, 2:] if extra is not None else None)

    def _mi_model(
        self, z_model: Tensor, groups: Tensor, extra: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Î_u on the (global) batch, with the groups, the g̃ drawn and the gathered ``extra``."""
        z_model, groups, extra = self._global_batch(z_model, groups, extra)
        # Same value on every rank; clamped so a bad id cannot fault the device first.
        groups = check_group_range(groups, self.num_groups, local=False)
        crit_u, _ = self._critics(z_model)
        marginal = self._marginal(z_model.shape[0], z_model.device)
        return crit_u(z_model, groups, marginal, check_groups=False), groups, marginal, extra

    def mi_pair(
        self, z_model: Tensor, z_original: Tensor | None, groups: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        """Estimate Î_u and Î_o on the (global) batch with the same marginal groups."""
        extra = None if z_original is None else z_original.detach()
        mi_u, groups, marginal, z_o = self._mi_model(z_model, groups, extra)
        if z_o is None:
            return mi_u, None
        assert self.critic_original is not None
        return mi_u, self.critic_original(z_o, groups, marginal, check_groups=False)

    def uses_score_table(self) -> bool:
        """Whether retain steps read T_o's scores from a table rather than a T_o forward.

        With the feature cache, z_o is fixed and T_o only changes while tuning, so
        its scores of every cached row and group (an N x |G| table, rebuilt after
        each tuning phase) can be looked up instead of computed. The table costs
        N projections and N·|G| head evaluations per epoch, a T_o forward per
        retain step R projections and 2R for R retain rows: ``"auto"`` takes the
        table only when N·(d + |G|) <= R·(d + 2), and when R is unknown (the
        Trainer and Accelerate routes). Both give the same values (to float
        round-off).
        """
        if self.feature_cache is None or self.critic_original is None:
            return False
        if self.original_scoring != "auto":
            return self.original_scoring == "table"
        rows = self.retain_rows_per_epoch
        if rows is None:
            return True
        n, d = int(self.feature_cache.shape[0]), int(self.feature_cache.shape[1])
        return n * (d + self.num_groups) <= rows * (d + 2)

    def _cached_original_rows(self, batch: Batch) -> Tensor | None:
        """T_o's scores of this batch's cached z_o for every group, or ``None``.

        ``None`` also when :meth:`uses_score_table` prefers a T_o forward.
        """
        if batch.index is None or not self.uses_score_table():
            return None
        assert self.feature_cache is not None and self.critic_original is not None
        if self._original_scores is None:
            self._original_scores = chunked_score_table(
                self.critic_original.score_table, self.feature_cache, self.runtime.device
            )
        table = self._original_scores
        return table[batch.index.to(table.device)]

    def _mi_pair_cached(
        self, z_model: Tensor, rows: Tensor, groups: Tensor
    ) -> tuple[Tensor, Tensor]:
        """:meth:`mi_pair` with Î_o read from T_o's score table (same marginal groups)."""
        mi_u, groups, marginal, gathered = self._mi_model(z_model, groups, rows)
        assert self.critic_original is not None and gathered is not None
        rows = gathered
        joint = rows.gather(1, groups.unsqueeze(1)).squeeze(1)
        marg = rows.gather(1, marginal.unsqueeze(1)).squeeze(1)
        return mi_u, self.critic_original.bound(joint, marg)

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
