"""Model wrappers the library refuses: ``nn.DataParallel`` and ``torch.compile``.

* ``nn.DataParallel`` runs one process over several GPUs with replicas in
  threads. MIU's feature tap and the Trainer hooks' pending groups hold one value
  each, which the replicas' threads overwrite, and the original model and the
  critics live on the first GPU only. One process per GPU (``torchrun`` or
  ``accelerate launch``, i.e. DDP) is what the library supports; the Trainer
  uses ``DataParallel`` by itself when a single process sees several GPUs.
* A module compiled with ``torch.compile`` runs graphs traced before the hooks
  were added (a tap added later never fires), and hooks removed later keep
  running inside graphs traced while they were present. Unlearn the uncompiled
  module; compile the result afterwards if you like.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from miu_hooks.errors import ModelError

__all__ = ["is_compiled", "is_data_parallel", "refuse_unsupported", "unsupported_reason"]

DATA_PARALLEL_MESSAGE = (
    "nn.DataParallel (one process driving several GPUs) is not supported: launch one process "
    "per GPU with `torchrun --nproc_per_node N script.py` or `accelerate launch "
    "--multi_gpu --num_processes N script.py` (or make one GPU visible with "
    "CUDA_VISIBLE_DEVICES=0)"
)
COMPILED_MESSAGE = (
    "the model was compiled with torch.compile, whose graphs do not run hooks added "
    "afterwards and keep running hooks after they are removed: pass the uncompiled module "
    "(torch.compile the unlearned model afterwards if you like)"
)


def is_data_parallel(model: Any) -> bool:
    """Whether ``model`` is (or wraps) an ``nn.DataParallel``.

    Example:
        >>> is_data_parallel(nn.DataParallel(nn.Linear(2, 2))), is_data_parallel(nn.Linear(2, 2))
        (True, False)
    """
    seen = 0
    while isinstance(model, nn.Module) and seen < 8:
        if isinstance(model, nn.DataParallel):
            return True
        model = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        seen += 1
    return False


def is_compiled(model: Any) -> bool:
    """Whether ``model`` is a ``torch.compile`` wrapper (``OptimizedModule``).

    Example:
        >>> is_compiled(nn.Linear(2, 2))
        False
    """
    return isinstance(model, nn.Module) and isinstance(
        getattr(model, "_orig_mod", None), nn.Module
    )


def unsupported_reason(*models: Any) -> str | None:
    """The refusal message for the first unsupported wrapper among ``models``, or ``None``."""
    for model in models:
        if model is None:
            continue
        if is_data_parallel(model):
            return DATA_PARALLEL_MESSAGE
        if is_compiled(model):
            return COMPILED_MESSAGE
    return None


def refuse_unsupported(*models: Any) -> None:
    """Raise :class:`ModelError` for an ``nn.DataParallel`` or compiled model.

    Example:
        >>> refuse_unsupported(nn.DataParallel(nn.Linear(2, 2)))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        miu_hooks.errors.ModelError: nn.DataParallel (one process driving several GPUs) ...
    """
    reason = unsupported_reason(*models)
    if reason is not None:
        raise ModelError(reason)
