"""The evaluation path is untouched, and ``make_compute_metrics`` gives the group metrics.

Evaluations run *during* training (``eval_strategy="steps"``), while the loss
hook and the taps are attached: each must give exactly the loss and predictions
of a hook-free copy of the model, add no MI term, and leave the estimators (their
weights, EMA buffers, marginal generator and counters) and the pending logs as
they were.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, ViTConfig
from transformers import ViTForImageClassification as ViT

from miu_hooks.config import MIUConfig
from miu_hooks.data import GroupTensorDataset
from miu_hooks.errors import DataError
from miu_hooks.integrations.hf import MIUCallback, as_trainer_dataset, make_compute_metrics
from miu_hooks.metrics import equalized_odds, forget_group_accuracy, per_group_accuracy
from miu_hooks.original import copy_frozen

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]


def sets():
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (72,), generator=gen)
    g = y * 2 + torch.randint(0, 2, (72,), generator=gen)
    x = torch.randn(72, 3, 8, 8, generator=gen)
    part = lambda a, b: GroupTensorDataset(x[a:b], y[a:b], g[a:b])  # noqa: E731
    return part(16, 56), part(0, 16), part(56, 72)


class Probe(TrainerCallback):
    """Snapshots MIU and the model at each step end; checks each evaluation against them."""

    def __init__(self, callback, test):
        self.callback, self.test, self.checked = callback, test, 0

    def on_step_end(self, args, state, control, model=None, **kw):
        handle = self.callback.handle
        self.state = {k: v.clone() for k, v in handle.state_dict().items()}
        self.logs = dict(handle.log_counts)
        self.terms = self.callback.hooks.terms_added
        self.clean = copy_frozen(model)  # same weights, no hooks

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        handle = self.callback.handle
        after = handle.state_dict()
        assert after.keys() == self.state.keys()
        assert all(torch.equal(after[k], self.state[k]) for k in after)
        assert dict(handle.log_counts) == self.logs
        assert self.callback.hooks.terms_added == self.terms
        with torch.no_grad():
            out = self.clean(pixel_values=self.test.inputs, labels=self.test.labels)
        assert metrics["eval_loss"] == pytest.approx(float(out.loss), rel=1e-5)
        groups = self.test.groups
        expected = per_group_accuracy(out.logits, self.test.labels, groups, 4)
        for g, acc in expected.items():
            assert metrics[f"eval_miu/group_{g}_acc"] == pytest.approx(acc)
        assert metrics["eval_miu/worst_group_acc"] == pytest.approx(min(expected.values()))
        assert metrics["eval_miu/forget_group_acc"] == pytest.approx(
            forget_group_accuracy(out.logits, self.test.labels, groups, [3])
        )
        assert metrics["eval_miu/eo"] == pytest.approx(
            equalized_odds(out.logits, self.test.labels, groups, [3])
        )
        self.checked += 1


def test_evaluation_during_training_is_untouched(tmp_path):
    retain, forget, test = sets()
    torch.manual_seed(0)
    model = ViT(
        ViTConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=8,
            patch_size=4,
            num_labels=2,
        )
    )
    callback = MIUCallback(
        as_trainer_dataset(forget),
        config=MIUConfig(
            forget_epochs=1, mi_weight=5.0, mine_hidden=8, mine_warmup_iters=3, mine_iters=1
        ),
    )
    probe = Probe(callback, test)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=2,
        per_device_train_batch_size=8,
        eval_strategy="steps",
        eval_steps=2,
        per_device_eval_batch_size=5,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_strategy="no",
        remove_unused_columns=False,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=as_trainer_dataset(retain),
        eval_dataset=as_trainer_dataset(test),
        callbacks=[callback, probe],
        compute_metrics=make_compute_metrics(test.groups, forget_groups=[3]),
    )
    trainer.train()
    assert probe.checked == 5  # steps 2, 4, 6, 8, 10
    # predict() with the group column still present (the column hook drops it)
    preds = trainer.predict(as_trainer_dataset(test)).predictions
    with torch.no_grad():
        logits = copy_frozen(model)(pixel_values=test.inputs).logits
    assert np.allclose(preds, logits.numpy(), atol=1e-6)
    callback.remove()


def test_compute_metrics_checks_the_group_count():
    fn = make_compute_metrics([0, 1, 2, 3], forget_groups=[3])
    with pytest.raises(DataError, match="eval_groups has 4 entries"):
        fn((np.zeros((3, 2)), np.zeros(3)))
    out = fn(((np.eye(2)[[0, 1, 1, 1]], None), np.array([0, 1, 1, 1])))  # tuple predictions
    assert out["miu/accuracy"] == 100.0 and out["miu/eo"] == 0.0


def test_compute_metrics_reads_the_groups_of_a_datasets_table():
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict(
        {"pixel_values": [[0.0]] * 4, "labels": [0, 0, 1, 1], "group": [0, 1, 2, 3]}
    )
    fn = make_compute_metrics(table, forget_groups=[3])
    # Predictions 0, 0, 1, 0: groups 0-2 right, group 3 (y=1, s=1) wrong.
    out = fn((np.array([[1.0, 0], [1, 0], [0, 1], [1, 0]]), np.array([0, 0, 1, 1])))
    assert out["miu/accuracy"] == 75.0 and out["miu/forget_group_acc"] == 0.0
    assert [out[f"miu/group_{g}_acc"] for g in range(4)] == [100.0, 100.0, 100.0, 0.0]
    # EO over y: TPR gap on y=1 is 100 (group 2) vs 0 (group 3), on y=0 0 → mean 50.
    assert out["miu/eo"] == 50.0
    renamed = table.rename_column("group", "g")
    assert (
        make_compute_metrics(renamed, group_key="g")(
            (np.eye(2)[[0, 0, 1, 1]], np.array([0, 0, 1, 1]))
        )["miu/worst_group_acc"]
        == 100.0
    )
    with pytest.raises(DataError, match="no group column 'group'"):
        make_compute_metrics(renamed)
