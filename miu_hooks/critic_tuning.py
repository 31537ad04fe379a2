"""Critic tuning of :class:`~miu_hooks.engine.MIUHandle` (the handle inherits it).

Split out of :mod:`miu_hooks.engine`: :meth:`CriticTuning.tune` runs a phase of
critic steps on batches of D with the model's features under ``no_grad``
(docs/method.md §3.3 step 1): the warm-up with its optional convergence stop,
two critics stepped once while they are exact copies on equal features, a row's
features reused within a phase where that is exact (:mod:`miu_hooks.phase_features`),
and each critic's gradient norm clipped. BatchNorm running statistics are put
back after a phase (:func:`batchnorm_buffers_restored`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from miu_hooks.checks import deferred
from miu_hooks.data import Batch, forward_logits
from miu_hooks.estimators import MIEstimator
from miu_hooks.original_features import OriginalFeatures
from miu_hooks.phase_features import PhaseFeatures

__all__ = ["WARMUP_WINDOW", "CriticTuning", "batchnorm_buffers_restored"]

logger = logging.getLogger(__name__)


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


class CriticTuning(OriginalFeatures):
    """Critic-tuning phases of an MIU handle (a base of :class:`~miu_hooks.engine.MIUHandle`)."""

    model: nn.Module
    tie_critics: bool
    tied_steps: int
    reused_steps: int
    _tune_estimate: Tensor | None

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
            with (
                batchnorm_buffers_restored(self.model, self.config.restore_batchnorm),
                deferred(self._reduce_max()) as checks,
            ):
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
