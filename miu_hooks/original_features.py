"""The original model's side of an MIU handle: z_o, its cache and T_o's score table.

A base of :class:`~miu_hooks.engine.MIUHandle`. z_o comes from a no-grad forward of
the frozen original, or from a cache of every retain sample's features built once
(:mod:`miu_hooks.feature_cache`); with the cache, T_o's scores of every cached row and
group can be kept as a table between tuning phases when that is cheaper than a T_o
forward per step (:meth:`OriginalFeatures.uses_score_table`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from miu_hooks.critic_estimates import CriticEstimates
from miu_hooks.data import Batch, forward_logits, is_deterministic
from miu_hooks.feature_cache import allocate_cache, cache_loader, chunked_score_table, read_rows
from miu_hooks.taps import FeatureTap

__all__ = ["OriginalFeatures"]

logger = logging.getLogger(__name__)


class OriginalFeatures(CriticEstimates):
    """z_o, the feature cache and T_o's score table.

    A base of :class:`~miu_hooks.engine.MIUHandle`.
    """

    original: nn.Module
    tap_original: FeatureTap
    feature_cache: Tensor | None
    retain_rows_per_epoch: int | None
    original_scoring: str

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
