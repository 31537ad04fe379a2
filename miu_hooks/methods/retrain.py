"""Retrain: fine-tuning's loop on D_r from re-initialised weights (exact unlearning).

``retrain_reweight`` is Retrain+REWEIGHT, the paper's group-robust exact
unlearning and the reference of Avg. Gap (docs/method.md §1, §6). The model is
re-initialised before training unless ``RetrainConfig.reinit`` is ``False``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from miu_hooks.config import RetrainConfig, TrainConfig
from miu_hooks.methods import register_method
from miu_hooks.methods.base import RunContext
from miu_hooks.methods.finetune import FineTune
from miu_hooks.seeding import REINIT_STREAM, epoch_seed

__all__ = ["Retrain", "reinitialize"]

logger = logging.getLogger(__name__)

_HF_FLAG = "_is_hf_initialized"


def _is_hf_model(model: nn.Module) -> bool:
    """A Transformers ``PreTrainedModel`` (duck-typed: transformers is not imported)."""
    return callable(getattr(model, "init_weights", None)) and callable(
        getattr(model, "_init_weights", None)
    )


@contextmanager
def _hf_flags_cleared(model: nn.Module) -> Iterator[None]:
    """Clear Transformers' "already initialised" flags for the block, then put them back.

    ``from_pretrained`` marks loaded modules and tensors as initialised, and
    ``init_weights`` skips whatever carries the mark; the marks are restored
    afterwards so that the model keeps no trace of the re-initialisation.
    """
    objects: list[object] = [*model.modules(), *model.parameters(), *model.buffers()]
    saved = {id(o): (o, getattr(o, _HF_FLAG)) for o in objects if hasattr(o, _HF_FLAG)}
    for obj, _ in saved.values():
        delattr(obj, _HF_FLAG)
    try:
        yield
    finally:
        for obj in objects:
            if hasattr(obj, _HF_FLAG) and id(obj) not in saved:
                delattr(obj, _HF_FLAG)
        for obj, value in saved.values():
            setattr(obj, _HF_FLAG, value)


def reinitialize(model: nn.Module, seed: int = 0) -> list[str]:
    """Re-initialise ``model`` in place, seeded; return the parameters left untouched.

    A Transformers model runs its own initialisation (``init_weights``, which
    also re-ties shared weights). Any other model calls ``reset_parameters()``
    of every submodule that has one (``nn.Linear``, ``nn.Conv2d``, norms,
    embeddings...); parameters owned by a module without one (e.g. a custom
    ``nn.Parameter`` such as a class token) keep their values, are named in the
    returned list and in a warning. The caller's global RNG state is restored.

    Args:
        model: The model (left on its device, same class and state_dict keys).
        seed: Seed of the draw (``RetrainConfig.seed``).

    Returns:
        Names of the parameters no initialiser reached (empty for most models).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.fill_(7.0)
        >>> reinitialize(net, seed=0)
        []
        >>> bool((net[0].weight == 7.0).any())
        False
        >>> first = net[0].weight.clone()
        >>> _ = reinitialize(net, seed=0)
        >>> torch.equal(first, net[0].weight)
        True
    """
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(epoch_seed(seed, 0, REINIT_STREAM))
        if _is_hf_model(model):
            with _hf_flags_cleared(model):
                model.init_weights()  # type: ignore[operator]
            return []
        reached: set[int] = set()
        for module in model.modules():
            reset = getattr(module, "reset_parameters", None)
            if callable(reset):
                reset()
                reached.update(id(p) for p in module.parameters())
    missed = [name for name, p in model.named_parameters() if id(p) not in reached]
    if missed:
        logger.warning(
            "re-initialisation reached no initialiser for %d parameter(s), kept as given: %s",
            len(missed),
            ", ".join(missed[:5]) + (" ..." if len(missed) > 5 else ""),
        )
    return missed


@register_method("retrain", config=RetrainConfig)
class Retrain(FineTune):
    """Retrain: re-initialise the model (seeded), then train it on D_r only.

    Exact unlearning; ``retrain_reweight`` samples D_r with REWEIGHT.
    ``RetrainConfig(reinit=False)`` trains the weights given instead (e.g. the
    original model's initial weights).
    """

    @classmethod
    def starts_fresh(cls, config: TrainConfig) -> bool:
        return isinstance(config, RetrainConfig) and config.reinit

    def setup(self, ctx: RunContext) -> None:
        cfg = ctx.config_as(RetrainConfig)
        if cfg.reinit:
            reinitialize(ctx.model, cfg.seed)
