"""The MIU engine: one handle holding critics, taps and the per-epoch schedule.

``attach`` validates its inputs, taps the model in place and returns an
:class:`MIUHandle`. The plain loop (:func:`miu_hooks.unlearn`), the Trainer
callback and the Accelerate integration all drive this one handle:

* :meth:`MIUHandle.epoch_start` tunes both critics, then runs the forget pass
  while ``epoch < forget_epochs`` (docs/method.md §3.3 steps 1-2);
* :meth:`MIUHandle.retain_loss` is CE + λ·(Î_u − sg Î_o)² on a retain batch (step 3);
  with ``clip="adaptive"`` the calibration term is scaled by MINE's factor
  (:meth:`MIUHandle.retain_objective`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from miu_hooks.checks import active_checks, deferred
from miu_hooks.clipping import adaptive_calibration_scale
from miu_hooks.config import MIUConfig
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
from miu_hooks.handle_state import HandleBookkeeping
from miu_hooks.original import copy_frozen, load_original
from miu_hooks.phase_features import PhaseFeatures
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


@contextlib.contextmanager
def batchnorm_buffers_restored(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Snapshot BatchNorm running statistics and restore them on exit."""
    if not enabled:
        yield
        return
    saved = [
        (m, {k: b.detach().clone() for k, b in m.named_buffers(recurse=False) if b is not None})
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase)
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers in saved:
                for name, value in buffers.items():
                    getattr(module, name).copy_(value)


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


#: Steps per window of the warm-up's convergence test (``MIUConfig.mine_warmup_tol``).
WARMUP_WINDOW = 10


def _converged(windows: list[float], tol: float) -> bool:
    """Whether the last three window means moved by less than ``tol`` twice in a row.

    Two consecutive small moves, not one: a single pair of noisy window means can
    be close while the estimate is still rising.

    Example:
        >>> _converged([0.1, 0.2, 0.205], 0.01), _converged([0.1, 0.195, 0.2, 0.204], 0.01)
        (False, True)
    """
    if len(windows) < 3:
        return False
    a, b, c = windows[-3:]
    return abs(b - a) < tol and abs(c - b) < tol


def _cycle(loader: Iterable[Any], epoch: int) -> Iterator[Any]:
    """Iterate ``loader`` forever; each pass is reshuffled from (epoch, pass)."""
    k = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch * 1009 + k)
        yield from loader
        k += 1


