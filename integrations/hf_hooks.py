"""Native forward hooks that put MIU into an unmodified Hugging Face ``Trainer``.

:class:`TrainerHooks` places two hooks on the Trainer's (unwrapped) model, never
wrapping or replacing it:

* a forward **pre-hook** (``with_kwargs=True``) pops the group, id and
  ``__index__`` columns from the call's keyword arguments, so the model never
  sees them, and remembers the groups (and sample positions, which read the
  feature cache) of a training forward;
* a forward **hook** (``with_kwargs=True``) adds the scaled calibration term
  λ·(Î_u − sg Î_o)² to ``outputs.loss`` of that forward, reading the features
  from the engine's tap on the classification head (with ``clip="adaptive"``
  the term is scaled by MINE's factor against ``outputs.loss``).

Both act only on training forwards (``module.training`` and grad enabled), so
evaluation and prediction are untouched: no MI term and no estimator update.

Loss scaling. When the Trainer passes ``num_items_in_batch`` into the model
(``model_accepts_loss_kwargs``), it no longer divides the loss by the number of
accumulation steps, because the model's loss is expected to be a sum divided by
the number of items of the *whole* accumulated (and, across processes, global)
batch. The per-batch-mean MI term is then multiplied by ``n_local /
num_items_in_batch``, so its weight relative to the cross-entropy is the same
with and without accumulation. Some models accept the keyword but ignore it in
their loss (their loss stays a per-batch mean, e.g. HF ResNet and BEiT in
transformers 5.x); the first accumulated micro-batch tells the two apart by
comparing the returned loss with the batch's own cross-entropy, and the MI term
then follows the model's scaling. That comparison reads values on the host once;
afterwards the factor is a device tensor (no host read per step), and without
accumulation on one process it is 1 and nothing is read at all.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from miu_hooks.data import Batch
from miu_hooks.engine import MIUHandle
from miu_hooks.errors import ConfigTypeError, DataError, StateError

__all__ = ["TrainerHooks", "replace_loss", "loss_of"]

logger = logging.getLogger(__name__)

# Keyword arguments of a model call that are not model inputs for the original model.
_NOT_INPUTS = frozenset({"labels", "num_items_in_batch", "return_loss"})
#: Column with each sample's position (added by prepare_trainer for the feature cache).
INDEX_KEY = "__index__"


def loss_of(output: Any) -> Tensor | None:
    """Return the loss held by a model output (``ModelOutput``, dict or ``(loss, ...)`` tuple).

    Example:
        >>> loss_of({"loss": torch.tensor(1.0), "logits": torch.zeros(2, 2)}).item()
        1.0
    """
    if isinstance(output, dict):
        value = output.get("loss")
        return value if isinstance(value, Tensor) else None
    if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
        return output[0] if output[0].dim() == 0 else None
    return None


def _logits_of(output: Any) -> Tensor | None:
    if isinstance(output, dict):
        value = output.get("logits")
    elif isinstance(output, tuple) and len(output) > 1:
        value = output[1]
    else:
        value = None
    return value if isinstance(value, Tensor) else None


def replace_loss(output: Any, loss: Tensor) -> Any:
    """Return ``output`` with its loss replaced by ``loss`` (in place for ``ModelOutput``/dicts).

    Assigning the key of a ``ModelOutput`` also updates its attribute, which is
    what the Trainer reads (``outputs["loss"]``).

    Example:
        >>> replace_loss((torch.tensor(1.0), torch.zeros(1)), torch.tensor(2.0))[0].item()
        2.0
    """
    if isinstance(output, dict):
        output["loss"] = loss
        return output
    if isinstance(output, tuple):
        return (loss, *output[1:])
    raise ConfigTypeError(
        f"cannot set the loss of a model output of type {type(output).__name__}: expected a "
        "ModelOutput, a dict or a (loss, ...) tuple"
    )


def count_items(labels: Tensor | None, batch_size: int) -> int:
    """Number of labelled items of a classification batch (``-100`` is ignored).

    Example:
        >>> count_items(torch.tensor([0, -100, 1]), 3)
        2
    """
    if labels is None:
        return batch_size
    return int(labels.ne(-100).sum()) if not labels.is_floating_point() else int(labels.shape[0])


def item_ratio(labels: Tensor | None, batch_size: int, num_items: Any) -> Tensor | float:
    """``count_items(labels) / num_items`` without a host read when either is a tensor.

    Example:
        >>> float(item_ratio(torch.tensor([0, -100, 1]), 3, torch.tensor(8)))
        0.25
    """
    if labels is None or labels.is_floating_point():
        n_local: Tensor | int = batch_size if labels is None else int(labels.shape[0])
    else:
        n_local = labels.ne(-100).sum()
    if isinstance(num_items, Tensor):
        device = n_local.device if isinstance(n_local, Tensor) else num_items.device
        return torch.as_tensor(n_local, device=device).float() / num_items.to(device).float()
    total = float(num_items)
    if total <= 0:
        return 1.0
    return n_local.float() / total if isinstance(n_local, Tensor) else n_local / total


class TrainerHooks:
    """The column pre-hook and the loss hook of :class:`~miu_hooks.integrations.hf.MIUCallback`.

    The column pre-hook is registered at construction and stays until
    :meth:`remove`, so evaluation batches that still carry the group column keep
    working after training. :meth:`attach_loss` adds the loss hook that drives
    ``handle``; :meth:`detach_loss` removes it again.

    Args:
        model: The Trainer's model (the unwrapped ``PreTrainedModel``).
        group_key: Name of the group column.
        id_key: Name of an optional sample-id column, dropped as well.
        label_key: Name of the label keyword (``None``: ``labels``).

    Attributes:
        internal: Set while the callback runs its own passes (tuning, forget
            steps), whose forwards carry no group column by design.
        single_batch: Set when each optimiser step sees one micro-batch on one
            process (no accumulation): the MI term's factor is then 1.
        loss_normalized: Whether the model divides its loss by
            ``num_items_in_batch`` (``None`` until a micro-batch has told).
        terms_added: Number of training forwards that received the MI term.
    """

    def __init__(
        self, model: nn.Module, *, group_key: str, id_key: str, label_key: str | None = None
    ) -> None:
        self.model = model
        self.group_key = group_key
        self.id_key = id_key
        self.label_key = label_key or "labels"
        self.handle: MIUHandle | None = None
        self.internal = False
        self.loss_normalized: bool | None = None
        self.terms_added = 0
        self.single_batch = False
        self._pending: tuple[Tensor, Tensor | None] | None = None
        self._warned = False
        self._columns: RemovableHandle | None = model.register_forward_pre_hook(
            self._pre_hook, with_kwargs=True
        )
        self._loss: RemovableHandle | None = None

    # -- hooks ---------------------------------------------------------------------------
    def _training(self, module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled() and not self.internal

    def _pre_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        self._pending = None
        if self.group_key not in kwargs and self.id_key not in kwargs and INDEX_KEY not in kwargs:
            return None
        kwargs = dict(kwargs)
        groups = kwargs.pop(self.group_key, None)
        kwargs.pop(self.id_key, None)
        index = kwargs.pop(INDEX_KEY, None)
        if self._loss is not None and isinstance(groups, Tensor) and self._training(module):
            self._pending = (groups, index if isinstance(index, Tensor) else None)
        return args, kwargs

    def _loss_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        pending, self._pending = self._pending, None
        if pending is None:
            if self._training(module) and not self._warned:
                self._warned = True
                logger.warning(
                    "MIUCallback: a training forward of %s carried no %r column, so no MI term "
                    "was added to its loss (further cases are not reported)",
                    type(module).__name__,
                    self.group_key,
                )
            return None
        return self.add_term(output, args, kwargs, *pending)

    # -- the term -----------------------------------------------------------------------------
    def model_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Inputs for the original model's forward: the call's inputs without labels."""
        if args and isinstance(args[0], Tensor):
            return args[0]
        skip = _NOT_INPUTS | {self.label_key, self.group_key, self.id_key}
        return {k: v for k, v in kwargs.items() if k not in skip}

    def penalty(
        self, inputs: Any, labels: Tensor | None, groups: Tensor, index: Tensor | None = None
    ) -> Tensor:
        """λ·(Î_u − sg Î_o)² for the last training forward (features from the tap).

        ``index`` (the samples' positions) reads the original model's cached
        features instead of running it, when the cache is built.
        """
        handle = self.handle
        if handle is None:
            raise StateError("MIUCallback hooks have no MIU handle yet (on_train_begin not run)")
        z = handle.tap.pop()
        device = z.device
        groups = groups.to(device).long().reshape(-1)
        if labels is None:
            labels = torch.zeros_like(groups)
        batch = Batch(inputs, labels.reshape(-1), groups)
        if index is not None and handle.feature_cache is not None:
            batch.host_index = index if index.device.type == "cpu" else None
            batch.index = index.to(device, non_blocking=True).long().reshape(-1)
        self.terms_added += 1
        return handle.retain_penalty(z, batch)

    def add_term(
        self,
        output: Any,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        groups: Tensor,
        index: Tensor | None = None,
    ) -> Any:
        """Return ``output`` with the scaled MI term added to its loss."""
        loss = loss_of(output)
        if loss is None:
            raise DataError(
                "MIUCallback adds the MI term to the loss that the model returns, but this "
                "training forward returned none: the Trainer called the model without labels "
                "(label_smoothing_factor > 0 or a compute_loss_func moves the loss out of the "
                "model). Use make_miu_trainer(YourTrainer) for those setups"
            )
        labels = kwargs.get(self.label_key)
        labels = labels if isinstance(labels, Tensor) else None
        term = self.penalty(self.model_inputs(args, kwargs), labels, groups, index)
        scale = self.scale(loss, _logits_of(output), labels, kwargs.get("num_items_in_batch"))
        return replace_loss(output, self.combine(loss, scale * term.to(loss.dtype)))

    def combine(self, loss: Tensor, term: Tensor) -> Tensor:
        """``loss + term`` through :meth:`MIUHandle.retain_objective` (adaptive clipping).

        ``loss`` is the model's (or the parent ``compute_loss``'s) task loss and
        ``term`` the MI term with the same gradient-accumulation scaling, so
        MINE's ratio ‖∇loss‖/‖∇term‖ is that of the per-batch means.
        """
        if self.handle is None:
            raise StateError("MIUCallback hooks have no MIU handle yet (on_train_begin not run)")
        return self.handle.retain_objective(loss, term)

    def scale(
        self, loss: Tensor, logits: Tensor | None, labels: Tensor | None, num_items: Any
    ) -> Tensor | float:
        """Factor that gives the per-batch-mean MI term the model loss's GA scaling."""
        if num_items is None or self.single_batch or self.loss_normalized is False:
            return 1.0
        batch_size = int(logits.shape[0]) if logits is not None else 1
        if self.loss_normalized:  # decided: a device tensor, no host read
            return item_ratio(labels, batch_size, num_items)
        total = float(num_items.item() if isinstance(num_items, Tensor) else num_items)
        n_local = count_items(labels, int(logits.shape[0]) if logits is not None else 1)
        ratio = n_local / total if total > 0 else 1.0
        if self.loss_normalized is None and not math.isclose(ratio, 1.0):
            self.loss_normalized = self._detect(loss, logits, labels, ratio)
        return ratio if self.loss_normalized is not False else 1.0

    def _detect(
        self, loss: Tensor, logits: Tensor | None, labels: Tensor | None, ratio: float
    ) -> bool:
        """Tell whether ``loss`` is CE·ratio (normalised) or the plain batch mean."""
        if logits is None or labels is None or logits.dim() != 2 or labels.is_floating_point():
            return True
        with torch.no_grad():
            ce = float(
                F.cross_entropy(logits.detach().float(), labels.reshape(-1), ignore_index=-100)
            )
        value = float(loss.detach())
        if ce <= 0 or not math.isfinite(ce):
            return True
        if math.isclose(value, ce * ratio, rel_tol=1e-3):
            return True
        if math.isclose(value, ce, rel_tol=1e-3):
            logger.warning(
                "MIUCallback: %s accepts num_items_in_batch but returns a per-batch mean loss; "
                "the MI term follows that scaling under gradient accumulation",
                type(self.model).__name__,
            )
            return False
        return True

    # -- lifecycle ------------------------------------------------------------------------------
    def attach_loss(self, handle: MIUHandle, *, add_to_loss: bool = True) -> None:
        """Use ``handle`` for the MI term; with ``add_to_loss``, add it from the loss hook.

        ``add_to_loss=False`` is the subclass route, whose ``compute_loss`` calls
        :meth:`penalty` itself. Idempotent.
        """
        self.handle = handle
        self.loss_normalized = None
        if add_to_loss and self._loss is None:
            self._loss = self.model.register_forward_hook(self._loss_hook, with_kwargs=True)

    def detach_loss(self) -> None:
        """Remove the loss hook; the column pre-hook stays."""
        if self._loss is not None:
            self._loss.remove()
            self._loss = None
        self._pending = None

    def remove(self) -> None:
        """Remove every hook; safe to call more than once."""
        self.detach_loss()
        if self._columns is not None:
            self._columns.remove()
            self._columns = None

    @property
    def active(self) -> bool:
        """Whether the column pre-hook is still registered."""
        return self._columns is not None
