"""Group-robust unlearning of a text classifier with an ordinary Hugging Face ``Trainer``.

The data are short reviews made in code (no download), tokenized by a
word-level tokenizer into a ``datasets.Dataset``. The label y is the review's
sentiment; each of its three sentiment words is positive with probability 0.75
when y = 1 and 0.25 when y = 0. The sensitive attribute s is a token: the
review is about a ``film`` (s = 0) or a ``book`` (s = 1), and the topic agrees
with y 80% of the time (books are mostly praised). Groups are g = s + 2·y:

    0: y=0 film   1: y=0 book (minority)   2: y=1 film (minority)   3: y=1 book

Steps, all on CPU in well under a minute (a 2-layer BERT with hidden size 32):

1. train an "original" classifier on the full training set D with a plain ``Trainer``;
2. forget 90% of group 2 (praised films) in two ways, both from the original and
   on the retain set D_r = D minus D_f, with dynamic padding
   (``DataCollatorWithPadding``):
   * plain fine-tuning: the same ``Trainer`` with nothing added;
   * MIU: the same ``Trainer``, with ``prepare_trainer(trainer, D_f)`` added;
3. print per-group test accuracy, the forget-group accuracy GA and the accuracy
   on the forgotten samples FA for the three models.

The features MIU reads are the input of ``classifier``, the pooled [CLS]
representation (a RoBERTa or ELECTRA model would be tapped at
``classifier.out_proj`` the same way).

Run::

    python examples/hf_trainer_text.py            # full run (about 30 s on 2 cores)
    python examples/hf_trainer_text.py --quick    # shortened (used by the test suite)

``MIU_EXAMPLE_QUICK=1`` in the environment has the same effect as ``--quick``.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import tempfile
import time

import datasets
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

from miu_hooks.config import MIUConfig
from miu_hooks.integrations.hf import make_compute_metrics, prepare_trainer
from miu_hooks.metrics import accuracy, per_group_accuracy

FORGET_GROUP = 2  # y = 1 about a film: a minority group
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
TOPICS = ["film", "book"]  # the token attribute s
POSITIVE = ["good", "great", "fun", "fine", "smart", "warm"]
NEGATIVE = ["bad", "dull", "poor", "weak", "slow", "flat"]
FILLER = ["the", "a", "was", "is", "very", "plot", "story", "it", "and", "quite", "this",
          "one", "so", "my", "end", "start"]  # fmt: skip
WORDS = SPECIAL + TOPICS + POSITIVE + NEGATIVE + FILLER


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``WORDS``: ``[CLS] words [SEP]``, pad id 0."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", model_max_length=16,
    )  # fmt: skip


def reviews(n: int, seed: int, agree: float = 0.8, cue: float = 0.75) -> dict[str, list]:
    """``n`` reviews: columns text, label, group, id (see the module docstring).

    Each of the three sentiment words is positive with probability ``cue`` when
    y = 1 and ``1 - cue`` when y = 0, so the words predict y only in part.
    """
    rng = random.Random(seed)
    rows: dict[str, list] = {"text": [], "label": [], "group": [], "id": []}
    for i in range(n):
        y = i % 2
        s = y if rng.random() < agree else 1 - y
        p = cue if y else 1 - cue
        words = [rng.choice(POSITIVE if rng.random() < p else NEGATIVE) for _ in range(3)]
        words += rng.sample(FILLER, rng.randint(2, 8))
        rng.shuffle(words)
        rows["text"].append(" ".join([TOPICS[s], *words]))
        rows["label"].append(y)
        rows["group"].append(s + 2 * y)
        rows["id"].append(i)
    return rows


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    """A 2-layer BERT, hidden size 32, random initialisation."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16, num_labels=2, pad_token_id=0,
    )  # fmt: skip
    return BertForSequenceClassification(config)


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
        disable_tqdm=True,
        **{"logging_strategy": "no", **extra},  # type: ignore[arg-type]
    )


