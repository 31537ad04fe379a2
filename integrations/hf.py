"""Hugging Face ``Trainer`` integration: :func:`prepare_trainer`, :class:`MIUCallback` and more.

Add MIU to the Trainer you already have and the run becomes a group-robust
unlearning run (REWEIGHT + MIU, docs/method.md §2-§3) on the retain set you pass
as ``train_dataset``::

    trainer = Trainer(model=model, args=args, train_dataset=retain)
    miu = prepare_trainer(trainer, forget)            # or callbacks=[MIUCallback(forget)]
    trainer.train()
    miu.remove()

The callback drives the shared engine (:func:`miu_hooks.attach`); it never wraps
the model. How it works (docs/integrations.md §0-§5):

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
  the callback switches it off when it is added (one warning) and checks at
  train start that the column reaches the batches, failing with the setting to
  change otherwise.
* **Logging.** ``miu/*`` means since the last log go into the Trainer's training
  log record, so ``state.log_history`` and every ``report_to`` backend see them.
  ``Trainer.log`` hands one ``logs`` dict to the callbacks in list order and the
  reporting callbacks come first, so the callback must sit ahead of them:
  :func:`prepare_trainer` and ``MIUTrainer`` put it there through
  ``trainer.callback_handler``; a callback passed in ``callbacks=[...]`` finds
  the list on the call stack at train start
  (:mod:`~miu_hooks.integrations.hf_placement`).
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

from torch import nn

from miu_hooks.integrations.hf_callback import MIUCallback
from miu_hooks.integrations.hf_data import GroupDictDataset, as_trainer_dataset
from miu_hooks.integrations.hf_metrics import make_compute_metrics
from miu_hooks.integrations.hf_prepare import prepare_trainer
from miu_hooks.integrations.hf_trainer import MIUTrainer, MIUTrainerMixin, make_miu_trainer
from miu_hooks.taps import infer_feature_dim, resolve_features

__all__ = [
    "GroupDictDataset",
    "MIUCallback",
    "MIUTrainer",
    "MIUTrainerMixin",
    "as_trainer_dataset",
    "find_features",
    "make_compute_metrics",
    "make_miu_trainer",
    "prepare_trainer",
]


def find_features(
    model: nn.Module, feature_module: str | nn.Module | None = None
) -> tuple[str, int | None]:
    """Return the dotted name of the layer whose input MIU taps, and the features' width.

    The layer is found as in :func:`miu_hooks.taps.resolve_features`: the linear
    layer that emits the logits, whose input are the pooled penultimate features.
    For Hugging Face image classifiers (ViT, DeiT, Swin, ConvNeXt, BEiT, Dinov2)
    and BERT, DistilBERT, DeBERTa-v2, ALBERT and ModernBERT it is ``classifier``;
    for ResNet ``classifier.1`` (after the Flatten); for RoBERTa, XLM-RoBERTa and
    ELECTRA ``classifier.out_proj`` (after pooling, dense and activation). The
    width is ``None`` when it cannot be read off the layer (it is then taken
    from the first batch).

    Example:
        >>> find_features(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        ('2', 8)
    """
    name, layer = resolve_features(model, feature_module)
    return name, infer_feature_dim(layer)
