"""``MIUTrainerMixin``, ``MIUTrainer`` and ``make_miu_trainer``: MIU for ``Trainer`` subclassers.

The subclass route shares everything with :class:`~miu_hooks.integrations.hf_callback.MIUCallback`,
which it registers: the mixin only moves the MI term from the model's forward
hook into ``compute_loss`` and builds the REWEIGHT sampler in
``_get_train_sampler``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from miu_hooks._imports import require
from miu_hooks.config import MIUConfig
from miu_hooks.engine import OriginalSpec
from miu_hooks.errors import ConfigTypeError, DataError
from miu_hooks.integrations.hf_callback import MIUCallback
from miu_hooks.integrations.hf_hooks import INDEX_KEY, item_ratio

require("transformers", extra="hf")
from transformers import Trainer  # noqa: E402

__all__ = ["MIUTrainer", "MIUTrainerMixin", "make_miu_trainer"]


if TYPE_CHECKING:  # type the mixin against the Trainer it is mixed into
    _TrainerBase = Trainer
else:
    _TrainerBase = object


class MIUTrainerMixin(_TrainerBase):
    """Mixin giving a ``Trainer`` subclass MIU through ``compute_loss`` and the train sampler.

    It registers an :class:`MIUCallback` (which runs tuning, forget passes, state
    and logging), builds the REWEIGHT sampler in ``_get_train_sampler`` and adds
    the calibration term in ``compute_loss`` after the parent's loss, so a custom
    parent (``make_miu_trainer(SFTTrainer)``) keeps its own loss. The returned
    loss is a per-batch mean: ``model_accepts_loss_kwargs`` is turned off (and
    ``loss_is_scaled_for_ga`` set to ``False`` where it exists and no
    ``compute_loss_func`` is used), so the Trainer divides it by the
    accumulation steps. Pass the MIU arguments by keyword, the Trainer's too.

    Args:
        forget_dataset: The forget set D_f.
        miu_config: MIU settings (:class:`MIUCallback`'s ``config``).
        original: See :class:`MIUCallback`.
        feature_module: See :class:`MIUCallback`.
        num_groups: See :class:`MIUCallback`.
        miu_batch_size: :class:`MIUCallback`'s ``batch_size``.
        miu_val_dataset: :class:`MIUCallback`'s ``val_dataset`` (the collapse guard's data).
        **kwargs: The Trainer's own arguments.

    Example:
        >>> import tempfile
        >>> from transformers import TrainingArguments, ViTConfig, ViTForImageClassification
        >>> from miu_hooks.data import GroupTensorDataset
        >>> from miu_hooks.integrations.hf import as_trainer_dataset
        >>> torch.manual_seed(0) and None
        >>> vit = ViTForImageClassification(ViTConfig(
        ...     hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        ...     intermediate_size=32, image_size=8, patch_size=4, num_labels=2))
        >>> x, y = torch.randn(40, 3, 8, 8), torch.randint(0, 2, (40,))
        >>> g = 2 * y + torch.randint(0, 2, (40,))
        >>> retain = as_trainer_dataset(GroupTensorDataset(x[8:], y[8:], g[8:]))
        >>> forget = as_trainer_dataset(GroupTensorDataset(x[:8], y[:8], g[:8]))
        >>> args = TrainingArguments(tempfile.mkdtemp(), max_steps=2, logging_steps=1,
        ...                          use_cpu=True, report_to="none", save_strategy="no",
        ...                          remove_unused_columns=False, disable_tqdm=True)
        >>> trainer = MIUTrainer(model=vit, args=args, train_dataset=retain, forget_dataset=forget,
        ...                      miu_config=MIUConfig(mine_hidden=8, mine_warmup_iters=2))
        >>> _ = trainer.train()  # doctest: +ELLIPSIS
        {...}
        >>> "miu/calibration" in trainer.state.log_history[0]
        True
        >>> trainer.miu.remove()
    """

    miu: MIUCallback

    def __init__(
        self,
        *args: Any,
        forget_dataset: Dataset,
        miu_config: MIUConfig | None = None,
        original: OriginalSpec = None,
        feature_module: str | nn.Module | None = None,
        num_groups: int | None = None,
        miu_batch_size: int | None = None,
        miu_val_dataset: Dataset | None = None,
        **kwargs: Any,
    ) -> None:
        callback = MIUCallback(
            forget_dataset,
            original=original,
            config=miu_config,
            feature_module=feature_module,
            num_groups=num_groups,
            batch_size=miu_batch_size,
            val_dataset=miu_val_dataset,
        )
        callback.subclassed = True
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), callback]
        self.miu = callback
        super().__init__(*args, **kwargs)
        callback.place(self.callback_handler.callbacks)
        callback.index_train_dataset(self)  # retain batches read cached original features
        self.model_accepts_loss_kwargs = False
        if hasattr(type(self), "loss_is_scaled_for_ga") and self.compute_loss_func is None:
            self.loss_is_scaled_for_ga = False  # transformers >= 5.23

    def _get_train_sampler(
        self, train_dataset: Dataset | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not self.miu.config.reweight or dataset is None or not hasattr(dataset, "__len__"):
            return super()._get_train_sampler(dataset, *args, **kwargs)
        return self.miu.make_sampler(dataset, self.args)

    def _ga_divides(self, num_items_in_batch: Any) -> bool:
        """Whether ``training_step`` divides the returned loss by the accumulation steps."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:  # transformers < 5.23 has no attribute: its rule
            scaled = (
                bool(self.model_accepts_loss_kwargs) and num_items_in_batch is not None
            ) or self.compute_loss_func is not None
        return not scaled

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
        **kwargs: Any,
    ) -> Any:
        """The parent's loss plus λ·(Î_u − sg Î_o)² on training batches."""
        hooks = self.miu.hooks
        training = model.training and torch.is_grad_enabled()
        if not training or hooks is None or self.miu.handle is None:
            return super().compute_loss(
                model,
                inputs,
                return_outputs=return_outputs,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
        cfg = self.miu.config
        inputs = dict(inputs)
        if cfg.group_key not in inputs:
            raise DataError(
                f"training batch has no {cfg.group_key!r} column; columns are {sorted(inputs)}"
            )
        groups = inputs.pop(cfg.group_key)
        inputs.pop(cfg.id_key, None)
        index = inputs.pop(INDEX_KEY, None)
        labels = inputs.get(hooks.label_key)
        model_inputs = hooks.model_inputs((), inputs)
        loss, outputs = super().compute_loss(
            model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch, **kwargs
        )
        labels = labels if isinstance(labels, Tensor) else None
        term = hooks.penalty(
            model_inputs, labels, groups, index if isinstance(index, Tensor) else None
        )
        scale: Tensor | float = 1.0
        if num_items_in_batch is not None and not self._ga_divides(num_items_in_batch):
            scale = item_ratio(labels, len(groups), num_items_in_batch)  # no host read
        loss = hooks.combine(loss, scale * term.to(loss.dtype))
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Merge the ``miu/*`` means into training log records, then log as usual."""
        if "loss" in logs:
            logs.update(self.miu.pop_logs())
        super().log(logs, *args, **kwargs)

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """Train, remembering the checkpoint folder so the MIU state is restored from it."""
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            self.miu.resume_from = resume_from_checkpoint
        return super().train(resume_from_checkpoint, *args, **kwargs)


def make_miu_trainer(trainer_cls: type[Any]) -> type[Any]:
    """Return ``trainer_cls`` with :class:`MIUTrainerMixin` in front (e.g. ``SFTTrainer``).

    Example:
        >>> make_miu_trainer(Trainer).__name__
        'MIUTrainer'
    """
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise ConfigTypeError(f"make_miu_trainer needs a Trainer subclass; got {trainer_cls!r}")
    name = "MIU" + (trainer_cls.__name__ if trainer_cls is not Trainer else "Trainer")
    return type(name, (MIUTrainerMixin, trainer_cls), {"__module__": trainer_cls.__module__})


class MIUTrainer(MIUTrainerMixin, Trainer):
    """``transformers.Trainer`` with MIU built in (see :class:`MIUTrainerMixin`)."""
