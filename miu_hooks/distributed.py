"""Multi-process runtime over plain ``torch.distributed`` (no Accelerate needed).

MIU's MI estimate is a batch statistic (a log-mean-exp), so a per-rank
estimate would depend on the number of processes. :class:`DistributedRuntime`
instead computes it on the **global batch** (docs/integrations.md §7):

* :meth:`DistributedRuntime.gather` concatenates features and groups from every
  rank with the autograd-aware ``torch.distributed.nn.functional.all_gather``,
  so every rank computes the same Î (the engine draws the marginal groups g̃ for
  the global batch from a generator seeded identically on every rank);
* the backward of that gather sums each rank's slice gradient over ranks
  (W x the single-process value), and averaging model gradients over ranks
  (DDP, or :meth:`DistributedRuntime.sync_model_grads` for passes outside DDP)
  divides by W again: the update equals the single-process one at batch W·B;
* the critics see identical inputs and gradients on every rank, so they stay
  identical without a DDP wrapper.

Without an initialised process group (or with one process) the runtime acts
exactly like :class:`~miu_hooks.runtime.LocalRuntime`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from miu_hooks.errors import ConfigTypeError, DataError
from miu_hooks.runtime import LocalRuntime

__all__ = [
    "DistributedRuntime",
    "all_gather_cat",
    "all_reduce_max_",
    "all_reduce_mean_",
    "average_gradients",
    "is_distributed",
]


def is_distributed() -> bool:
    """Return whether a ``torch.distributed`` process group with >1 rank is active.

    Example:
        >>> is_distributed()
        False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _world(group: object = None) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(group))  # type: ignore[arg-type]


def all_gather_cat(
    tensor: Tensor, group: object = None, *, check_sizes: bool = True, differentiable: bool = True
) -> Tensor:
    """Concatenate ``tensor`` from every rank along dim 0, differentiably.

    The backward pass sums, over ranks, the gradient that each rank's result
    holds for this rank's slice. Every rank must pass the same shape.

    Args:
        tensor: Tensor[B, ...] on this rank (same B on every rank).
        group: Process group (default: the world).
        check_sizes: Verify first, with one tiny all-reduce, that every rank
            passes the same B, and raise a clear error otherwise (a mismatched
            all-gather can hang or fail obscurely in the backend). The check
            reads the result on the host: one device sync.
        differentiable: ``False`` gathers without autograd (cheaper; for
            values that need no gradient).

    Returns:
        Tensor[W·B, ...], rank 0's rows first; ``tensor`` itself with one process.

    Raises:
        DataError: Ranks passed different batch sizes.

    Example:
        >>> all_gather_cat(torch.ones(2, 3)).shape  # one process: unchanged
        torch.Size([2, 3])
    """
    world = _world(group)
    if world == 1:
        return tensor
    if check_sizes:
        n = int(tensor.shape[0])
        sizes = torch.tensor([n, -n], dtype=torch.long, device=tensor.device)
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=group)
        largest, negated = sizes.tolist()  # one host read
        smallest = -negated
        if largest != smallest:
            raise DataError(
                f"the global-batch MI estimate needs the same batch size on every rank; got "
                f"sizes between {smallest} and {largest} (this rank: {n}). Use drop_last=True, "
                "a dataset size divisible by the global batch, or Accelerate's even_batches"
            )
    if not differentiable:
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.detach().contiguous(), group=group)
        return torch.cat(parts, dim=0)
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():
        # torch >= 2.10 marks it deprecated in favour of functional collectives whose
        # backward needs reduce_scatter, which gloo lacks; this one works on every backend.
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated.*")
        parts = all_gather(tensor.contiguous(), group=group or dist.group.WORLD)
    return torch.cat(parts, dim=0)


def all_reduce_mean_(tensor: Tensor, group: object = None) -> Tensor:
    """Average ``tensor`` over ranks in place and return it (unchanged with one rank).

    Example:
        >>> all_reduce_mean_(torch.tensor([1.0, 3.0])).tolist()
        [1.0, 3.0]
    """
    world = _world(group)
    if world == 1:
        return tensor
    if not tensor.is_floating_point():
        raise ConfigTypeError(f"all_reduce_mean_ needs a floating-point tensor; got {tensor.dtype}")
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor.div_(world)


