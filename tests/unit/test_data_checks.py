"""What ``validate`` and the engine check before any work: groups vs labels, NaN inputs, taps.

* group ids must name their labels (g // S == y) and fit the model's classes;
* NaN/Inf inputs are a data error (``NonFiniteInputError``), found before any
  work for in-memory tensors and, for other data sets, when a loss turns NaN
  (instead of blaming the optimiser); NaN losses name the steps run before;
* a tap whose features do not have the tapped layer's width is found on the
  first forward, before any model update, naming the layer and ``feature_module=``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import miu_hooks.engine as engine_module
from miu_hooks import (
    FeatureModuleNotFoundError,
    GroupRangeError,
    GroupTensorDataset,
    MIUConfig,
    NonFiniteLossError,
    TrainConfig,
    attach,
    unlearn,
    validate,
)
from miu_hooks.errors import DataError

pytestmark = pytest.mark.unit

CFG = MIUConfig(epochs=2, forget_epochs=1, batch_size=8, mine_hidden=8, mine_warmup_iters=3,
                mine_iters=2, device="cpu", guard=False)  # fmt: skip
LOOP = TrainConfig(epochs=1, batch_size=8, device="cpu", guard=False)


def net(classes: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, classes))


def split(n: int = 48, seed: int = 0) -> tuple[GroupTensorDataset, GroupTensorDataset]:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 4, generator=gen), torch.randint(0, 2, (n,), generator=gen)
    g = 2 * y + torch.randint(0, 2, (n,), generator=gen)
    return GroupTensorDataset(x[8:], y[8:], g[8:]), GroupTensorDataset(x[:8], y[:8], g[:8])


class Items(Dataset):
    """A data set read item by item (no tensors the checks could scan up front)."""

    def __init__(self, ds: GroupTensorDataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        return self.ds[i]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# -- groups and labels ---------------------------------------------------------------------------
def test_a_group_id_that_contradicts_its_label_is_refused_before_any_work() -> None:
    retain, forget = split()
    x, y, g = forget.tensors
    y, g = y.clone(), g.clone()
    y[3], g[3] = 0, 3  # group 3 means y = 1 (g = s + 2y), but the label is 0
    bad = GroupTensorDataset(x, y, g)
    for method, cfg in (("miu", CFG), ("finetune", LOOP)):
        problems = validate(net(), retain, bad, cfg, method=method)
        assert [type(p) for p in problems] == [GroupRangeError]
        assert "forget set: 1 group id contradicts its label" in str(problems[0])
        assert "sample 3 has label 0 and group 3" in str(problems[0])
    model = net()
    before = _state(model)
    with pytest.raises(GroupRangeError, match="contradicts its label"):
        unlearn(model, retain, bad, config=CFG)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # Item by item (no labels attribute) the same check applies; S comes from the config.
    assert validate(net(), Items(retain), Items(bad), LOOP, method="finetune")
    s3 = GroupTensorDataset(forget.inputs, forget.labels, forget.labels * 3 + 2)
    r3 = GroupTensorDataset(retain.inputs, retain.labels, retain.labels * 3 + 2)
    assert validate(net(), r3, s3, LOOP.replace(num_sensitive=3), method="finetune") == []
    assert validate(net(), r3, s3, LOOP, method="finetune")  # S = 2 reads y = g // 2


def test_num_groups_and_labels_must_fit_the_models_classes() -> None:
    retain, forget = split()
    problems = validate(net(), retain, forget, LOOP, method="finetune", num_groups=8)
    assert [type(p) for p in problems] == [GroupRangeError]
    assert "num_groups=8 with S=2 means 4 classes" in str(problems[0])
    assert "the model gives 2 logits" in str(problems[0])
    assert validate(net(classes=4), retain, forget, LOOP, method="finetune", num_groups=8) == []
    # A 3-class data set on a 2-class model: the label is out of range (and so is its group).
    x, y, g = retain.tensors
    y3 = torch.where(torch.arange(len(y)) == 5, 2, y)
    g3 = torch.where(torch.arange(len(y)) == 5, 4, g)
    problems = validate(net(), GroupTensorDataset(x, y3, g3), forget, LOOP, method="finetune")
    assert any("label 2 is outside [0, 2)" in str(p) for p in problems)


# -- non-finite inputs ----------------------------------------------------------------------------
def test_nan_inputs_are_a_data_error_before_any_work() -> None:
    from miu_hooks import NonFiniteInputError

    retain, forget = split()
    x = retain.inputs.clone()
    x[17, 2] = float("nan")
    bad = GroupTensorDataset(x, retain.labels, retain.groups)
    problems = validate(net(), bad, forget, CFG)
    assert [type(p) for p in problems] == [NonFiniteInputError]
    assert isinstance(problems[0], DataError)
    assert "retain set: the inputs of sample 17 hold NaN or Inf" in str(problems[0])
    x = forget.inputs.clone()
    x[0, 0] = float("inf")
    with pytest.raises(NonFiniteInputError, match="forget set: the inputs of sample 0"):
        unlearn(net(), retain, GroupTensorDataset(x, forget.labels, forget.groups), config=LOOP,
                method="finetune")  # fmt: skip


@pytest.mark.parametrize(("method", "cfg"), [("miu", CFG), ("finetune", LOOP)])
def test_nan_inputs_read_item_by_item_are_blamed_on_the_data(method: str, cfg) -> None:
    from miu_hooks import NonFiniteInputError

    retain, forget = split()
    x = retain.inputs.clone()
    x[17, 2] = float("nan")
    bad = Items(GroupTensorDataset(x, retain.labels, retain.groups))
    with pytest.raises(NonFiniteInputError, match=r"hold NaN or Inf \(dataset positions 17") as e:
        unlearn(net(), bad, Items(forget), config=cfg, method=method)
    assert not isinstance(e.value, NonFiniteLossError)


def test_nan_loss_messages_count_the_steps_run_before(monkeypatch) -> None:
    retain, forget = split()  # 40 retain (5 batches), 8 forget (1 batch)
    calls = {"n": 0}
    ce = engine_module.checked_cross_entropy

    def nan_on_the_7th(logits, labels):
        calls["n"] += 1
        loss = ce(logits, labels)
        return loss * float("nan") if calls["n"] == 7 else loss

    monkeypatch.setattr(engine_module, "checked_cross_entropy", nan_on_the_7th)
    with pytest.raises(NonFiniteLossError) as e:
        unlearn(net(), retain, forget, config=CFG)
    # epoch 0: 3 tuning, 1 forget, 5 retain steps; epoch 1: 2 tuning, then retain #2
    assert "retain step at epoch 1 (finished before it: 5 critic-tuning, 1 forget and 6 " \
           "retain steps)" in str(e.value)  # fmt: skip
    calls["n"] = 0
    monkeypatch.setattr(
        "miu_hooks.methods.base.RunContext.logits",
        lambda self, batch, model=None: (model or self.model)(batch.inputs) * float("nan")
        if self.steps.get("retain", 0) == 3 else (model or self.model)(batch.inputs),
    )
    with pytest.raises(NonFiniteLossError, match=r"retain step 4 of the run; steps finished "
                       r"before it: 3 retain"):  # fmt: skip
        unlearn(net(), retain, forget, config=LOOP, method="finetune")


# -- the tap's feature width ----------------------------------------------------------------------
class Tokens(nn.Module):
    """A head applied per token: its input is [B, T, d], which flattens to T·d, not d."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 3 * 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x).view(-1, 3, 8)).mean(1)


