"""Runtime, REWEIGHT sampler placement and checkpoint files for the Trainer integration.

Kept apart from :mod:`miu_hooks.integrations.hf` so that each piece stays small:

* :class:`TrainerRuntime` runs the callback's own steps (forget passes) with the
  Trainer's optimizer and, under fp16, its gradient scaler; collectives come
  from :class:`~miu_hooks.distributed.DistributedRuntime`;
* :func:`install_sampler` swaps the sampler of the Trainer's prepared train
  loader for the REWEIGHT sampler (same length, so step counts stay valid);
* :func:`save_state` / :func:`load_state` write and read ``miu_state.safetensors``
  and ``miu_state.json`` inside a Trainer checkpoint folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler

from miu_hooks.atomic import atomic_save_safetensors, atomic_write_text
from miu_hooks.engine import MIUHandle
from miu_hooks.errors import CheckpointError
from miu_hooks.runtime import LocalRuntime, Runtime
from miu_hooks.sampling import GroupReweightSampler

__all__ = [
    "META_FILE",
    "STATE_FILE",
    "EpochLoader",
    "RankBatchSampler",
    "TrainerRuntime",
    "install_sampler",
    "innermost_batch_sampler",
    "load_state",
    "make_runtime",
    "save_state",
    "trainer_precision",
]

logger = logging.getLogger(__name__)

STATE_FILE = "miu_state.safetensors"
META_FILE = "miu_state.json"
STATE_VERSION = 1


def trainer_precision(args: Any) -> str:
    """``"bf16"``, ``"fp16"`` or ``"fp32"``, from ``TrainingArguments.bf16``/``fp16``."""
    if getattr(args, "bf16", False):
        return "bf16"
    if getattr(args, "fp16", False):
        return "fp16"
    return "fp32"


class TrainerRuntime(LocalRuntime):
    """One-process runtime of the callback's steps with the Trainer's optimizer and scaler.

    The Trainer's optimizer is Accelerate's ``AcceleratedOptimizer``, which only
    steps while Accelerate says gradients are synchronised and, under fp16, owns
    the gradient scaler. The callback's forget steps run between Trainer steps, so
    they step the wrapped torch optimizer (``LocalRuntime`` unwraps it) and reuse
    that scaler.

    Args:
        device: The Trainer's device (``args.device``).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (from ``args.bf16``/``args.fp16``).
        scaler: The ``GradScaler`` of the Trainer's optimizer, if any.

    Example:
        >>> TrainerRuntime(torch.device("cpu")).world_size
        1
    """

    def __init__(self, device: torch.device, precision: str = "fp32", *, scaler: Any = None):
        super().__init__(device, precision, scaler=scaler)


def _world_size() -> int:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return int(dist.get_world_size())
    return 1


def make_runtime(args: Any, optimizer: torch.optim.Optimizer | None) -> Runtime:
    """Build the runtime of the callback's steps from the Trainer's arguments and optimizer.

    This is the single place where the Trainer integration chooses a runtime:
    with ``torch.distributed`` initialised and more than one process it is a
    :class:`~miu_hooks.distributed.DistributedRuntime` (global-batch MI through an
    autograd-aware all-gather, model gradients of the forget passes averaged by
    hand); otherwise a :class:`TrainerRuntime`. Both step the Trainer's optimizer
    with its scaler.
    """
    device = args.device if isinstance(args.device, torch.device) else torch.device(args.device)
    precision, scaler = trainer_precision(args), getattr(optimizer, "scaler", None)
    if _world_size() > 1:
        from miu_hooks.distributed import DistributedRuntime  # lazy: only for multi-process runs

        return DistributedRuntime(device, precision, scaler=scaler)
    return TrainerRuntime(device, precision, scaler=scaler)


# -- the callback's own loaders (forget pass, critic tuning) ----------------------------------
class RankBatchSampler(Sampler[list[int]]):
    """Cut one global stream into batches of ``batch_size x world_size``; yield this rank's share.

    Rank ``r`` takes positions ``[r·b, (r+1)·b)`` of each global batch, as
    Accelerate does for the Trainer's own loader, so the batch gathered over
    ranks (in rank order) is the batch a single process at ``world_size x
    batch_size`` would draw. A short last global batch is split evenly and, when
    it does not divide, topped up from the start of the stream so that every
    rank passes the same batch size to the MI all-gather. With one process this
    is plain batching without ``drop_last``.

    Example:
        >>> list(RankBatchSampler(range(10), 2, rank=1, world_size=2))
        [[2, 3], [6, 7], [9]]
        >>> list(RankBatchSampler(range(5), 2, rank=1, world_size=2))
        [[2, 3], [0]]
    """

    def __init__(
        self, sampler: Any, batch_size: int, *, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size/rank/world_size: {batch_size}, {rank}, {world_size}")
        self.sampler = sampler
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size

    def set_epoch(self, epoch: int) -> None:
        """Forward ``epoch`` to the index sampler (reshuffle)."""
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.sampler) / (self.batch_size * self.world_size))

    def __iter__(self) -> Any:
        order = list(self.sampler)
        step = self.batch_size * self.world_size
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            share = math.ceil(len(chunk) / self.world_size)
            missing = share * self.world_size - len(chunk)
            if missing:
                chunk += (order * math.ceil(missing / len(order)))[:missing]
            yield chunk[self.rank * share : (self.rank + 1) * share]


class EpochLoader(DataLoader):
    """A ``DataLoader`` over a :class:`RankBatchSampler` whose :meth:`set_epoch` reshuffles."""

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (same order on every rank)."""
        self.batch_sampler.set_epoch(epoch)  # type: ignore[union-attr]