def all_reduce_max_(tensor: Tensor, group: object = None) -> Tensor:
    """Element-wise maximum of ``tensor`` over ranks, in place (unchanged with one rank).

    Example:
        >>> all_reduce_max_(torch.tensor([1.0, 3.0])).tolist()
        [1.0, 3.0]
    """
    if _world(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def average_gradients(
    parameters: Iterable[nn.Parameter], group: object = None, *, bucket_mb: float = 25.0
) -> int:
    """Average the ``.grad`` of ``parameters`` over ranks, in coalesced buckets.

    Only parameters whose ``grad`` is set take part, so every rank must have run
    the same graph (the same parameters received gradients). Use this after a
    backward whose forward bypassed DDP (a manual forget pass, a callback's
    ``model=``), otherwise ranks silently diverge (docs/integrations.md §8). Averaging
    gradients that are already averaged is a no-op apart from the traffic.

    Args:
        parameters: The parameters whose gradients to average.
        group: Process group (default: the world).
        bucket_mb: Flatten gradients into buckets of about this many MiB.

    Returns:
        The number of gradients averaged (0 with one process).

    Example:
        >>> lin = nn.Linear(2, 1)
        >>> lin(torch.ones(1, 2)).sum().backward()
        >>> average_gradients(lin.parameters())
        0
    """
    world = _world(group)
    if world == 1:
        return 0
    grads = [p.grad for p in parameters if p.grad is not None]
    if any(g.is_sparse for g in grads):
        raise ConfigTypeError("average_gradients supports dense gradients only")
    limit = int(bucket_mb * 2**20)
    buckets: dict[tuple[torch.dtype, torch.device], list[list[Tensor]]] = {}
    for g in grads:
        chain = buckets.setdefault((g.dtype, g.device), [[]])
        if chain[-1] and sum(t.numel() * t.element_size() for t in chain[-1]) >= limit:
            chain.append([])
        chain[-1].append(g)
    for chain in buckets.values():
        for bucket in chain:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            flat.div_(world)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
    return len(grads)


class DistributedRuntime(LocalRuntime):
    """A :class:`LocalRuntime` whose collectives span a ``torch.distributed`` group.

    MI terms are computed on the global batch (see the module docstring);
    :meth:`sync_model_grads` averages gradients by hand for passes that do not
    go through a DDP-wrapped forward. Initialise the process group (``torchrun``
    + ``dist.init_process_group``, or Accelerate) before the first collective;
    without one this runtime is a :class:`LocalRuntime`.

    Args:
        device: This rank's device.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` autocast for model forwards.
        group: Process group (default: the world).
        check_sizes: Check equal per-rank batch sizes before a gather (one
            small all-reduce and one host read; the engine checks once per step).
            Turn it off when every loader gives equal batches by construction
            (``drop_last``, Accelerate's ``even_batches``).
        scaler: See :class:`~miu_hooks.runtime.LocalRuntime`.

    Example:
        >>> rt = DistributedRuntime(torch.device("cpu"))
        >>> rt.world_size, rt.is_main_process, rt.gather(torch.zeros(3)).shape
        (1, True, torch.Size([3]))
    """

    def __init__(
        self,
        device: torch.device,
        precision: str = "fp32",
        *,
        group: object = None,
        check_sizes: bool = True,
        scaler: Any = "auto",
    ) -> None:
        super().__init__(device, precision, scaler=scaler)
        self.group = group
        self.check_sizes = check_sizes

    @property
    def world_size(self) -> int:
        """Number of ranks in the group (1 without a process group)."""
        return _world(self.group)

    @property
    def rank(self) -> int:
        """This process's rank in the group (0 without a process group)."""
        if not (dist.is_available() and dist.is_initialized()):
            return 0
        return int(dist.get_rank(self.group))  # type: ignore[arg-type]

    @property
    def is_main_process(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0

    def gather(self, tensor: Tensor, *, check_sizes: bool | None = None) -> Tensor:
        """Concatenate ``tensor`` over ranks along dim 0, with autograd (:func:`all_gather_cat`)."""
        check = self.check_sizes if check_sizes is None else check_sizes
        return all_gather_cat(tensor, self.group, check_sizes=check)

    def gather_detached(self, tensor: Tensor) -> Tensor:
        """Concatenate ``tensor`` over ranks along dim 0, without autograd or size check."""
        return all_gather_cat(tensor, self.group, check_sizes=False, differentiable=False)

    def all_reduce_mean(self, tensor: Tensor) -> Tensor:
        """Average ``tensor`` over ranks in place and return it."""
        return all_reduce_mean_(tensor, self.group)

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        """Element-wise maximum over ranks, in place (:func:`all_reduce_max_`)."""
        return all_reduce_max_(tensor, self.group)

    def sync_model_grads(self, model: nn.Module) -> None:
        """Average the gradients of ``model``'s params over ranks (:func:`average_gradients`)."""
        average_gradients(model.parameters(), self.group)
