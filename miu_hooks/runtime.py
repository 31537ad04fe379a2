"""How a step is executed: device, autocast, backward, clipping, collectives.

The unlearning schedule is written once against :class:`Runtime`. The plain
PyTorch loop uses :class:`LocalRuntime`; the Accelerate integration supplies a
runtime that delegates to an ``Accelerator`` (scaler, gradient sync, gathers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from miu_hooks.errors import ConfigError
from miu_hooks.precision import autocast_dtype, resolve_precision

__all__ = ["LocalRuntime", "Runtime", "resolve_device", "unwrap_optimizer"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """Return ``device``, with ``"auto"`` meaning CUDA when available, else CPU.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(
            f"device {device!r} is not a torch device: use auto, cpu or cuda:N"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return dev


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside a wrapper such as Accelerate's ``AcceleratedOptimizer``.

    A wrapped optimizer may skip ``step()`` between its own synchronised steps (as
    Accelerate's does inside the Trainer); the engine's own steps (forget passes)
    are full steps, so they step the inner optimizer.

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> unwrap_optimizer(opt) is opt
        True
    """
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


class Runtime:
    """Base runtime: one process, no mixed precision. Subclass to change a step.

    Attributes:
        device: Where batches go.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (``"auto"`` is resolved
            for the device by :func:`~miu_hooks.precision.resolve_precision`).
        check_sizes: Whether :meth:`gather` first checks that every process
            passes the same batch size (a collective and a host read); off where
            the loaders give equal batches by construction.
    """

    check_sizes: bool = False

    def __init__(self, device: torch.device, precision: str = "fp32") -> None:
        self.device = device
        self.precision = resolve_precision(precision, device)

    # -- distributed -------------------------------------------------------
    @property
    def world_size(self) -> int:
        """Number of processes taking part in the run."""
        return 1

    @property
    def is_main_process(self) -> bool:
        """Whether this process writes files and logs."""
        return True

    def gather(self, tensor: Tensor, *, check_sizes: bool | None = None) -> Tensor:
        """Concatenate ``tensor`` over processes along dim 0, keeping autograd.

        ``check_sizes`` overrides :attr:`check_sizes` for this call (the engine
        checks the first gather of a step only).
        """
        return tensor

    def gather_detached(self, tensor: Tensor) -> Tensor:
        """Concatenate ``tensor`` over processes along dim 0, without autograd."""
        return tensor

    def all_reduce_mean(self, tensor: Tensor) -> Tensor:
        """Average ``tensor`` over processes (in place where possible) and return it."""
        return tensor

    def all_reduce_max(self, tensor: Tensor) -> Tensor:
        """Element-wise maximum of ``tensor`` over processes (in place) and return it."""
        return tensor

    def sync_model_grads(self, model: nn.Module) -> None:
        """Average the model's gradients over processes after a manual backward."""

    # -- numerics ------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Context for model forwards at the configured precision."""
        dtype = autocast_dtype(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def backward(self, loss: Tensor) -> None:
        """Back-propagate ``loss``."""
        loss.backward()

    def scale_loss(self, loss: Tensor) -> Tensor:
        """``loss`` times the fp16 loss scale (unchanged without a gradient scaler).

        For gradients taken outside :meth:`backward` (``torch.autograd.grad``):
        fp16 activations' gradients underflow without the scale. No host read.
        """
        return loss

    def clip_grad_norm(
        self, optimizer: torch.optim.Optimizer, parameters: Iterable[nn.Parameter], max_norm: float
    ) -> Tensor:
        """Clip the global gradient norm of ``parameters`` (stepped by ``optimizer``).

        Returns the norm before clipping.
        """
        return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Step ``optimizer``."""
        optimizer.step()

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module) -> Iterator[None]:
        """Context in which gradients are not synchronised (accumulation)."""
        yield


class LocalRuntime(Runtime):
    """A single process with optional autocast; fp16 uses a gradient scaler.

    Args:
        device: Where batches go.
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        scaler: ``"auto"`` (a new ``GradScaler`` under fp16), a scaler to share
            (e.g. the Trainer's), or ``None``.

    Example:
        >>> rt = LocalRuntime(torch.device("cpu"), "bf16")
        >>> with rt.autocast():
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.bfloat16
    """

    def __init__(
        self, device: torch.device, precision: str = "fp32", *, scaler: Any = "auto"
    ) -> None:
        super().__init__(device, precision)
        if isinstance(scaler, str):  # "auto": a fresh scaler under fp16, none otherwise
            scaler = torch.amp.GradScaler(device.type) if self.precision == "fp16" else None
        self.scaler: Any = scaler

    def backward(self, loss: Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def scale_loss(self, loss: Tensor) -> Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def clip_grad_norm(
        self, optimizer: torch.optim.Optimizer, parameters: Iterable[nn.Parameter], max_norm: float
    ) -> Tensor:
        if self.scaler is not None:
            self.scaler.unscale_(unwrap_optimizer(optimizer))
        return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        inner = unwrap_optimizer(optimizer)
        if self.scaler is not None:
            self.scaler.step(inner)
            self.scaler.update()
        else:
            inner.step()
