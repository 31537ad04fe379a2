"""Bookkeeping of :class:`~miu_hooks.engine.MIUHandle`: checks, logs and checkpoint state.

Split out of :mod:`miu_hooks.engine` (the handle inherits it):

* :meth:`HandleBookkeeping.check_finite` records a finiteness check with the
  step's others (:mod:`miu_hooks.checks`), read once per step;
* the ``miu/*`` terms are summed on the device, one scalar per key, and
  :meth:`HandleBookkeeping.pop_logs` reads their means in one host read;
* :meth:`HandleBookkeeping.state_dict` / :meth:`~HandleBookkeeping.load_state_dict`
  are the flat-tensor checkpoint of the critics, their optimisers, the RNG and
  the counters.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from miu_hooks.checks import NON_FINITE, StepChecks, require
from miu_hooks.data import Batch, raise_if_nonfinite_inputs
from miu_hooks.errors import MIUError, NonFiniteLossError
from miu_hooks.estimators import MIEstimator
from miu_hooks.runtime import Runtime
from miu_hooks.state import flatten_optimizer_state, load_flat_optimizer_state, unprefixed

__all__ = ["HandleBookkeeping"]


class HandleBookkeeping:
    """Checks, logs and state of an MIU handle (a base of :class:`~miu_hooks.engine.MIUHandle`)."""

    runtime: Runtime
    epoch: int
    counters: dict[str, int]
    generator: torch.Generator
    critic_model: MIEstimator | None
    critic_original: MIEstimator | None
    opt_critic_model: torch.optim.Optimizer | None
    opt_critic_original: torch.optim.Optimizer | None
    log_counts: dict[str, int]
    _log_sums: dict[str, Tensor]
    _original_scores: Tensor | None
    batch: Batch | None

    def _build_critics(self, feature_dim: int) -> None:
        raise NotImplementedError

    def _reduce_max(self) -> Callable[[Tensor], Tensor] | None:
        """The all-reduce that puts rank-local checks on every rank (``None`` alone)."""
        rt = self.runtime
        return rt.all_reduce_max if rt.world_size > 1 else None

    def check_finite(self, value: Tensor, phase: str, term: str, *, local: bool = True) -> None:
        """Require ``value`` to be finite, read with the step's other checks.

        Inside a :func:`~miu_hooks.checks.deferred` scope the check is read with
        the step's others, at once outside one. ``local=False`` marks a value
        computed from the global batch (equal on every rank).

        Raises:
            NonFiniteInputError: The batch being processed holds NaN/Inf inputs.
            NonFiniteLossError: The inputs are finite; the message names the step
                and the steps finished before it.
        """
        epoch, c, batch = self.epoch, dict(self.counters), self.batch

        def error() -> MIUError:  # evaluated only when a check failed
            where = (
                f"the {phase} step at epoch {epoch} (finished before it: {c['tune']} "
                f"critic-tuning, {c['forget']} forget and {c['retain']} retain steps)"
            )
            if batch is not None:
                raise_if_nonfinite_inputs(batch, where)
            return NonFiniteLossError(
                f"non-finite {term} ({float(value.detach().float().reshape(-1)[0])}) in "
                f"{where}; lower lr or mine_lr, or enable max_grad_norm"
            )

        require(torch.isfinite(value.detach()), error, NON_FINITE, local=local)

    def _flush(
        self,
        checks: StepChecks,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        restore: dict[str, Any] | None = None,
    ) -> None:
        """Read the pending checks; on failure drop the gradients / restore the critics."""
        try:
            checks.flush(self._reduce_max())
        except MIUError:
            if optimizer is not None:
                optimizer.zero_grad(set_to_none=True)
            if restore is not None:
                self._restore_critics(restore)
            raise

    def _critic_snapshot(self) -> dict[str, Any]:
        """Copies (on the device, no host read) of the critics and their optimisers."""
        if self.critic_model is None or self.critic_original is None:
            return {}
        assert self.opt_critic_model is not None and self.opt_critic_original is not None
        return {
            "critic_model": copy.deepcopy(self.critic_model.state_dict()),
            "critic_original": copy.deepcopy(self.critic_original.state_dict()),
            "opt_critic_model": copy.deepcopy(self.opt_critic_model.state_dict()),
            "opt_critic_original": copy.deepcopy(self.opt_critic_original.state_dict()),
        }

    def _restore_critics(self, saved: dict[str, Any]) -> None:
        for name, value in saved.items():
            getattr(self, name).load_state_dict(value)
        self._original_scores = None

    def _log(self, key: str, value: Tensor) -> None:
        value = value.detach().float()
        total = self._log_sums.get(key)
        self._log_sums[key] = value if total is None else total + value
        self.log_counts[key] = self.log_counts.get(key, 0) + 1

    def pop_logs(self) -> dict[str, float]:
        """Return the mean of each logged term since the last call, and reset (one host read)."""
        keys = [k for k, n in self.log_counts.items() if n]
        sums, counts = self._log_sums, self.log_counts
        self._log_sums, self.log_counts = {}, {}
        if not keys:
            return {}
        device = sums[keys[0]].device
        means = torch.stack([sums[k].to(device) / counts[k] for k in keys]).tolist()
        return dict(zip(keys, means, strict=True))

    def state_dict(self) -> dict[str, Tensor]:
        """Critics, EMA buffers, critic-optimizer momentum, RNG and counters (flat tensors)."""
        state: dict[str, Tensor] = {
            "generator": self.generator.get_state(),
            "epoch": torch.tensor(self.epoch),
        }
        for key, value in self.counters.items():
            state[f"counter.{key}"] = torch.tensor(value)
        if self.critic_model is not None:
            assert self.critic_original is not None
            assert self.opt_critic_model is not None and self.opt_critic_original is not None
            state["feature_dim"] = torch.tensor(self.critic_model.feature_dim)
            for name, module, opt in (
                ("critic_model", self.critic_model, self.opt_critic_model),
                ("critic_original", self.critic_original, self.opt_critic_original),
            ):
                for k, v in module.state_dict().items():
                    state[f"{name}.{k}"] = v.detach().clone()
                state.update(flatten_optimizer_state(opt, prefix=f"opt_{name}."))
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`state_dict`'s output (critics are built if needed)."""
        self._original_scores = None
        self.generator.set_state(state["generator"].to(torch.uint8).cpu())
        self.epoch = int(state["epoch"])
        for key in self.counters:
            self.counters[key] = int(state.get(f"counter.{key}", torch.tensor(0)))
        if "feature_dim" in state:
            if self.critic_model is None:
                self._build_critics(int(state["feature_dim"]))
            assert self.critic_model is not None and self.critic_original is not None
            assert self.opt_critic_model is not None and self.opt_critic_original is not None
            for name, module, opt in (
                ("critic_model", self.critic_model, self.opt_critic_model),
                ("critic_original", self.critic_original, self.opt_critic_original),
            ):
                module.load_state_dict(unprefixed(state, f"{name}."), strict=False)
                load_flat_optimizer_state(opt, state, prefix=f"opt_{name}.")
