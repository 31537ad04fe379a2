"""Numeric precision of a run: ``precision="auto"``, TF32 matmuls and exact-fp32 MI terms.

* :func:`resolve_precision` turns ``"auto"`` into what runs: bf16 autocast on a
  CUDA device that supports it, fp16 (with a gradient scaler) on an older CUDA
  device, fp32 elsewhere (CPU, MPS).
* :func:`tf32_matmul` lets fp32 matrix products on CUDA use TF32 tensor cores
  for the length of a run, unless the user has chosen a matmul precision
  already, and restores the setting afterwards.
* :func:`exact_fp32` is the opposite, for the critics: the MI terms run with
  autocast off and IEEE fp32 matrix products, whatever the model runs in.

torch >= 2.9 has a per-backend ``fp32_precision`` switch and refuses some reads
once it is mixed with the older ``allow_tf32`` flags; both helpers use the
newer switch when it exists and the older flag otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from miu_hooks.errors import ConfigError

__all__ = [
    "PRECISIONS",
    "autocast_dtype",
    "bf16_native",
    "exact_fp32",
    "resolve_precision",
    "tf32_matmul",
]

#: Accepted values of ``TrainConfig.precision``.
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def bf16_native(device: torch.device | str) -> bool:
    """Whether ``device`` is a CUDA device computing bf16 natively (not emulated).

    Example:
        >>> bf16_native("cpu")
        False
    """
    device = torch.device(device)
    if device.type != "cuda":
        return False
    scope = torch.cuda.device(device) if device.index is not None else contextlib.nullcontext()
    with scope:
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch without the keyword
            return bool(torch.cuda.is_bf16_supported())


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """Return the autocast precision that runs for ``precision`` on ``device``.

    ``"auto"`` is bf16 on CUDA devices with native bf16 (Ampere and later), fp16
    on older CUDA devices (a gradient scaler is then used), and fp32 on every
    other device. Explicit values are returned unchanged.

    Raises:
        ConfigError: ``precision`` is not one of :data:`PRECISIONS`.

    Example:
        >>> resolve_precision("auto", "cpu"), resolve_precision("bf16", "cpu")
        ('fp32', 'bf16')
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type != "cuda":
        return "fp32"
    return "bf16" if bf16_native(device) else "fp16"


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision (``None`` for fp32).

    Example:
        >>> autocast_dtype("bf16"), autocast_dtype("fp32")
        (torch.bfloat16, None)
    """
    return _DTYPES.get(precision)


def _matmul_backend() -> Any:
    return torch.backends.cuda.matmul


@contextlib.contextmanager
def _cuda_matmul(value: str, *, only_if_unset: bool) -> Iterator[None]:
    matmul = _matmul_backend()
    if hasattr(matmul, "fp32_precision"):
        previous = str(matmul.fp32_precision)
        if only_if_unset and previous != "none":
            yield  # the user chose a matmul precision: keep it
            return
        matmul.fp32_precision = value
        try:
            yield
        finally:
            matmul.fp32_precision = previous
        return
    old = bool(matmul.allow_tf32)
    if only_if_unset and old:
        yield
        return
    matmul.allow_tf32 = value == "tf32"
    try:
        yield
    finally:
        matmul.allow_tf32 = old


@contextlib.contextmanager
def tf32_matmul(device: torch.device | str) -> Iterator[None]:
    """Let fp32 matrix products on CUDA use TF32 inside the block (restored after).

    A no-op off CUDA, and when a matmul precision was set explicitly before
    (``torch.backends.cuda.matmul.fp32_precision``, or ``allow_tf32=True``).
    Convolutions already use TF32 by default (``torch.backends.cudnn``).

    Example:
        >>> with tf32_matmul("cpu"):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).sum().item()
        8.0
    """
    if torch.device(device).type != "cuda":
        yield
        return
    with _cuda_matmul("tf32", only_if_unset=True):
        yield


@contextlib.contextmanager
def exact_fp32(device_type: str) -> Iterator[None]:
    """Autocast off and IEEE fp32 matrix products inside the block (the MI terms).

    Example:
        >>> with torch.autocast("cpu", dtype=torch.bfloat16), exact_fp32("cpu"):
        ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
        torch.float32
    """
    with torch.autocast(device_type=device_type, enabled=False):
        if device_type != "cuda":
            yield
            return
        with _cuda_matmul("ieee", only_if_unset=False):
            yield
