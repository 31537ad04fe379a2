"""Where the original model's cached features live, and how they are read.

MIU calibrates against the frozen original model's features z_o. When reading
an item twice gives the same values (no random augmentation), z_o of every
sample of D is computed once and kept as a table of N x d values; retain steps
then read T_o's scores of those rows (an N x |G| table) instead of running the
original model and its critic (docs/method.md §8).

Size of the table: N x d x 4 bytes in fp32. For example 50,000 samples x 512
(ResNet-18 on CIFAR) is 98 MiB; 50,000 x 768 (ViT-B) is 147 MiB; ImageNet's
1.28 M x 768 is 3.7 GiB (1.8 GiB in bf16). :func:`cache_placement` keeps it on
the GPU in fp32 when it takes at most a quarter of the free GPU memory, in bf16
when that fits instead (bf16 keeps 8 bits of mantissa; the scores built from it
stay fp32), and otherwise in pinned host memory in fp32, from where the rows of
each critic-tuning batch are copied to the GPU. The score table
(N x |G| x 4 bytes) always lives on the run's device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from miu_hooks.batched import batched_loader_args
from miu_hooks.data import indexed
from miu_hooks.loader_options import loader_options
from miu_hooks.precision import bf16_native

__all__ = [
    "CACHE_MEMORY_FRACTION",
    "allocate_cache",
    "cache_loader",
    "cache_placement",
    "chunked_score_table",
    "read_rows",
]

logger = logging.getLogger(__name__)

#: Largest share of the free GPU memory the feature cache may take.
CACHE_MEMORY_FRACTION = 0.25


def cache_placement(
    num_bytes_fp32: int, free_bytes: int | None, bf16: bool
) -> tuple[str, torch.dtype]:
    """Decide ``("device" | "host", dtype)`` for a cache of ``num_bytes_fp32`` bytes in fp32.

    Args:
        num_bytes_fp32: N x d x 4.
        free_bytes: Free memory of the run's GPU (``None``: not a GPU; the cache
            then stays with the run's device, in fp32).
        bf16: Whether the GPU computes in bf16 natively.

    Example:
        >>> cache_placement(100, None, False)
        ('device', torch.float32)
        >>> cache_placement(100, 1000, True), cache_placement(400, 1000, True)
        (('device', torch.float32), ('device', torch.bfloat16))
        >>> cache_placement(4000, 1000, True)
        ('host', torch.float32)
    """
    if free_bytes is None:
        return "device", torch.float32
    budget = CACHE_MEMORY_FRACTION * free_bytes
    if num_bytes_fp32 <= budget:
        return "device", torch.float32
    if bf16 and num_bytes_fp32 / 2 <= budget:
        return "device", torch.bfloat16
    return "host", torch.float32


def allocate_cache(size: int, dim: int, device: torch.device) -> Tensor:
    """An empty ``[size, dim]`` cache placed by :func:`cache_placement`."""
    free: int | None = None
    bf16 = False
    if device.type == "cuda":
        free = int(torch.cuda.mem_get_info(device)[0])
        bf16 = bf16_native(device)
    where, dtype = cache_placement(size * dim * 4, free, bf16)
    if where == "host":
        logger.info(
            "feature cache (%d x %d, %.2f GiB in fp32) kept in pinned host memory",
            size, dim, size * dim * 4 / 2**30,
        )  # fmt: skip
        return torch.zeros(size, dim, dtype=dtype).pin_memory()
    if dtype != torch.float32:
        logger.info("feature cache (%d x %d) kept on %s in %s", size, dim, device, dtype)
    return torch.zeros(size, dim, dtype=dtype, device=device)


def read_rows(
    cache: Tensor, index: Tensor, host_index: Tensor | None, device: torch.device
) -> Tensor:
    """Rows ``index`` of ``cache`` as fp32 on ``device`` (host caches use ``host_index``)."""
    if cache.device.type == "cpu" and device.type != "cpu":
        idx = host_index if host_index is not None else index.cpu()
        return cache[idx].to(device, non_blocking=False).float()
    return cache[index.to(cache.device)].float()


def chunked_score_table(
    score_table: Callable[[Tensor], Tensor],
    cache: Tensor,
    device: torch.device,
    rows: int = 1 << 16,
) -> Tensor:
    """``score_table`` over ``cache`` in chunks of ``rows`` fp32 rows on ``device``.

    A bf16 or host cache is never converted (or copied) whole: each chunk is.
    """
    parts = [score_table(part.to(device).float()) for part in cache.split(rows)]
    if not parts:
        return torch.zeros(0, 0, device=device)
    return torch.cat(parts)


def cache_loader(
    train: Dataset,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    *,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader[Any]:
    """The loader that fills the cache: indexed items of ``train`` in order.

    ``collate_fn`` batches them (``None``: ``default_collate``, or the batched
    read of tensor-backed data); a padding collator pads each batch to its
    longest sequence, and the attention mask keeps the features those of the
    unpadded sequences.
    """
    options = loader_options(train, device, num_workers, persistent=False)
    data, options = batched_loader_args(indexed(train), {**options, "collate_fn": collate_fn})
    return DataLoader(data, batch_size=max(batch_size, 256), shuffle=False, **options)
