r"""``MIEstimator``: the MINE statistics network with its EMA state."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from miu_hooks.errors import ConfigError, ModelError
from miu_hooks.functional import check_group_range, ema_log_mean_exp, log_mean_exp
from miu_hooks.precision import exact_fp32

__all__ = ["MIEstimator"]


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager[None]:
    # Autocast off and IEEE fp32 matmuls (no TF32): the MI terms stay fp32.
    return exact_fp32(device_type)


class MIEstimator(nn.Module):
    r"""Donsker-Varadhan (MINE) estimator of the information between features and groups.

    The statistics network is
    :math:`T(z, g) = \mathrm{Linear}(d + |G| \to h) \to \mathrm{ReLU} \to \mathrm{Linear}(h \to 1)`
    on ``concat(z, onehot(g))``. A call returns

    .. math::
        \hat I = \frac{1}{B}\sum_i T(z_i, g_i) - \log \frac{1}{B}\sum_i e^{T(z_i, \tilde g_i)},
        \quad \tilde g_i \sim \mathcal U\{0..|G|-1\}

    in nats, whose gradient through the log term uses MINE's moving average
    (buffer ``log_running_mean``, the log of m). With uniform marginal groups the
    bound targets :math:`I(Z;G) + \mathrm{KL}(p(g)\,\|\,\mathcal U)`; the offset
    cancels in MIU's calibration difference. Everything runs in fp32 with
    autocast disabled, whatever the caller's precision.

    Args:
        feature_dim: d, the feature width.
        num_groups: |G|.
        hidden: Hidden width of the statistics network.
        ema: α, the weight of the newest batch in the moving average.

    Example:
        >>> est = MIEstimator(feature_dim=4, num_groups=2, hidden=8)
        >>> mi = est(torch.randn(16, 4), torch.randint(0, 2, (16,)))
        >>> mi.dim(), mi.requires_grad
        (0, True)
    """

    log_running_mean: Tensor
    initialized: Tensor

    def __init__(self, feature_dim: int, num_groups: int, hidden: int = 512, ema: float = 0.01):
        super().__init__()
        if feature_dim < 1 or num_groups < 1 or hidden < 1:
            raise ConfigError(
                f"MIEstimator needs feature_dim, num_groups and hidden >= 1; got "
                f"{feature_dim}, {num_groups}, {hidden}"
            )
        if not 0 < ema <= 1:
            raise ConfigError(f"MIEstimator ema must be in (0, 1]; got {ema}")
        self.feature_dim = int(feature_dim)
        self.num_groups = int(num_groups)
        self.ema = float(ema)
        self.net = nn.Sequential(
            nn.Linear(self.feature_dim + self.num_groups, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )
        self.register_buffer("log_running_mean", torch.zeros((), dtype=torch.float32))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @property
    def first(self) -> nn.Linear:
        """The first layer, on ``concat(z, onehot(g))``."""
        layer = self.net[0]
        assert isinstance(layer, nn.Linear)
        return layer

    def extra_repr(self) -> str:
        return f"feature_dim={self.feature_dim}, num_groups={self.num_groups}, ema={self.ema}"

    def _check(self, z: Tensor, *group_sets: Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.feature_dim:
            raise ModelError(
                f"MIEstimator expects features [B, {self.feature_dim}]; got {tuple(z.shape)}"
            )
        if group_sets:
            check_group_range(torch.cat([g.reshape(-1) for g in group_sets]), self.num_groups)

    def _project(self, z: Tensor) -> Tensor:
        # The first layer on concat(z, onehot(g)) is W_z z + W_g[:, g] + b: the z part is
        # shared by every group a row is scored with, so it is computed once per row.
        first = self.first
        return F.linear(z.to(first.weight.dtype), first.weight[:, : self.feature_dim], first.bias)

    def _group_rows(self) -> Tensor:
        # W_g^T: row g is the first layer's response to onehot(g), i.e. W_g[:, g].
        return self.first.weight[:, self.feature_dim :].t()

    def _head(self, hz: Tensor, groups: Tensor) -> Tensor:
        # hz: [B, h]; groups: [k, B] -> scores [k, B] (one pass for all k group sets).
        # In place on the gathered rows (a fresh tensor): no [k, B, h] temporaries.
        hidden = torch.relu_(F.embedding(groups, self._group_rows()).add_(hz.unsqueeze(0)))
        return self.net[2](hidden).float().squeeze(-1)

    def scores(self, z: Tensor, groups: Tensor) -> Tensor:
        """Return FloatTensor[B], the statistics network on ``(z, onehot(groups))``."""
        groups = groups.long().reshape(-1).to(z.device)
        self._check(z, groups)
        with _autocast_off(z.device.type):
            return self._head(self._project(z), groups.unsqueeze(0))[0]

    def scores_pair(
        self, z: Tensor, groups: Tensor, marginal_groups: Tensor, *, check_groups: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Return the scores of ``(z, groups)`` and of ``(z, marginal_groups)``, sharing W_z z.

        ``check_groups=False`` skips the range check (one host sync) for callers that
        validated the groups already.
        """
        groups = groups.long().reshape(-1).to(z.device)
        marginal_groups = marginal_groups.long().reshape(-1).to(z.device)
        if check_groups:
            self._check(z, groups, marginal_groups)
        elif z.dim() != 2 or z.shape[1] != self.feature_dim:
            self._check(z)
        with _autocast_off(z.device.type):
            both = self._head(self._project(z), torch.stack((groups, marginal_groups)))
        return both[0], both[1]

    @torch.no_grad()
    def score_table(self, z: Tensor, max_elements: int = 1 << 24) -> Tensor:
        """Return FloatTensor[N, |G|], T(z_i, g) for every row and every group.

        A frozen critic's scores of fixed features are a lookup: MIU's engine builds
        this table once per tuning phase for the cached original-model features.
        Rows are processed in chunks of at most ``max_elements`` hidden activations.

        Example:
            >>> est = MIEstimator(feature_dim=3, num_groups=2, hidden=4)
            >>> z = torch.randn(5, 3)
            >>> table = est.score_table(z)
            >>> torch.allclose(table[:, 1], est.scores(z, torch.ones(5, dtype=torch.long)))
            True
        """
        self._check(z)
        groups = torch.arange(self.num_groups, device=z.device)
        chunk = max(1, max_elements // (self.num_groups * self.first.out_features))
        out = []
        with _autocast_off(z.device.type):
            for part in z.float().split(chunk):
                every = groups.unsqueeze(1).expand(-1, part.shape[0])
                out.append(self._head(self._project(part), every).t())
        return torch.cat(out) if out else z.new_zeros(0, self.num_groups)

    def sample_marginal(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` uniformly random group ids (on the generator's device)."""
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randint(0, self.num_groups, (n,), generator=generator, device=device)

    def forward(
        self,
        z: Tensor,
        groups: Tensor,
        marginal_groups: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        update_ema: bool = True,
        check_groups: bool = True,
    ) -> Tensor:
        """Return the DV lower bound (nats) on this batch as a differentiable scalar.

        Args:
            z: FloatTensor[B, d] features (cast to fp32 inside).
            groups: LongTensor[B] group of each feature row.
            marginal_groups: LongTensor[B] marginal groups g̃; drawn uniformly when ``None``.
            generator: Generator for the marginal draw.
            update_ema: Update the moving average with this batch (training calls);
                ``False`` leaves the state untouched and uses the plain gradient.
            check_groups: Validate the group ids (one host sync); callers that
                validated them already pass ``False``.

        Returns:
            A scalar tensor.
        """
        z = z.float()
        if marginal_groups is None:
            marginal_groups = self.sample_marginal(z.shape[0], generator)
        joint, marginal = self.scores_pair(z, groups, marginal_groups, check_groups=check_groups)
        return self.bound(joint, marginal, update_ema=update_ema)

    def bound(self, joint: Tensor, marginal: Tensor, *, update_ema: bool = True) -> Tensor:
        """The DV bound from this critic's joint and marginal scores (EMA as in ``forward``).

        Example:
            >>> est = MIEstimator(feature_dim=2, num_groups=2, hidden=4)
            >>> float(est.bound(torch.ones(3), torch.zeros(3)))
            1.0
        """
        with _autocast_off(joint.device.type):
            marginal = marginal.float().reshape(-1)
            if not update_ema:
                return joint.float().mean() - log_mean_exp(marginal)
            batch_lme = log_mean_exp(marginal.detach())
            self._fold(batch_lme)
            lme = ema_log_mean_exp(marginal, self.log_running_mean, batch_lme)
            return joint.float().mean() - lme

    @torch.no_grad()
    def update_running_mean(self, marginal_scores: Tensor) -> None:
        """Fold this batch's mean of exp(scores) into the moving average (log domain).

        The first batch initialises the average; the update is branch-free (no host sync).
        """
        self._fold(log_mean_exp(marginal_scores.float()))

    @torch.no_grad()
    def _fold(self, batch_lme: Tensor) -> None:
        a = self.ema
        mixed = torch.logaddexp(
            batch_lme + math.log(a),
            self.log_running_mean + (math.log1p(-a) if a < 1 else -math.inf),
        )
        self.log_running_mean.copy_(torch.where(self.initialized, mixed, batch_lme))
        self.initialized.fill_(True)
