"""The collapse guard on the Trainer routes (docs/method.md §10; used by ``MIUCallback``).

:func:`install_retain_sampler` puts the retain draw in place (REWEIGHT, or a plain
shuffle) without the guard's held-out slice; :func:`check_epoch` runs the check
after an epoch, restores the last good weights and stops training when it fires,
and appends the numbers to ``state.log_history``.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from miu_hooks.guard import CollapseGuard
from miu_hooks.integrations.hf_state import install_sampler
from miu_hooks.integrations.loaders import index_sampler, replace_index_sampler
from miu_hooks.methods.base import ShuffleSampler
from miu_hooks.sampling import GroupReweightSampler

__all__ = ["check_epoch", "install_retain_sampler"]


def install_retain_sampler(
    loader: Any,
    *,
    reweight: bool,
    retain_groups: Tensor,
    train_groups: Tensor,
    num_groups: int,
    seed: int,
    held: Tensor,
) -> tuple[GroupReweightSampler | None, ShuffleSampler | None]:
    """Make the Trainer's loader draw the retain set without the positions ``held``.

    With ``reweight`` the loader samples with REWEIGHT (held positions weigh
    zero); otherwise, when something is held out, a seeded shuffle of the other
    positions of the same length replaces the Trainer's sampler. Returns the
    sampler installed (REWEIGHT, shuffle), ``None`` for the one not used.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader
        >>> loader = DataLoader(range(6), batch_size=2, shuffle=True)
        >>> groups = torch.tensor([0, 0, 0, 1, 1, 1])
        >>> rw, plain = install_retain_sampler(
        ...     loader, reweight=False, retain_groups=groups, train_groups=groups,
        ...     num_groups=2, seed=0, held=torch.tensor([1, 4]))
        >>> rw is None, len(loader), sorted(set(plain)) == [0, 2, 3, 5]
        (True, 3, True)
    """
    if reweight:
        sampler = install_sampler(
            loader,
            lambda n: GroupReweightSampler(
                retain_groups, train_groups, num_samples=n, num_groups=num_groups, seed=seed,
                exclude=held,
            ),
        )  # fmt: skip
        return sampler, None
    if not held.numel():
        return None, None
    shuffle = ShuffleSampler(
        len(retain_groups), seed, exclude=held, num_samples=len(index_sampler(loader))
    )
    replace_index_sampler(loader, shuffle)
    return None, shuffle


def check_epoch(guard: CollapseGuard, model: Any, hooks: Any, state: Any, control: Any) -> bool:
    """Check ``model`` after the epoch that just ended; on a collapse restore and stop.

    ``hooks`` (the callback's :class:`~miu_hooks.integrations.hf_hooks.TrainerHooks`)
    are told the forwards are the callback's own. Appends ``guard/accuracy`` and
    ``guard/original`` (plus ``guard/fired`` and ``guard/restored_epoch`` when it
    fires) to ``state.log_history`` and sets ``control.should_training_stop``.

    Returns:
        Whether the epoch passed.
    """
    epoch = math.floor((state.epoch or 0.0) + 1e-6) - 1
    final = bool(state.max_steps) and state.global_step >= state.max_steps
    hooks.internal = True
    try:
        passed = guard.check(model, epoch, final=final)
    finally:
        hooks.internal = False
    outcome = guard.outcome
    record: dict[str, float] = {
        "guard/accuracy": outcome.accuracies[-1],
        "guard/original": outcome.original_accuracy,
    }
    if not passed:
        control.should_training_stop = True
        restored = -1 if outcome.restored_epoch is None else outcome.restored_epoch
        record.update({"guard/fired": 1.0, "guard/restored_epoch": float(restored)})
    state.log_history.append({**record, "epoch": state.epoch, "step": state.global_step})
    return passed
