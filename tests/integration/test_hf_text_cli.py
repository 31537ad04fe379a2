"""``miu-unlearn`` on tokenized text: a ``datasets`` folder of token ids and an HF model folder.

The data folder holds ``input_ids``, ``attention_mask``, ``label``, ``group`` and
``id`` of sentences of varying length; the model is a tiny RoBERTa (composite
head). The run's reported accuracies are recomputed by hand from the saved
models' logits on the unpadded sentences.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from text_data import build, tokenized
from transformers import AutoModelForSequenceClassification

from miu_hooks.cli import cli
from miu_hooks.cli.data_index import is_text, read_data_index
from miu_hooks.cli.text import TokenDataset

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_cli")
    train = tokenized(64, seed=0)
    train.save_to_disk(str(root / "train"))
    tokenized(32, seed=1).save_to_disk(str(root / "test"))
    build("roberta").save_pretrained(str(root / "model"))
    forget = [r["id"] for r in train if r["group"] == 2][:3]
    (root / "forget.csv").write_text("id\n" + "\n".join(map(str, forget)) + "\n")
    cfg = {"mine_hidden": 16, "mine_warmup_iters": 5, "mine_iters": 2}
    (root / "cfg.json").write_text(json.dumps(cfg))
    return root


def run_cli(workspace, model: str, out: str, *extra: str):
    """``miu-unlearn`` on the workspace's text for one epoch; returns the output folder.

    ``--config`` values in ``extra`` name files of the workspace.
    """
    extra = tuple(str(workspace / e) if e.endswith(".json") else e for e in extra)
    args = ["-m", str(workspace / model), "-d", str(workspace / "train"),
            "-f", str(workspace / "forget.csv"), "--test", str(workspace / "test"),
            "-o", str(workspace / out), "--epochs", "1", "--json", *extra]  # fmt: skip
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output[-2000:]
    return workspace / out


def accuracy_by_hand(model, rows) -> float:
    """Accuracy of ``model`` on each sentence run alone, unpadded."""
    model.eval()
    hits = []
    with torch.no_grad():
        for r in rows:
            logits = model(input_ids=torch.tensor([r["input_ids"]])).logits
            hits.append(int(logits.argmax(-1)) == r["label"])
    return 100.0 * float(np.mean(hits))


def test_token_dataset_pads_to_the_longest_sentence(workspace):
    index = read_data_index(workspace / "train")
    assert index.keys["input"] == "input_ids" and is_text(index)
    data = TokenDataset(index, pad_id=0)
    lengths = [len(r["input_ids"]) for r in index.handle]
    assert data.length == max(lengths) and min(lengths) < data.length
    model = AutoModelForSequenceClassification.from_pretrained(str(workspace / "model")).eval()
    short = int(np.argmin(lengths))
    inputs, label, group = data[short]
    n = lengths[short]
    assert inputs["input_ids"][n:].eq(0).all() and inputs["attention_mask"].sum() == n
    assert int(label) == index.labels[short] and int(group) == index.groups[short]
    with torch.no_grad():  # padding and its mask leave the logits as they were
        padded = model(**{k: v[None] for k, v in inputs.items()}).logits
        alone = model(input_ids=inputs["input_ids"][None, :n]).logits
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)
    # Without an attention_mask column the mask is built: ones over the tokens.
    bare = dataclasses.replace(index, handle=index.handle.remove_columns(["attention_mask"]))
    assert all(torch.equal(a, b) for a, b in zip(TokenDataset(bare)[short][0].values(),
                                                 inputs.values()))  # fmt: skip


def test_cli_unlearns_a_text_classifier(workspace):
    out = run_cli(workspace, "model", "out", "--batch-size", "16", "--config", "cfg.json")
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "miu" and report["forgotten"] == 3
    assert {"model.safetensors", "config.json", "report.md"} <= {p.name for p in out.iterdir()}

    import datasets

    test = datasets.load_from_disk(str(workspace / "test"))
    before = AutoModelForSequenceClassification.from_pretrained(str(workspace / "model"))
    after = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters()))
    models = report["models"]
    assert models["original"]["TA"] == pytest.approx(accuracy_by_hand(before, test))
    assert models["unlearned"]["TA"] == pytest.approx(accuracy_by_hand(after, test))
    assert sum(models["unlearned"]["counts"]["forget"].values()) == 3


def test_cli_unlearns_a_decoder_classifier(workspace):
    """A GPT-2 classifier (logits pooled at the last real token) through the same command."""
    build("gpt2").save_pretrained(str(workspace / "gpt2"))
    out = run_cli(workspace, "gpt2", "out_gpt2", "--batch-size", "16", "--config", "cfg.json")
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "miu" and report["forgotten"] == 3

    import datasets

    test = datasets.load_from_disk(str(workspace / "test"))
    before = AutoModelForSequenceClassification.from_pretrained(str(workspace / "gpt2"))
    after = AutoModelForSequenceClassification.from_pretrained(str(out))
    assert type(after).__name__ == "GPT2ForSequenceClassification"
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters()))
    # Reported on padded batches, recomputed here on each sentence alone.
    assert report["models"]["unlearned"]["TA"] == pytest.approx(accuracy_by_hand(after, test))


def test_cli_pads_each_batch_to_its_longest_sentence(workspace, monkeypatch):
    """Every loader of the command (checks, training, evaluation) trims its batches."""
    from miu_hooks.cli.text import TrimPadding

    lengths: list[int] = []
    trim = TrimPadding.__call__

    def recording(self, items):
        batch = trim(self, items)
        lengths.append(int(batch[0]["input_ids"].shape[1]))
        return batch

    monkeypatch.setattr(TrimPadding, "__call__", recording)
    run_cli(workspace, "model", "out_trim", "--batch-size", "4", "--method", "finetune")
    set_lengths = [max(len(ids) for ids in read_data_index(workspace / name).handle["input_ids"])
                   for name in ("train", "test")]  # fmt: skip
    # Without trimming every batch would be as long as its set's longest sentence.
    assert lengths and max(lengths) <= max(set_lengths) and min(lengths) < min(set_lengths)
