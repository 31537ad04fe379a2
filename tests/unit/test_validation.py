"""validate(): every problem at once, before any work; unlearn raises the first of them."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset
from toy_problem import toy_net, toy_split

from miu_hooks import (
    ConfigError,
    DataError,
    EmptyForgetSetError,
    EmptyGroupError,
    FeatureModuleNotFoundError,
    GroupRangeError,
    InputMismatchError,
    MIUConfig,
    ModelError,
    NoClassifierOutputError,
    TrainConfig,
    unlearn,
    validate,
)

pytestmark = pytest.mark.unit

CFG = MIUConfig(epochs=1, batch_size=16, mine_hidden=8, mine_warmup_iters=2, mine_iters=1,
                device="cpu")  # fmt: skip


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_a_valid_run_has_no_problem_and_nothing_changes():
    _, retain, forget = toy_split()
    model = toy_net(bn=True).train()
    before, rng = _params(model), torch.get_rng_state()
    assert validate(model, retain, forget, CFG, num_groups=4) == []
    assert validate(model, retain, forget, TrainConfig(), method="finetune") == []
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == 0


def test_several_problems_are_reported_at_once():
    full, retain, _ = toy_split()
    x, y, g = full.tensors
    # group 1 entirely forgotten, plus a forget sample with group 7 (outside [0, 4))
    m = g == 1
    forget = TensorDataset(torch.cat([x[m], x[:1]]), torch.cat([y[m], y[:1]]),
                           torch.cat([g[m], torch.tensor([7])]))  # fmt: skip
    retain = TensorDataset(x[~m], y[~m], g[~m])
    problems = validate(toy_net(), retain, forget, TrainConfig(reweight=True), method="finetune",
                        num_groups=4, feature_module="nope")  # fmt: skip
    assert [type(p) for p in problems] == [ConfigError, GroupRangeError, EmptyGroupError]
    assert "group id 7 is outside [0, 4)" in str(problems[1])
    assert "group 1 has" in str(problems[2])
    # MIU also taps the head: a missing feature module is one more problem.
    problems = validate(toy_net(), retain, forget, CFG, num_groups=4, feature_module="nope")
    assert [type(p) for p in problems] == [
        GroupRangeError, EmptyGroupError, FeatureModuleNotFoundError
    ]  # fmt: skip


def test_unlearn_raises_the_first_problem_with_the_others_named():
    full, retain, _ = toy_split()
    x, y, g = full.tensors
    m = g == 1
    forget = TensorDataset(torch.cat([x[m], x[:1]]), torch.cat([y[m], y[:1]]),
                           torch.cat([g[m], torch.tensor([7])]))  # fmt: skip
    retain = TensorDataset(x[~m], y[~m], g[~m])
    model = toy_net()
    before = _params(model)
    with pytest.raises(
        ConfigError,
        match=r"runs without REWEIGHT.*\(and 2 more problems: GroupRangeError: "
        r"group id 7 .*; EmptyGroupError: group 1 has",
    ) as info:
        unlearn(model, retain, forget, config=TrainConfig(reweight=True), method="finetune",
                num_groups=4)  # fmt: skip
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_empty_sets_and_bad_num_groups():
    _, retain, forget = toy_split()
    empty = TensorDataset(torch.zeros(0, 5), torch.zeros(0).long(), torch.zeros(0).long())
    problems = validate(toy_net(), empty, empty, TrainConfig(), method="finetune")
    assert [type(p) for p in problems] == [EmptyForgetSetError, DataError]
    problems = validate(toy_net(), retain, forget, CFG, num_groups=0)
    assert [type(p) for p in problems] == [ConfigError]


def test_a_feature_tap_of_the_wrong_shape_is_found_before_any_training():
    class Tokens(nn.Module):  # the "head" sees [B, 3, 4] tokens, flattened to 12 values
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(5, 12)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.embed(x).reshape(-1, 3, 4)).mean(1)

    _, retain, forget = toy_split()
    problems = validate(Tokens(), retain, forget, CFG, num_groups=4)
    assert len(problems) == 1 and isinstance(problems[0], FeatureModuleNotFoundError)
    assert "'head'" in str(problems[0]) and "feature_module=" in str(problems[0])
    model = Tokens()
    before = _params(model)
    with pytest.raises(FeatureModuleNotFoundError, match="flattens to 12 values"):
        unlearn(model, retain, forget, config=CFG, num_groups=4)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_head_the_forward_never_calls_is_reported():
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.unused = toy_net(), nn.Linear(12, 2)

        def forward(self, x):
            return self.net(x)

    model = WithSpare()
    _, retain, forget = toy_split()
    problems = validate(model, retain, forget, CFG, num_groups=4, feature_module="unused")
    assert len(problems) == 1 and "not called by the model's forward" in str(problems[0])


def test_output_and_forward_failures_are_model_problems():
    class NoLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 2)

        def forward(self, x):
            return {"scores": self.fc(x)}

    _, retain, forget = toy_split()
    problems = validate(NoLogits(), retain, forget, TrainConfig(), method="finetune")
    assert [type(p) for p in problems] == [NoClassifierOutputError]
    # A forward that fails on the data: the inputs do not fit the model (still a ModelError).
    problems = validate(nn.Linear(7, 2), retain, forget, TrainConfig(), method="finetune")
    assert [type(p) for p in problems] == [InputMismatchError]
    assert isinstance(problems[0], ModelError) and isinstance(problems[0], DataError)
    assert "forward fails on one retain sample (inputs of shape [5])" in str(problems[0])