@torch.no_grad()
def scores(model: torch.nn.Module, test, forget, collate) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Test accuracy per group, GA (forget group's test accuracy) and FA (accuracy on D_f)."""
    model.eval()

    def run(data):  # type: ignore[no-untyped-def]
        batch = collate([dict(r) for r in data])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return logits.logits, batch["labels"], batch["group"]

    logits, y, g = run(test)
    per_group = per_group_accuracy(logits, y, g, 4)
    out = {f"g{k}": acc for k, acc in per_group.items() if acc is not None}
    out["test"] = accuracy(logits, y)
    out["GA"] = out[f"g{FORGET_GROUP}"]
    f_logits, f_y, _ = run(forget)
    out["FA"] = accuracy(f_logits, f_y)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shortened run (for tests)")
    parser.add_argument("--out", default=None, help="Trainer output folder (default: a temp dir)")
    cli = parser.parse_args()
    quick = cli.quick or os.environ.get("MIU_EXAMPLE_QUICK", "") not in ("", "0")
    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    torch.set_num_threads(1)  # a model this small runs fastest on one CPU thread
    start = time.time()

    # -- data: tokenized reviews with a group column; D_f = 90% of group 2 -----------------
    tokenizer = make_tokenizer()
    collate = DataCollatorWithPadding(tokenizer)  # pads each batch to its longest review

    def tokenized(n: int, seed: int) -> datasets.Dataset:
        raw = datasets.Dataset.from_dict(reviews(n, seed))
        return raw.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])

    train, test = tokenized(2000, 0), tokenized(1000, 1)
    in_group = [i for i, g in enumerate(train["group"]) if g == FORGET_GROUP]
    forget_rows = set(random.Random(0).sample(in_group, int(0.9 * len(in_group))))
    forget = train.select(sorted(forget_rows))
    retain = train.select([i for i in range(len(train)) if i not in forget_rows])

    with tempfile.TemporaryDirectory() as tmp:
        out = cli.out or tmp

        # -- 1. the original model: an ordinary Trainer run on all of D --------------------
        original = tiny_bert()
        Trainer(
            model=original,
            args=training_args(os.path.join(out, "original"), 10 if quick else 20, 3e-3),
            train_dataset=train,
            data_collator=collate,
        ).train()

        epochs = 3
        # -- 2a. plain fine-tuning on the retain set ------------------------------------
        plain = copy.deepcopy(original)
        Trainer(
            model=plain,
            args=training_args(os.path.join(out, "plain"), epochs, 3e-3),
            train_dataset=retain,
            data_collator=collate,
        ).train()

        # -- 2b. MIU: the same Trainer, plus one line ---------------------------------------
        miu = copy.deepcopy(original)
        trainer = Trainer(
            model=miu,
            args=training_args(
                os.path.join(out, "miu"),
                epochs,
                3e-3,
                eval_strategy="epoch",
                logging_strategy="steps",
                logging_steps=10,
                remove_unused_columns=False,  # keep the "group" column
            ),
            train_dataset=retain,
            eval_dataset=test,
            data_collator=collate,
            compute_metrics=make_compute_metrics(test, forget_groups=[FORGET_GROUP]),
        )
        callback = prepare_trainer(  # the MIU callback, placed ahead of the loggers
            trainer,
            forget,
            config=MIUConfig(
                forget_epochs=2,
                mi_weight=10.0,
                mine_hidden=64,
                mine_warmup_iters=10 if quick else 30,
                mine_iters=5,
            ),
        )
        trainer.train()
        print(f"MIU taps the input of {callback.handle.tap.name!r}")
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
        name: scores(m, test, forget, collate)
        for name, m in (("original", original), ("plain fine-tune", plain), ("MIU", miu))
    }
    cols = [f"g{g}" for g in range(4)] + ["test", "GA", "FA"]
    print(
        f"\nforget set: {len(forget)} of {len(in_group)} reviews of group {FORGET_GROUP} "
        "(y=1, film)"
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
