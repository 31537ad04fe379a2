"""The retain loader of an Accelerate loop (REWEIGHT) and its collapse guard.

:func:`reweighted_loader` draws the retain set with REWEIGHT and, with the guard
on and no validation set, keeps a seeded slice of it out of the draw;
:func:`guard_for` builds the guard that :func:`~miu_hooks.integrations.accelerate.prepare_miu`
attaches (docs/method.md §10).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from miu_hooks.config import MIUConfig
from miu_hooks.data import IndexedDataset, dataset_groups
from miu_hooks.guard import CollapseGuard, build_guard
from miu_hooks.methods.base import SeededLoader, ShuffleSampler
from miu_hooks.sampling import GroupReweightSampler
from miu_hooks.unlearn import check_split

__all__ = ["guard_for", "reweighted_loader"]

logger = logging.getLogger(__name__)


def reweighted_loader(
    retain: Dataset,
    forget: Dataset,
    batch_size: int,
    *,
    config: MIUConfig | None = None,
    num_groups: int | None = None,
    val: Dataset | None = None,
    index: bool = False,
    **loader_kwargs: Any,
) -> DataLoader:
    """The retain loader with REWEIGHT sampling; build it *before* ``accelerator.prepare``.

    Draws ``len(retain)`` retain samples per epoch with replacement, with weight
    ``N_g(D) / N_g(D_r)`` (D = retain ∪ forget), as a pure function of
    ``config.seed`` and the epoch, so every process draws the same stream and
    Accelerate hands each process its own batches of it. With
    ``config.reweight=False`` the loader shuffles instead (same seeding). On
    one process a last batch of one sample joins the batch before it
    (BatchNorm cannot train on one sample; :class:`~miu_hooks.sampling.TrainBatchSampler`).

    With the collapse guard on (``config.guard``) and no ``val``, a seeded,
    group-stratified slice of ``retain`` is never drawn: :func:`prepare_miu`
    measures the guard on it (the sampler's ``excluded`` positions).

    With ``index=True`` every batch also carries the samples' positions
    (``(inputs, label, group, index)`` tuples, or an ``"__index__"`` key in
    mappings): :func:`prepare_miu` then caches the original model's features
    once and retain steps read them instead of running the original model
    (about a third of a training step saved; see ``MIUConfig.feature_cache``).
    Pass the whole batch to :meth:`MIUAccelerate.retain_loss`.

    Args:
        retain: D_r (items ``(inputs, label, group)`` or mappings).
        forget: D_f, for the group counts of D.
        batch_size: Per-process batch size.
        config: Seed, ``reweight`` and ``group_key`` (default ``MIUConfig()``).
        num_groups: |G| (default ``max group id + 1``).
        val: The validation set the guard will read (pass the same to
            :func:`prepare_miu`); then no retain sample is held out.
        index: Add each sample's position to its item (enables the feature cache).
        **loader_kwargs: Other ``DataLoader`` arguments (``drop_last``, ``num_workers``,
            ``pin_memory``, ``collate_fn``...); :func:`prepare_miu` batches the loaders it
            builds with the same ``collate_fn`` (e.g. ``DataCollatorWithPadding``).

    Returns:
        A ``DataLoader`` whose ``set_epoch`` redraws the sample.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> ds = TensorDataset(torch.zeros(6, 2), torch.tensor([0, 0, 1, 1, 1, 1]),
        ...                    torch.tensor([0, 1, 2, 3, 2, 3]))
        >>> loader = reweighted_loader(ds, TensorDataset(*ds[:2]), batch_size=3)
        >>> type(loader.index_sampler).__name__, len(loader)
        ('GroupReweightSampler', 2)
        >>> len(next(iter(reweighted_loader(ds, TensorDataset(*ds[:2]), 3, index=True))))
        4
    """
    cfg = config or MIUConfig()
    retain_groups = dataset_groups(retain, cfg.group_key)
    train_groups, num_groups = check_split(
        retain_groups, dataset_groups(forget, cfg.group_key), num_groups
    )
    _, held = build_guard(retain, retain_groups, val, cfg)
    sampler: Any
    if cfg.reweight:
        sampler = GroupReweightSampler(
            retain_groups, train_groups, num_groups=num_groups, seed=cfg.seed, exclude=held
        )
    else:
        sampler = ShuffleSampler(len(retain_groups), seed=cfg.seed, exclude=held)
    data: Dataset = IndexedDataset(retain) if index else retain
    return SeededLoader(data, batch_size=batch_size, sampler=sampler, **loader_kwargs)


def guard_for(
    cfg: MIUConfig,
    sampler: Any,
    retain: Any,
    val: Dataset | None,
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> CollapseGuard | None:
    """The guard on ``val``, or on the retain positions the sampler never draws.

    ``collate_fn`` batches the slice's items (``None``: ``default_collate``).
    """
    if not cfg.guard:
        return None
    excluded = getattr(sampler, "excluded", None)
    if val is None and (excluded is None or not excluded.numel() or retain is None):
        logger.warning(
            "collapse guard off: pass val= to prepare_miu, or build the retain loader with "
            "reweighted_loader(...), which holds a slice of the retain set out for it"
        )
        return None
    if val is not None:
        guard, _ = build_guard(
            retain, torch.zeros(0, dtype=torch.long), val, cfg, collate_fn=collate_fn
        )
        return guard
    keys = {"input_key": cfg.input_key, "label_key": cfg.label_key, "group_key": cfg.group_key}
    assert excluded is not None
    return CollapseGuard(Subset(retain, excluded.tolist()), threshold=cfg.guard_threshold,
                         source="retain", keys=keys, collate_fn=collate_fn)  # fmt: skip
