"""``DataLoader`` settings shared by every loader the library builds.

* ``num_workers``: ``TrainConfig.num_workers`` (CLI ``--num-workers``) worker
  processes read and decode items (e.g. images of a CSV manifest) off the main
  thread; with workers they stay alive between epochs (``persistent_workers``).
* ``pin_memory``: on for CUDA runs whose items are CPU tensors, so that batches
  are copied to the GPU asynchronously (``Batch.to`` uses ``non_blocking``).
  Items already on the GPU are never pinned (pinning them is an error).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

__all__ = ["loader_options", "items_on_cpu"]


def items_on_cpu(item: Any) -> bool:
    """Whether every tensor of a dataset item is a CPU tensor.

    Example:
        >>> items_on_cpu((torch.zeros(2), 1, {"g": torch.tensor(0)}))
        True
    """
    if isinstance(item, torch.Tensor):
        return item.device.type == "cpu"
    if isinstance(item, Mapping):
        return all(items_on_cpu(v) for v in item.values())
    if isinstance(item, Sequence) and not isinstance(item, (str, bytes)):
        return all(items_on_cpu(v) for v in item)
    return True


def loader_options(
    dataset: Dataset | None,
    device: torch.device | str,
    num_workers: int = 0,
    *,
    persistent: bool = True,
) -> dict[str, Any]:
    """``num_workers``, ``pin_memory`` and ``persistent_workers`` for a loader of ``dataset``.

    Args:
        dataset: The loader's data set (its first item tells whether items are
            CPU tensors; ``None``: assume they are).
        device: Where the run computes.
        num_workers: Worker processes (0: load in the main process).
        persistent: Keep workers alive between passes (loaders iterated every epoch).

    Example:
        >>> loader_options([(torch.zeros(2), 0, 0)], "cpu", 2)
        {'num_workers': 2, 'pin_memory': False, 'persistent_workers': True}
    """
    cuda = torch.device(device).type == "cuda"
    pin = cuda
    if cuda and dataset is not None:
        try:
            pin = len(dataset) > 0 and items_on_cpu(dataset[0])  # type: ignore[arg-type]
        except Exception:  # unreadable probe: let the loader report it
            pin = True
    options: dict[str, Any] = {"num_workers": int(num_workers), "pin_memory": bool(pin)}
    options["persistent_workers"] = bool(persistent and num_workers > 0)
    return options