# -- REWEIGHT sampler ----------------------------------------------------------------------
def _batch_sampler_chain(loader: Any) -> list[Any]:
    """``loader.batch_sampler`` and the batch samplers it wraps (shard/skip), outermost first."""
    chain: list[Any] = []
    node = getattr(loader, "batch_sampler", None)
    while node is not None and len(chain) < 8:
        chain.append(node)
        node = getattr(node, "batch_sampler", None)
    return chain


def innermost_batch_sampler(loader: Any) -> BatchSampler | None:
    """The ``BatchSampler`` that draws indices, below Accelerate's shard/skip wrappers.

    ``BatchSamplerShard`` is itself a ``BatchSampler`` (and Accelerate sets a
    ``sampler`` attribute on it), but it iterates the batch sampler it wraps, so
    the walk goes down to the last one.
    """
    chain = _batch_sampler_chain(loader)
    inner = chain[-1] if chain else None
    return inner if isinstance(inner, BatchSampler) else None


def install_sampler(loader: Any, make: Any) -> GroupReweightSampler:
    """Make the loader's innermost ``BatchSampler`` draw from a REWEIGHT sampler.

    When the sampler in place already is a :class:`GroupReweightSampler` (the
    ``MIUTrainer`` route builds it in ``_get_train_sampler``) it is kept;
    otherwise ``make(num_samples)`` builds one of the same length as the
    sampler it replaces, so the number of steps per epoch is unchanged.

    Raises:
        ValueError: The loader has no ``BatchSampler`` with a ``sampler`` (an
            iterable dataset or a custom batch sampler).
    """
    batch_sampler = innermost_batch_sampler(loader)
    if batch_sampler is None or not hasattr(batch_sampler, "sampler"):
        raise ValueError(
            "MIUCallback could not find the sampler of the Trainer's train DataLoader (an "
            "IterableDataset or a custom batch sampler?), so it cannot apply REWEIGHT. Use a "
            "map-style train_dataset, or make_miu_trainer(...), or MIUConfig(reweight=False)"
        )
    current = batch_sampler.sampler
    if isinstance(current, GroupReweightSampler):
        return current
    sampler: GroupReweightSampler = make(len(current))  # type: ignore[arg-type]
    for node in _batch_sampler_chain(loader):  # wrappers keep a (reporting) reference too
        if hasattr(node, "sampler"):
            node.sampler = sampler
    return sampler


# -- checkpoint files ------------------------------------------------------------------------
def save_state(folder: str | os.PathLike[str], handle: MIUHandle, meta: dict[str, Any]) -> Path:
    """Write the handle's state and ``meta`` into ``folder`` (a Trainer checkpoint).

    ``miu_state.safetensors`` holds the critics, their EMA buffers, the critic
    optimizers' momentum, the marginal-group generator and the counters (flat
    tensors, no pickle); ``miu_state.json`` holds ``meta`` (schedule position,
    config, versions), also stored as the safetensors metadata.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in handle.state_dict().items()}
    meta = {"version": STATE_VERSION, **meta}
    text = json.dumps(meta, sort_keys=True)
    atomic_save_safetensors(folder / STATE_FILE, tensors, {"miu": text})
    atomic_write_text(folder / META_FILE, text + "\n")
    return folder / STATE_FILE


def load_state(folder: str | os.PathLike[str], handle: MIUHandle) -> dict[str, Any]:
    """Restore :func:`save_state`'s files from ``folder`` into ``handle`` and return ``meta``.

    Raises:
        CheckpointError: The files are missing or unreadable.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(
            f"resuming needs the MIU state {path}, which does not exist: the checkpoint was not "
            "written with MIUCallback, or it lives elsewhere (pass MIUCallback(resume_from=DIR))"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("miu", "{}"))
        tensors = load_file(str(path), device=str(handle.runtime.device))
    except Exception as exc:  # safetensors and json raise their own types
        raise CheckpointError(f"cannot read the MIU state {path}: {exc}") from exc
    handle.load_state_dict(tensors)
    return dict(meta)
