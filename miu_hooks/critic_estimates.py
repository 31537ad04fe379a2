"""The critics of an MIU handle and their estimates on the global batch.

A base of :class:`~miu_hooks.engine.MIUHandle`: builds T_u and T_o
(:func:`critic_hidden` wide), splits raw batches, and estimates Î_u and Î_o with the
same marginal groups on the batch of every process (docs/method.md §3.1, §7). With
several processes, a rank's pending local checks travel with the gathered groups, so
a check that failed on one rank fails the step on every rank.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from miu_hooks.checks import active_checks
from miu_hooks.config import MIUConfig
from miu_hooks.data import Batch, split_batch, split_keys
from miu_hooks.estimators import MIEstimator
from miu_hooks.functional import check_group_range
from miu_hooks.handle_state import HandleBookkeeping
from miu_hooks.taps import FeatureTap, feature_width_error

__all__ = ["CriticEstimates", "critic_hidden"]


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


class CriticEstimates(HandleBookkeeping):
    """T_u, T_o and their Î_u, Î_o on the global batch.

    A base of :class:`~miu_hooks.engine.MIUHandle`.
    """

    config: MIUConfig
    tap: FeatureTap
    num_groups: int

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

    def split(self, raw: Any) -> Batch:
        """Split a raw batch with the config's keys and move it to the device."""
        batch = raw if isinstance(raw, Batch) else split_batch(raw, **split_keys(self.config))
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
