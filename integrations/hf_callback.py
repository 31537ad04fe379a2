"""``MIUCallback``: MIU in an unmodified ``transformers.Trainer`` (overview: ``hf.py``)."""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from miu_hooks._imports import require
from miu_hooks.config import MIUConfig
from miu_hooks.data import IndexedDataset, dataset_groups, split_keys
from miu_hooks.engine import MIUHandle, OriginalSpec, attach, resolve_original
from miu_hooks.errors import CheckpointError, ConfigError
from miu_hooks.guard import CollapseGuard, build_guard
from miu_hooks.integrations.hf_data import check_forget_columns, check_train_columns
from miu_hooks.integrations.hf_guard import check_epoch, install_retain_sampler
from miu_hooks.integrations.hf_hooks import TrainerHooks
from miu_hooks.integrations.hf_placement import calling_handler, place_before_reporters
from miu_hooks.integrations.hf_state import (
    check_trainer_args,
    index_train_dataset,
    make_runtime,
    resume_state,
    save_state,
    trainer_precision,
)
from miu_hooks.integrations.loaders import EpochLoader, check_last_batch, side_loaders
from miu_hooks.methods.base import ShuffleSampler
from miu_hooks.sampling import GroupReweightSampler
from miu_hooks.unlearn import check_split

transformers = require("transformers", extra="hf")
from transformers import TrainerCallback  # noqa: E402

__all__ = ["MIUCallback"]

logger = logging.getLogger(__name__)