def test_a_tap_of_the_wrong_width_is_found_on_the_first_forward_before_any_update() -> None:
    retain, forget = split()
    problems = validate(Tokens(), retain, forget, CFG)
    assert [type(p) for p in problems] == [FeatureModuleNotFoundError]
    assert "'head' flattens to 24 values" in str(problems[0])
    # attach() (the Trainer and Accelerate routes) finds it on the first forward of the run.
    model = Tokens()
    before = _state(model)
    handle = attach(model, CFG, num_groups=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = torch.utils.data.DataLoader(TensorDataset(*forget.tensors), batch_size=8)
    with pytest.raises(FeatureModuleNotFoundError, match=r"'head' flattens to 24 values .*"
                       r"feature_module="):  # fmt: skip
        handle.epoch_start(0, optimizer=opt, forget_loader=loader, tune_loader=loader)
    handle.remove()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# -- messages -------------------------------------------------------------------------------------
class Dicts(Dataset):
    def __init__(self, ds: GroupTensorDataset, label: str) -> None:
        self.ds, self.label = ds, label

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        x, y, g = self.ds[i]
        return {"x": x, self.label: y, "group": g}


def test_a_missing_label_column_lists_the_data_columns_only() -> None:
    from miu_hooks.data import IndexedDataset, split_batch

    retain, forget = split()
    with pytest.raises(DataError, match="no label column") as e:
        unlearn(net(), Dicts(retain, "target"), Dicts(forget, "target"), config=LOOP,
                method="finetune")  # fmt: skip
    assert "'target'" in str(e.value) and "__index__" not in str(e.value)
    batch = torch.utils.data.default_collate([IndexedDataset(Dicts(retain, "target"))[0]])
    with pytest.raises(DataError, match=r"columns are \['group', 'target', 'x'\]") as e:
        split_batch(batch)
    assert "__index__" not in str(e.value)


def test_evaluate_refuses_a_model_as_reference() -> None:
    from miu_hooks import ConfigTypeError, evaluate

    retain, forget = split()
    with pytest.raises(ConfigTypeError, match="reference must be the Report of a reference model"):
        evaluate(net(), retain=retain, forget=forget, test=retain, reference=net())
