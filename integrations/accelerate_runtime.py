"""``AccelerateRuntime``: the engine's steps delegated to an ``Accelerator``.

Split out of :mod:`miu_hooks.integrations.accelerate` (which re-exports it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

from miu_hooks._imports import require
from miu_hooks.distributed import DistributedRuntime, average_gradients

require("accelerate", extra="hf")
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

__all__ = ["AccelerateRuntime"]

_PRECISION = {"no": "fp32", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
# Backends whose prepared model shards parameters: forwards must go through the wrapper.
_SHARDED = {"FSDP", "DEEPSPEED", "MEGATRON_LM"}


class AccelerateRuntime(DistributedRuntime):
    """Engine runtime that delegates numerics and stepping to an ``Accelerator``.

    * autocast, backward (with Accelerate's fp16 scaler), clipping and optimizer
      steps are the accelerator's; :meth:`backward` is one *full* step's backward
      (the engine's forget steps are not accumulated), so it undoes the
      ``1 / gradient_accumulation_steps`` that ``accelerator.backward`` applies;
    * :meth:`gather` is the autograd-aware all-gather of
      :class:`~miu_hooks.distributed.DistributedRuntime` (global-batch MI);
    * :meth:`sync_model_grads` averages gradients by hand when the engine's
      forwards bypass the prepared (DDP) model, and is a no-op otherwise.

    Args:
        accelerator: The run's ``Accelerator``.
        forward_through_prepared: Whether engine forwards go through the prepared
            model (default: only for FSDP/DeepSpeed/Megatron, which shard weights).
        check_sizes: Check equal per-rank batch sizes before the first gather of
            each step (one tiny all-reduce and one host read). ``None`` (the
            default) checks only when the accelerator does not make batches even
            (``even_batches=False``): prepared loaders then give every process
            the same batch size, and so do the engine's own (``drop_last``).

    Example:
        >>> from accelerate import Accelerator
        >>> rt = AccelerateRuntime(Accelerator(cpu=True))
        >>> rt.world_size, rt.precision, rt.device.type
        (1, 'fp32', 'cpu')
    """

    def __init__(
        self,
        accelerator: Accelerator,
        *,
        forward_through_prepared: bool | None = None,
        check_sizes: bool | None = None,
    ) -> None:
        if check_sizes is None:
            check_sizes = not bool(getattr(accelerator, "even_batches", False))
        # "fp32" keeps LocalRuntime from building its own GradScaler: Accelerate owns it.
        super().__init__(accelerator.device, "fp32", check_sizes=check_sizes)
        self.accelerator = accelerator
        # Accelerate silently runs fp32 when AMP is unavailable (e.g. fp16 on CPU).
        amp = bool(getattr(accelerator, "native_amp", False))
        self.precision = _PRECISION.get(str(accelerator.mixed_precision), "fp32") if amp else "fp32"
        kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type))
        self.sharded = kind in _SHARDED
        self.forward_through_prepared = (
            self.sharded if forward_through_prepared is None else forward_through_prepared
        )

    @property
    def world_size(self) -> int:
        """Number of processes of the accelerator."""
        return int(self.accelerator.num_processes)

    @property
    def is_main_process(self) -> bool:
        """Whether this is the accelerator's main process."""
        return bool(self.accelerator.is_main_process)

    def gather(self, tensor: Tensor, *, check_sizes: bool | None = None) -> Tensor:
        """Concatenate ``tensor`` over processes along dim 0, keeping autograd."""
        return tensor if self.world_size == 1 else super().gather(tensor, check_sizes=check_sizes)

    def gather_detached(self, tensor: Tensor) -> Tensor:
        """Concatenate ``tensor`` over processes along dim 0, without autograd."""
        return tensor if self.world_size == 1 else super().gather_detached(tensor)

    def all_reduce_mean(self, tensor: Tensor) -> Tensor:
        """Average ``tensor`` over processes in place and return it."""
        return tensor if self.world_size == 1 else super().all_reduce_mean(tensor)

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        """Element-wise maximum over processes, in place."""
        return tensor if self.world_size == 1 else super().all_reduce_max(tensor)

    def sync_model_grads(self, model: nn.Module) -> None:
        """Average gradients over processes unless the forward went through the wrapper."""
        if self.world_size > 1 and not self.forward_through_prepared:
            average_gradients(model.parameters())

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """The accelerator's autocast context."""
        return self.accelerator.autocast()

    def backward(self, loss: Tensor) -> None:
        """Back-propagate ``loss`` as one full optimizer step (no accumulation scaling)."""
        acc = self.accelerator
        steps = int(acc.gradient_accumulation_steps)
        if steps != 1 and acc.distributed_type != DistributedType.DEEPSPEED:
            loss = loss * steps
        acc.backward(loss)

    def scale_loss(self, loss: Tensor) -> Tensor:
        """``loss`` times Accelerate's fp16 loss scale (unchanged without a scaler)."""
        scaler = getattr(self.accelerator, "scaler", None)
        return scaler.scale(loss) if scaler is not None else loss

    def clip_grad_norm(
        self, optimizer: torch.optim.Optimizer, parameters: Iterable[nn.Parameter], max_norm: float
    ) -> Tensor:
        """``accelerator.clip_grad_norm_`` (unscales fp16 gradients first)."""
        norm = self.accelerator.clip_grad_norm_(list(parameters), max_norm)
        return norm if isinstance(norm, Tensor) else torch.tensor(float("nan"))

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step the prepared optimizer (Accelerate's scaler steps and updates for fp16)."""
        optimizer.step()

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        """``accelerator.no_sync(model)``."""
        with self.accelerator.no_sync(model):
            yield