class MIUHandle(HandleBookkeeping):
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
    def tune(
        self,
        batches: Iterator[Any],
        steps: int,
        *,
        tol: float | None = None,
        original: bool = True,
    ) -> int:
        """Run ``steps`` critic-tuning steps, features under ``no_grad`` (docs/method.md §3.3).

        Args:
            batches: Batches of D.
            steps: The number of steps (at most, with ``tol``).
            tol: Stop early once the mean of (Î_u + Î_o)/2 over a window of
                :data:`WARMUP_WINDOW` steps has moved by less than ``tol`` nats from
                the previous window's, twice in a row (:func:`_converged`; one host
                read per window).
            original: Tune T_o too (``False``: T_u alone; T_o is left as it is).

        Returns:
            The number of steps run.
        """
        if steps <= 0:
            return 0
        was_training = self.model.training
        self.model.train()
        saved = self._critic_snapshot()
        tied = original and self._critics_identical()
        memo = self._phase_features(steps)
        done = 0
        windows: list[float] = []
        window_sum: Tensor | None = None
        try:
            with batchnorm_buffers_restored(self.model, self.config.restore_batchnorm), deferred(
                self._reduce_max()
            ) as checks:
                while done < steps:
                    tied = self._tune_step(
                        self.split(next(batches)), tied=tied, original=original, memo=memo
                    )
                    done += 1
                    if tol is None:
                        continue
                    mi = self._tune_estimate
                    assert mi is not None
                    window_sum = mi if window_sum is None else window_sum + mi
                    if done % WARMUP_WINDOW == 0:
                        windows.append(float(window_sum) / WARMUP_WINDOW)  # one host read
                        window_sum = None
                        if _converged(windows, tol):
                            break
                if tied:
                    self._copy_critic()
                if memo is not None:
                    self.reused_steps += memo.reused
                # One host read for the whole phase; a failure puts the critics back.
                self._flush(checks, restore=saved)
            if tol is not None:
                logger.info("critic warm-up: %d of at most %d steps (tol %g nats; window "
                            "means %s)", done, steps, tol,
                            ", ".join(f"{w:.4f}" for w in windows))  # fmt: skip
        finally:
            self.model.train(was_training)
            if self.critic_model is not None and self.critic_original is not None:
                self.critic_model.requires_grad_(False)
                self.critic_original.requires_grad_(False)
        return done

    def _phase_features(self, steps: int) -> PhaseFeatures | None:
        """A store of z_u per row of D for one tuning phase, when reusing them is allowed.

        ``MIUConfig.tune_features="reuse"`` (the default) on a single-process run whose
        data are cached (the feature cache exists: reading an item twice gives the same
        values); batches must carry their positions in D. A phase of ``steps`` batches
        then runs at most one model forward per batch of distinct rows.
        """
        if (
            self.config.tune_features != "reuse"
            or steps < 2
            or self.feature_cache is None
            or self.runtime.world_size != 1
        ):
            return None
        return PhaseFeatures(int(self.feature_cache.shape[0]), steps)

    def _critics_identical(self) -> bool:
        """Whether T_u and T_o, their EMA and their optimisers are in the same state, exactly.

        Then a tuning step on equal features gives both the same update, and it is
        computed once (:meth:`_tune_step`). Checked on CPU runs of one process
        only: comparing the features of every step is a host read.
        """
        cu, co = self.critic_model, self.critic_original
        ou, oo = self.opt_critic_model, self.opt_critic_original
        if cu is None or co is None or ou is None or oo is None:
            return False
        rt = self.runtime
        if not self.tie_critics or rt.device.type != "cpu" or rt.world_size != 1:
            return False
        if not all(
            torch.equal(a, b)
            for a, b in zip(cu.state_dict().values(), co.state_dict().values(), strict=True)
        ):
            return False
        hyper = [[{k: v for k, v in g.items() if k != "params"} for g in o.param_groups]
                 for o in (ou, oo)]  # fmt: skip
        if hyper[0] != hyper[1]:
            return False
        for pu, po in zip(cu.parameters(), co.parameters(), strict=True):
            su, so = ou.state.get(pu, {}), oo.state.get(po, {})
            if su.keys() != so.keys():
                return False
            for key, value in su.items():
                other = so[key]
                same = (
                    torch.equal(value, other)
                    if isinstance(value, Tensor) and isinstance(other, Tensor)
                    else value is None and other is None
                )
                if not same:
                    return False
        return True

    @torch.no_grad()
    def _copy_critic(self) -> None:
        """Make T_o and its optimiser a copy of T_u and its optimiser (after tied steps)."""
        cu, co = self.critic_model, self.critic_original
        ou, oo = self.opt_critic_model, self.opt_critic_original
        assert cu is not None and co is not None and ou is not None and oo is not None
        for a, b in zip(cu.state_dict().values(), co.state_dict().values(), strict=True):
            b.copy_(a)
        for pu, po in zip(cu.parameters(), co.parameters(), strict=True):
            if pu in ou.state:
                oo.state[po] = {
                    k: v.clone() if isinstance(v, Tensor) else v for k, v in ou.state[pu].items()
                }
        self._original_scores = None

    def _tune_step(
        self,
        batch: Batch,
        *,
        tied: bool = False,
        original: bool = True,
        memo: PhaseFeatures | None = None,
    ) -> bool:
        """One critic-tuning step; returns whether the critics are still tied.

        ``tied``: T_o is T_u's exact copy, with only T_u updated since
        (:meth:`_critics_identical`). When z_o equals z_u too, T_o's step would be
        T_u's, bit for bit: T_u alone is stepped and T_o stays a lazy copy
        (:meth:`_copy_critic`) until the features differ or the phase ends.
        ``original=False`` tunes T_u alone (``MIUConfig.tune_original="warmup"``).
        ``memo``: this phase's features of the rows seen so far (:meth:`_phase_features`);
        a batch whose rows were all seen needs no model forward.
        """
        z_u = memo.lookup(batch) if memo is not None else None
        if z_u is None:
            with torch.no_grad(), self.runtime.autocast(), self.tap.capturing():
                forward_logits(self.model, batch.inputs)
            z_u = self.tap.pop().detach()
            if memo is not None:
                memo.store(batch, z_u)
        if not original:
            z_o = None
        elif self.config.tune_original_on == "original":
            z_o = self.original_features(batch)
        else:
            z_o = z_u
        crit_u, crit_o = self._critics(z_u)
        assert self.opt_critic_model is not None and self.opt_critic_original is not None
        same = z_o is not None and (
            z_o is z_u or (z_o.dtype == z_u.dtype and torch.equal(z_o, z_u))
        )
        if z_o is None or (tied and same):
            crit_u.requires_grad_(True)
            mi_u = self._mi_model(z_u, batch.groups)[0]
            if z_o is None:
                self.check_finite(-mi_u.detach(), "critic tuning", "-I_u", local=False)
            else:
                self.check_finite((-(mi_u + mi_u)).detach(), "critic tuning", "-(I_u + I_o)",
                                  local=False)  # fmt: skip
            self.opt_critic_model.zero_grad(set_to_none=True)
            (-mi_u).backward()  # the gradient -(I_u + I_o) sends to T_u
            self._clip_critic(crit_u)
            self.opt_critic_model.step()
            self.counters["tune"] += 1
            self._log("miu/tune_mi_model", mi_u)
            self._tune_estimate = mi_u.detach()
            if z_o is None:
                return False
            self._original_scores = None  # T_o (a lazy copy of T_u) changed
            self.tied_steps += 1
            self._log("miu/tune_mi_original", mi_u)
            return True
        if tied:
            self._copy_critic()
        crit_u.requires_grad_(True)
        crit_o.requires_grad_(True)
        mi_u, mi_o = self.mi_pair(z_u, z_o, batch.groups)
        assert mi_o is not None
        loss = -(mi_u + mi_o)
        self.check_finite(loss, "critic tuning", "-(I_u + I_o)", local=False)
        self.opt_critic_model.zero_grad(set_to_none=True)
        self.opt_critic_original.zero_grad(set_to_none=True)
        loss.backward()
        self._clip_critic(crit_u)
        self._clip_critic(crit_o)
        self.opt_critic_model.step()
        self.opt_critic_original.step()
        self._original_scores = None  # T_o changed
        self.counters["tune"] += 1
        self._log("miu/tune_mi_model", mi_u)
        self._log("miu/tune_mi_original", mi_o)
        self._tune_estimate = 0.5 * (mi_u.detach() + mi_o.detach())
        return False

    def _clip_critic(self, critic: MIEstimator) -> None:
        """Clip one critic's gradient norm at ``config.mine_max_grad_norm`` (no host read).

        Each critic is clipped on its own norm, so tuning tied critics once stays exact.
        """
        max_norm = self.config.mine_max_grad_norm
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(critic.parameters(), max_norm)

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
