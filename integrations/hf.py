"""Hugging Face ``Trainer`` integration: :class:`MIUCallback` and :class:`MIUTrainerMixin`.

Add one callback to the Trainer you already have and the run becomes a
group-robust unlearning run (REWEIGHT + MIU, METHOD.md §2-§3) on the retain set
you pass as ``train_dataset``::

    trainer = Trainer(model=model, args=args, train_dataset=retain,
                      callbacks=[MIUCallback(forget)])

The callback drives the shared engine (:func:`miu_hooks.attach`); it never wraps
the model. Design choices (INTEGRATION.md §0-§5):

* **Loss.** Native hooks on the model (:mod:`~miu_hooks.integrations.hf_hooks`)
  drop the ``group`` column before ``forward`` and add the calibration term to
  ``outputs.loss`` of training forwards, scaled like the model's own loss under
  gradient accumulation. Evaluation forwards get nothing.
* **REWEIGHT.** The Trainer's DataLoader (and its dataset) exists before any
  callback event, so a resampled dataset *view* cannot be put in place; the
  equivalent used here replaces the sampler of the loader's innermost
  ``BatchSampler`` with a :class:`~miu_hooks.sampling.GroupReweightSampler` of
  the same length (draws with replacement, weights N_g(D)/N_g(D_r)), redrawn
  each epoch from ``(seed, epoch)``; the step count is unchanged.
* **Schedule.** ``on_epoch_begin`` tunes the critics over D = retain ∪ forget and,
  for the first ``forget_epochs`` epochs, runs the forget pass with the Trainer's
  optimizer.
* **Columns.** With ``remove_unused_columns=True`` the Trainer drops ``group``;
  the callback switches it off when the Trainer is built (one warning) and
  checks at train start that the column reaches the batches, failing with the
  setting to change otherwise.
* **Logging.** ``miu/*`` means since the last log go into the Trainer's training
  log record, so ``state.log_history`` and every ``report_to`` backend see them:
  ``Trainer.log`` hands one ``logs`` dict to the callbacks in order, so the
  callback moves itself ahead of the reporting callbacks at train start and
  also completes the record ``log_history`` already holds.
* **Processes.** With ``torch.distributed`` running, the MI terms are computed on
  the global batch (:class:`~miu_hooks.distributed.DistributedRuntime`), the
  forget and tuning loaders give each rank its share of one global stream, and
  the forget steps average gradients by hand (the callback's model is unwrapped).
* **Checkpoints.** ``miu_state.safetensors`` + ``miu_state.json`` in every
  checkpoint folder; ``resume_from_checkpoint`` restores them and continues the
  schedule where it stopped.

:class:`MIUTrainerMixin` / :func:`make_miu_trainer` give subclassers the same
behaviour through ``compute_loss`` and ``_get_train_sampler``.
"""

from __future__ import annotations

from miu_hooks.integrations.hf_callback import MIUCallback
from miu_hooks.integrations.hf_metrics import (
    GroupDictDataset,
    as_trainer_dataset,
    find_features,
    make_compute_metrics,
)
from miu_hooks.integrations.hf_trainer import MIUTrainer, MIUTrainerMixin, make_miu_trainer

__all__ = [
    "GroupDictDataset",
    "MIUCallback",
    "MIUTrainer",
    "MIUTrainerMixin",
    "as_trainer_dataset",
    "find_features",
    "make_compute_metrics",
    "make_miu_trainer",
]
