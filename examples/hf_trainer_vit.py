"""Group-robust unlearning with an ordinary Hugging Face ``Trainer`` and a tiny ViT.

The data is a Colored-MNIST analogue built from scikit-learn's bundled digits
(``miu_hooks.demo.colored_digits``, no download): y = 1[digit >= 5], the
digit is drawn in red or green, and the colour agrees with y 80% of the time.
Groups are g = colour + 2·y:

    0: y=0 red   1: y=0 green (minority)   2: y=1 red (minority)   3: y=1 green

Steps, all on CPU in well under two minutes:

1. train an "original" ViT on the full training set D with a plain ``Trainer``;
2. forget 90% of group 2 (the forget set D_f) in two ways, both starting from
   the original and training on the retain set D_r = D minus D_f:
   * plain fine-tuning: the same ``Trainer`` with nothing added;
   * MIU: the same ``Trainer``, with ``prepare_trainer(trainer, D_f)`` added;
3. print per-group test accuracy, the forget-group accuracy GA and the accuracy
   on the forgotten samples FA for the three models.

Plain fine-tuning sees almost no red y=1 digits any more and learns "red means
y=0": its accuracy on group 2 collapses. MIU resamples the retain set to the
original group mixture (REWEIGHT) and keeps the information that the features
carry about the groups at the original model's level, so group 2 keeps its
accuracy. At this forget ratio its (floored) forget pass removes little from
the forgotten samples themselves: REWEIGHT draws the few red y=1 digits left ten
times as often, and they re-teach the group (README: MIU's forget objective).
A validation split is passed as ``val_dataset`` for the collapse guard.

Run::

    python examples/hf_trainer_vit.py            # full run (about a minute on 2 cores)
    python examples/hf_trainer_vit.py --quick    # shortened (used by the test suite)

``MIU_EXAMPLE_QUICK=1`` in the environment has the same effect as ``--quick``.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import torch
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification
from transformers.utils import logging as hf_logging

from miu_hooks.config import MIUConfig
from miu_hooks.demo import colored_digits
from miu_hooks.integrations.hf import as_trainer_dataset, make_compute_metrics, prepare_trainer
from miu_hooks.metrics import accuracy, per_group_accuracy
from miu_hooks.splits import forget_split, subset

FORGET_GROUP = 2  # y = 1, red: a minority group


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    """A 2-layer ViT for 3 x 8 x 8 images, four 4 x 4 patches, random initialisation."""
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        image_size=8,
        patch_size=4,
        num_channels=3,
        num_labels=2,
    )
    return ViTForImageClassification(config)


def training_args(out: str, epochs: int, lr: float, **extra: object) -> TrainingArguments:
    """Plain TrainingArguments; nothing here is specific to unlearning."""
    return TrainingArguments(
        output_dir=out,
        num_train_epochs=epochs,
        per_device_train_batch_size=64,
        learning_rate=lr,
        weight_decay=0.0,
        seed=0,
        use_cpu=True,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,  # with tqdm off, the Trainer prints each log record instead
        **{"logging_strategy": "no", **extra},  # type: ignore[arg-type]
    )


@torch.no_grad()
def scores(model: torch.nn.Module, data, forget) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Test accuracy per group, GA (forget group's test accuracy) and FA (accuracy on D_f)."""
    model.eval()
    logits = model(pixel_values=data.test.inputs).logits
    per_group = per_group_accuracy(logits, data.test.labels, data.test.groups, data.num_groups)
    out = {f"g{g}": acc for g, acc in per_group.items() if acc is not None}
    out["test"] = accuracy(logits, data.test.labels)
    out["GA"] = out[f"g{FORGET_GROUP}"]
    out["FA"] = accuracy(model(pixel_values=forget.inputs).logits, forget.labels)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shortened run (for tests)")
    parser.add_argument("--out", default=None, help="Trainer output folder (default: a temp dir)")
    cli = parser.parse_args()
    quick = cli.quick or os.environ.get("MIU_EXAMPLE_QUICK", "") not in ("", "0")
    hf_logging.set_verbosity_error()  # keep the output to the table below
    torch.set_num_threads(1)  # a model this small runs fastest on one CPU thread
    start = time.time()

    # -- data: D, and the split of D into D_r (retain) and D_f (forget) ---------------------
    data = colored_digits(
        seed=0, size=8, label_noise=0.0, color_flip=0.2, test_fraction=0.3, val_fraction=0.1
    )
    retain_idx, forget_idx = forget_split(data.train, forget_groups=(FORGET_GROUP,), ratio=0.9)
    retain, forget = subset(data.train, retain_idx), subset(data.train, forget_idx)
    # The Trainer wants dict items: {"pixel_values", "labels", "group"}.
    train_ds, retain_ds, forget_ds = (as_trainer_dataset(d) for d in (data.train, retain, forget))

    with tempfile.TemporaryDirectory() as tmp:
        out = cli.out or tmp

        # -- 1. the original model: an ordinary Trainer run on all of D --------------------
        original = tiny_vit()
        Trainer(
            model=original,
            args=training_args(os.path.join(out, "original"), 12 if quick else 25, 1e-3),
            train_dataset=train_ds,
        ).train()

        epochs = 3
        # -- 2a. plain fine-tuning on the retain set ------------------------------------
        plain = copy.deepcopy(original)
        Trainer(
            model=plain,
            args=training_args(os.path.join(out, "plain"), epochs, 1e-3),
            train_dataset=retain_ds,
        ).train()

        # -- 2b. MIU: the same Trainer, plus one line ---------------------------------------
        miu = copy.deepcopy(original)
        trainer = Trainer(
            model=miu,
            args=training_args(
                os.path.join(out, "miu"),
                epochs,
                1e-3,
                eval_strategy="epoch",
                logging_strategy="steps",
                logging_steps=10,
                # keep the "group" column (prepare_trainer would switch this off
                # itself, with a warning)
                remove_unused_columns=False,
            ),
            train_dataset=retain_ds,
            eval_dataset=as_trainer_dataset(data.test),
            compute_metrics=make_compute_metrics(data.test.groups, forget_groups=[FORGET_GROUP]),
        )
        callback = prepare_trainer(  # the MIU callback, placed ahead of the loggers
            trainer,
            forget_ds,
            val_dataset=as_trainer_dataset(data.val),  # the collapse guard's held-out data
            config=MIUConfig(
                forget_epochs=2,  # forget passes at the start of the first two epochs
                mi_weight=10.0,  # lambda of the MI calibration term
                mine_hidden=64,  # the critics' hidden width (512 in the paper)
                mine_warmup_iters=10 if quick else 30,
                mine_iters=5,
            ),
        )
        trainer.train()
        callback.remove()  # the model is left exactly as it was built: no hooks

        last = [h for h in trainer.state.log_history if "miu/calibration" in h][-1]
        evals = [h for h in trainer.state.log_history if "eval_miu/worst_group_acc" in h]
        print(
            f"MIU log (step {last['step']}): loss {last['loss']:.4f}, "
            f"calibration {last['miu/calibration']:.5f}; eval worst-group accuracy per epoch: "
            + ", ".join(f"{h['eval_miu/worst_group_acc']:.1f}" for h in evals)
        )

    # -- 3. the table ---------------------------------------------------------------------
    rows = {
        name: scores(m, data, forget)
        for name, m in (("original", original), ("plain fine-tune", plain), ("MIU", miu))
    }
    cols = [f"g{g}" for g in range(data.num_groups)] + ["test", "GA", "FA"]
    print(
        f"\nforget set: {len(forget)} of {int((data.train.groups == FORGET_GROUP).sum())} "
        f"samples of group {FORGET_GROUP} ({data.group_names[FORGET_GROUP]})"
    )
    print(f"{'model':16s}" + "".join(f"{c:>8s}" for c in cols))
    for name, row in rows.items():
        print(f"{name:16s}" + "".join(f"{row[c]:8.1f}" for c in cols))
    print(
        f"\n(test accuracy per group g0..g3, GA = test accuracy of group {FORGET_GROUP}, "
        f"FA = accuracy on the forgotten samples; {time.time() - start:.0f} s)"
    )


if __name__ == "__main__":
    main()
