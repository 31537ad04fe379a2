"""``prepare_trainer``: add MIU to a ``transformers.Trainer`` that is already built.

It is the recommended Trainer route: holding the Trainer, it places the
:class:`~miu_hooks.integrations.hf_callback.MIUCallback` ahead of the reporting
callbacks through ``trainer.callback_handler`` (docs/integrations.md §0), where a
callback passed in ``Trainer(callbacks=[...])`` has to find the list on the
call stack.
"""

from __future__ import annotations

import os

from torch import nn
from torch.utils.data import Dataset

from miu_hooks._imports import require
from miu_hooks.config import MIUConfig
from miu_hooks.engine import OriginalSpec
from miu_hooks.errors import ConfigError, ConfigTypeError
from miu_hooks.integrations.hf_callback import MIUCallback

require("transformers", extra="hf")
from transformers import Trainer  # noqa: E402

__all__ = ["prepare_trainer"]


def prepare_trainer(
    trainer: Trainer,
    forget_dataset: Dataset,
    *,
    original: OriginalSpec = None,
    config: MIUConfig | None = None,
    feature_module: str | nn.Module | None = None,
    num_groups: int | None = None,
    batch_size: int | None = None,
    resume_from: str | os.PathLike[str] | None = None,
    val_dataset: Dataset | None = None,
) -> MIUCallback:
    """Add MIU to a ``Trainer`` built on the retain set; the recommended Trainer route.

    Builds an :class:`MIUCallback` and puts it in the Trainer's callback list
    right after ``DefaultFlowCallback``, ahead of the ``report_to`` callbacks,
    so the ``miu/*`` log keys reach every backend and ``state.log_history``. It
    switches ``trainer.args.remove_unused_columns`` off (with a warning) so the
    group column reaches the batches, snapshots ``trainer.model`` as the
    original model (unless ``original`` is given) and places the column hook.
    Unless ``config.feature_cache="off"``, it also gives the retain items their
    positions (an ``__index__`` column the hook drops), so that retain steps
    read the original model's features, cached once at train start, instead of
    running it (when reading an item twice gives the same values).
    Nothing runs until ``trainer.train()``; call ``callback.remove()`` after
    training to take the last hook off and restore ``remove_unused_columns``.

    Args:
        trainer: A ``transformers.Trainer`` (or subclass) whose ``train_dataset``
            is the retain set, not trained by MIU yet.
        forget_dataset: The forget set D_f (map-style, dict items).
        original: See :class:`MIUCallback` (``None``: ``trainer.model`` now).
        config: See :class:`MIUCallback`.
        feature_module: See :class:`MIUCallback`.
        num_groups: See :class:`MIUCallback`.
        batch_size: See :class:`MIUCallback`.
        resume_from: See :class:`MIUCallback`.
        val_dataset: Held-out data for the collapse guard (see :class:`MIUCallback`).

    Returns:
        The callback, already registered with ``trainer``.

    Raises:
        ConfigTypeError: ``trainer`` is not a ``transformers.Trainer``.
        ConfigError: The Trainer already has an :class:`MIUCallback` (an
            ``MIUTrainer`` brings its own: ``trainer.miu``).
        DataError: The forget set lacks the group or label column.

    Example:
        >>> import tempfile
        >>> import torch
        >>> from transformers import Trainer, TrainingArguments, ViTConfig
        >>> from transformers import ViTForImageClassification
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
        >>> trainer = Trainer(model=vit, args=args, train_dataset=retain)
        >>> miu = prepare_trainer(trainer, forget, config=MIUConfig(
        ...     mine_hidden=8, mine_warmup_iters=2, mine_iters=1))
        >>> _ = trainer.train()  # doctest: +ELLIPSIS
        {...}
        >>> "miu/calibration" in trainer.state.log_history[0]
        True
        >>> miu.remove()  # the model is left as it was: same class and keys, no hooks
    """
    if not isinstance(trainer, Trainer):
        raise ConfigTypeError(
            f"prepare_trainer needs a transformers.Trainer; got {type(trainer).__name__}"
        )
    callbacks = trainer.callback_handler.callbacks
    if any(isinstance(cb, MIUCallback) for cb in callbacks):
        raise ConfigError(
            "this Trainer already has an MIUCallback (an MIUTrainer brings its own as "
            "trainer.miu); add MIU once"
        )
    callback = MIUCallback(
        forget_dataset,
        original=original,
        config=config,
        feature_module=feature_module,
        num_groups=num_groups,
        batch_size=batch_size,
        val_dataset=val_dataset,
        resume_from=resume_from,
    )
    callback.bind(trainer.args, trainer.model)
    callback.place(callbacks)
    callback.index_train_dataset(trainer)  # retain batches read cached original features
    return callback