class MIUCallback(TrainerCallback):
    """Turn a ``transformers.Trainer`` run on the retain set into an MIU unlearning run.

    Pass the **retain** set as the Trainer's ``train_dataset`` and the **forget**
    set here. Items are dicts with the model inputs (e.g. ``pixel_values``), the
    ``labels`` and a ``group`` column (group id g = s + y·S); see
    :func:`as_trainer_dataset` for ``(inputs, label, group)`` datasets. The
    Trainer's arguments rule optimisation (epochs, lr, batch size, accumulation,
    precision, ``max_grad_norm``, which also clips the forget steps); from
    ``config`` the callback uses ``forget_epochs``, ``mi_weight``, ``mine_*``,
    ``ema``, ``reweight``, ``calibrate``, ``clip``, the column keys and ``seed`` (critic
    initialisation and marginal draws). Data order (the REWEIGHT draw, forget
    and tuning shuffles) follows ``TrainingArguments.data_seed`` or ``seed``.

    Args:
        forget_dataset: The forget set D_f (map-style, dict items).
        original: The frozen original model for the calibration term: ``None``
            snapshots the Trainer's model when the Trainer is built (or at train
            start when the callback is added later), a safetensors path, or a module.
        config: MIU settings (see above); ``MIUConfig()`` by default.
        feature_module: Head override for the feature tap (dotted name or module).
        num_groups: |G|; default ``max group id + 1`` over retain ∪ forget.
        batch_size: Batch size of the forget and critic-tuning loaders (default
            ``per_device_train_batch_size``).
        resume_from: Checkpoint folder to restore the MIU state from when the
            Trainer resumes (default ``output_dir/checkpoint-<global_step>``).
        val_dataset: Held-out data (items like the retain set's) for the collapse
            guard; ``None`` holds a seeded slice of the retain set out of the
            REWEIGHT draw instead (docs/method.md §10). ``config.guard=False``
            turns the guard off.

    Attributes:
        handle: The :class:`~miu_hooks.engine.MIUHandle` (after train start).
        hooks: The native hooks on the model.
        sampler: The REWEIGHT sampler of the train loader (``None`` without REWEIGHT).
        started_epoch: Last epoch whose tuning/forget phase has run (-1 before).
        guard: The :class:`~miu_hooks.guard.CollapseGuard` of the run (``None`` when
            off); after each epoch it compares held-out accuracy with the original
            model's and, past ``config.guard_threshold`` points, restores the last
            good epoch's weights and stops training (``control.should_training_stop``).
            Each check appends ``guard/accuracy`` and ``guard/original`` (and, when it
            fires, ``guard/fired`` and ``guard/restored_epoch``) to
            ``state.log_history``; ``guard.outcome`` holds the record.

    Example:
        The callback in ``Trainer(callbacks=[...])``;
        :func:`~miu_hooks.integrations.hf.prepare_trainer` is the recommended way
        to add it (it places the callback ahead of the reporting callbacks
        without looking at the call stack):

        >>> import tempfile
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
        >>> cb = MIUCallback(forget, config=MIUConfig(mine_hidden=8, mine_warmup_iters=2))
        >>> args = TrainingArguments(tempfile.mkdtemp(), num_train_epochs=1,
        ...                          use_cpu=True, report_to="none", save_strategy="no",
        ...                          remove_unused_columns=False, disable_tqdm=True)
        >>> trainer = Trainer(model=vit, args=args, train_dataset=retain, callbacks=[cb])
        >>> _ = trainer.train()  # doctest: +ELLIPSIS
        {...}
        >>> cb.handle.counters["forget"] > 0, cb.hooks.terms_added == trainer.state.global_step
        (True, True)
        >>> cb.remove()  # detach the remaining column hook when done
    """

    def __init__(
        self,
        forget_dataset: Dataset,
        *,
        original: OriginalSpec = None,
        config: MIUConfig | None = None,
        feature_module: str | nn.Module | None = None,
        num_groups: int | None = None,
        batch_size: int | None = None,
        resume_from: str | os.PathLike[str] | None = None,
        val_dataset: Dataset | None = None,
    ) -> None:
        self.config = config or MIUConfig()
        self.val_dataset = val_dataset
        self.guard: CollapseGuard | None = None
        self._shuffle: ShuffleSampler | None = None
        self.forget_dataset = forget_dataset
        check_forget_columns(forget_dataset, self.config.group_key, self.config.label_key)
        if batch_size is not None and batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1 or None; got {batch_size}")
        self.original_spec = original
        self.feature_module = feature_module
        self.num_groups = num_groups
        self.batch_size = batch_size
        self.resume_from = resume_from
        self.handle: MIUHandle | None = None
        self.hooks: TrainerHooks | None = None
        self.sampler: GroupReweightSampler | None = None
        self.started_epoch = -1
        self.subclassed = False  # set by MIUTrainerMixin: its compute_loss and log() add the terms
        self._original: nn.Module | None = None
        self._args: Any = None
        self._switched_columns = False
        self._placed = False  # ahead of the reporting callbacks (prepare_trainer, MIUTrainer)
        self._loaders: tuple[EpochLoader, EpochLoader] | None = None
        self._indexed: tuple[Any, Any] | None = None  # (trainer, its own train_dataset)

    # -- Trainer events ------------------------------------------------------------------
    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Snapshot the original model, keep the group column, place the column hook."""
        self.bind(args, kwargs.get("model"))

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Validate the columns, attach the engine, install REWEIGHT, restore a resumed state."""
        model, optimizer, loader = kwargs["model"], kwargs["optimizer"], kwargs["train_dataloader"]
        cfg = self.config
        check_trainer_args(args)
        self._args = args
        check_train_columns(loader, self.config.group_key)
        if self._original is None:
            if state.global_step > 0:
                raise CheckpointError(
                    "MIUCallback needs the original model to resume: pass it to the Trainer's "
                    "callbacks= at construction (the model is snapshotted then) or give original="
                )
            self._snapshot(model)
        hooks = self._hooks_for(model)
        if self.handle is not None:
            self.handle.remove()
        retain = loader.dataset
        retain_groups = dataset_groups(retain, cfg.group_key)
        forget_groups = dataset_groups(self.forget_dataset, cfg.group_key)
        train_groups, num_groups = check_split(retain_groups, forget_groups, self.num_groups)
        seed = args.data_seed if args.data_seed is not None else args.seed
        run_cfg = cfg.replace(
            device=str(args.device),
            precision=trainer_precision(args),
            max_grad_norm=float(args.max_grad_norm) if args.max_grad_norm else None,
            batch_size=self.batch_size or args.per_device_train_batch_size,
        )
        runtime = make_runtime(args, optimizer)
        check_last_batch(
            loader,
            model,
            what="the Trainer's retain loader",
            fix="set TrainingArguments(dataloader_drop_last=True), or another batch size",
            keys=split_keys(run_cfg),
            world_size=int(getattr(runtime, "world_size", 1)),
        )
        self.handle = attach(
            model,
            run_cfg,
            num_groups=num_groups,
            original=self._original,
            feature_module=self.feature_module,
            runtime=runtime,
            tap_when="train",
        )
        hooks.attach_loss(self.handle, add_to_loss=not self.subclassed)
        hooks.single_batch = (
            args.gradient_accumulation_steps == 1 and self.handle.runtime.world_size == 1
        )
        plain = retain.dataset if isinstance(retain, IndexedDataset) else retain
        # Batches of an indexed retain set (prepare_trainer, MIUTrainer) read cached features.
        cache_on: Dataset | None = (
            ConcatDataset([plain, self.forget_dataset]) if plain is not retain else None
        )
        if cache_on is not None:
            self.handle.cache_features(
                cache_on,
                num_workers=args.dataloader_num_workers,
                collate_fn=getattr(loader, "collate_fn", None),  # e.g. padding for text
            )
        self._loaders = side_loaders(
            self.forget_dataset, plain, loader, self.handle.runtime,
            batch_size=run_cfg.batch_size, seed=seed, args=args, indexed=cache_on is not None,
        )  # fmt: skip
        self.guard, held = build_guard(
            plain, retain_groups, self.val_dataset, cfg,
            collate_fn=getattr(loader, "collate_fn", None),
        )  # fmt: skip
        self.sampler, self._shuffle = install_retain_sampler(
            loader, reweight=cfg.reweight, retain_groups=retain_groups, train_groups=train_groups,
            num_groups=num_groups, seed=seed, held=held,
        )  # fmt: skip
        self.started_epoch = -1
        if self.guard is not None:
            self.guard.start(self.handle.original, keep_weights=False)  # the original's accuracy
            self.guard.set_good(model, math.floor((state.epoch or 0.0) + 1e-6) - 1)
        if state.global_step > 0:
            self._resume(args, state, model)
        if not self._placed:
            self._place_from_event()

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Redraw REWEIGHT, tune the critics and (first ``forget_epochs``) run the forget pass."""
        if self.handle is None or self._loaders is None:
            return
        epoch = math.floor((state.epoch or 0.0) + 1e-6)
        for sampler in (self.sampler, self._shuffle):
            if sampler is not None:
                sampler.set_epoch(epoch)
        if epoch <= self.started_epoch:
            logger.info("MIUCallback: epoch %d started before the checkpoint; not repeated", epoch)
            return
        forget_loader, tune_loader = self._loaders
        for loader in (forget_loader, tune_loader):
            loader.set_epoch(epoch)
        model = kwargs["model"]
        assert self.hooks is not None
        self.hooks.internal = True
        try:
            self.handle.epoch_start(
                epoch,
                optimizer=kwargs["optimizer"],
                forget_loader=forget_loader,
                tune_loader=tune_loader,
            )
        finally:
            self.hooks.internal = False
            model.zero_grad(set_to_none=True)
        self.started_epoch = epoch

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Collapse guard: check held-out accuracy; past the threshold restore and stop."""
        if self.guard is not None and self.handle is not None and self.hooks is not None:
            check_epoch(self.guard, self.handle.model, self.hooks, state, control)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        """Put the ``miu/*`` means into the training record being logged."""
        if logs is None or "loss" not in logs or self.handle is None:
            return
        values = self.pop_logs()
        if not values:
            return
        logs.update(values)
        history = getattr(state, "log_history", None)
        if history and history[-1].get("step") == state.global_step and "loss" in history[-1]:
            history[-1].update(values)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the MIU state into the checkpoint folder just saved."""
        if self.handle is None or not state.is_world_process_zero:
            return
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(folder):
            logger.warning(
                "MIUCallback: no checkpoint folder %s to add the MIU state to (a custom run_dir?); "
                "the MIU state of this checkpoint is not saved",
                folder,
            )
            return
        save_state(folder, self.handle, self._meta())

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Remove the loss hook and the taps; the column hook stays until :meth:`remove`."""
        if self.hooks is not None:
            self.hooks.detach_loss()
        if self.handle is not None:
            self.handle.remove()

    # -- public helpers ----------------------------------------------------------------------------
    def pop_logs(self) -> dict[str, float]:
        """Return the ``miu/*`` means since the last call (empty before train start)."""
        return self.handle.pop_logs() if self.handle is not None else {}

    def make_sampler(self, retain: Any, args: Any) -> GroupReweightSampler:
        """The REWEIGHT sampler of ``retain`` (used by :class:`MIUTrainerMixin`).

        It leaves out the collapse guard's held-out slice, the same one
        ``on_train_begin`` measures (a pure function of the groups and the seed).
        """
        cfg = self.config
        retain_groups = dataset_groups(retain, cfg.group_key)
        forget_groups = dataset_groups(self.forget_dataset, cfg.group_key)
        train_groups, num_groups = check_split(retain_groups, forget_groups, self.num_groups)
        seed = args.data_seed if args.data_seed is not None else args.seed
        _, held = build_guard(retain, retain_groups, self.val_dataset, cfg)
        return GroupReweightSampler(
            retain_groups, train_groups, num_groups=num_groups, seed=seed, exclude=held
        )

    def bind(self, args: Any, model: Any) -> None:
        """Prepare a Trainer run: keep the group column, snapshot ``model``, hook its columns.

        Runs when the Trainer is built (``on_init_end``), or from
        :func:`prepare_trainer` for a Trainer built already. It switches
        ``args.remove_unused_columns`` off (with one warning) so that the group
        column reaches the batches; :meth:`remove` switches it back on.
        """
        self._args = args
        check_trainer_args(args)
        if args.remove_unused_columns:
            args.remove_unused_columns = False
            self._switched_columns = True
            logger.warning(
                "MIUCallback set TrainingArguments.remove_unused_columns=False so that the %r "
                "column reaches the callback (its hook removes it before the model's forward)",
                self.config.group_key,
            )
        if isinstance(model, nn.Module):
            self._snapshot(model)
            self._hooks_for(model)

    def place(self, callbacks: list[Any]) -> None:
        """Put this callback ahead of the reporting callbacks in the Trainer's ``callbacks`` list.

        Then the ``miu/*`` keys it adds to a log record reach every ``report_to``
        backend (see :mod:`~miu_hooks.integrations.hf_placement`).
        """
        place_before_reporters(callbacks, self)
        self._placed = True

    def remove(self) -> None:
        """Remove every hook and tap, and restore ``remove_unused_columns``; idempotent."""
        if self.hooks is not None:
            self.hooks.remove()
        if self.handle is not None:
            self.handle.remove()
        if self._switched_columns and self._args is not None:
            self._args.remove_unused_columns = True
            self._switched_columns = False
        if self._indexed is not None:
            trainer, dataset = self._indexed
            trainer.train_dataset = dataset
            self._indexed = None

    def index_train_dataset(self, trainer: Any) -> None:
        """Give the items of ``trainer.train_dataset`` their positions, for the feature cache.

        See :func:`~miu_hooks.integrations.hf_state.index_train_dataset`;
        :meth:`remove` puts the Trainer's own dataset back.
        """
        own = index_train_dataset(trainer, self.config.feature_cache)
        if own is not None:
            self._indexed = (trainer, own)

    def _place_from_event(self) -> None:
        """Placement for a callback the Trainer got in ``callbacks=`` (no Trainer at hand)."""
        handler = calling_handler(self)
        if handler is None:
            logger.warning(
                "MIUCallback could not reach the Trainer's callback list; the miu/* terms reach "
                "state.log_history but report_to backends may miss them. Add the callback with "
                "prepare_trainer(trainer, forget_dataset, ...) instead"
            )
            return
        self.place(handler.callbacks)

    def _snapshot(self, model: nn.Module) -> None:
        if self._original is None:
            self._original = resolve_original(model, self.original_spec)

    def _hooks_for(self, model: nn.Module) -> TrainerHooks:
        if self.hooks is None or self.hooks.model is not model or not self.hooks.active:
            if self.hooks is not None:
                self.hooks.remove()
            cfg = self.config
            self.hooks = TrainerHooks(
                model, group_key=cfg.group_key, id_key=cfg.id_key, label_key=cfg.label_key
            )
        return self.hooks

    def _meta(self) -> dict[str, Any]:
        assert self.handle is not None
        return {
            "started_epoch": self.started_epoch,
            "epoch": self.handle.epoch,
            "counters": dict(self.handle.counters),
            "num_groups": self.handle.num_groups,
            "config": self.handle.config.to_dict(),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        }

    def _resume(self, args: Any, state: Any, model: nn.Module) -> None:
        assert self.handle is not None
        folder = self.resume_from or os.path.join(
            args.output_dir, f"checkpoint-{state.global_step}"
        )
        self.started_epoch = resume_state(folder, self.handle, model)
        logger.info("MIUCallback: resumed MIU state from %s (epoch %d)", folder, self.started_epoch)
