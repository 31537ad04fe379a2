"""How a step is executed: device, autocast, backward, clipping, collectives.

The unlearning schedule is written once against :class:`Runtime`. The plain
PyTorch loop uses :class:`LocalRuntime`; the Accelerate integration supplies a
runtime that delegates to an ``Accelerator`` (scaler, gradient sync, gathers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn

__all__ = ["LocalRuntime", "Runtime", "resolve_device"]


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
        raise ValueError(
            f"device {device!r} is not a torch device: use auto, cpu or cuda:N"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Runtime:
    """Base runtime: one process, no mixed precision. Subclass to change a step.

    Attributes:
        device: Where batches go.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
    """

    def __init__(self, device: torch.device, precision: str = "fp32") -> None:
        self.device = device
        self.precision = precision

    # -- distributed -------------------------------------------------------
    @property
    def world_size(self) -> int:
        """Number of processes taking part in the run."""
        return 1

    @property
    def is_main_process(self) -> bool:
        """Whether this process writes files and logs."""
        return True

    def gather(self, tensor: Tensor) -> Tensor:
        """Concatenate ``tensor`` over processes along dim 0, keeping autograd."""
        return tensor

    def all_reduce_mean(self, tensor: Tensor) -> Tensor:
        """Average ``tensor`` over processes (in place where possible) and return it."""
        return tensor

    def sync_model_grads(self, model: nn.Module) -> None:
        """Average the model's gradients over processes after a manual backward."""

    # -- numerics ------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[None]:
        """Context for model forwards at the configured precision."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.precision])

    def backward(self, loss: Tensor) -> None:
        """Back-propagate ``loss``."""
        loss.backward()

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

    Example:
        >>> rt = LocalRuntime(torch.device("cpu"), "bf16")
        >>> with rt.autocast():
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.bfloat16
    """

    def __init__(self, device: torch.device, precision: str = "fp32") -> None:
        super().__init__(device, precision)
        self.scaler: torch.amp.GradScaler | None = None
        if precision == "fp16":
            self.scaler = torch.amp.GradScaler(device.type)

    def backward(self, loss: Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def clip_grad_norm(
        self, optimizer: torch.optim.Optimizer, parameters: Iterable[nn.Parameter], max_norm: float
    ) -> Tensor:
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
