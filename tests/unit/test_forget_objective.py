"""MIU's bounded forget objective, checked against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from toy_problem import toy_net, toy_split

from miu_hooks import ConfigError, MIUConfig, attach, forget_objective
from miu_hooks.data import split_batch
from miu_hooks.functional import dv_bound

pytestmark = pytest.mark.unit


def test_floor_smile_and_dv_by_hand():
    joint = torch.tensor([1.0, 3.0])
    marginal = torch.tensor([0.0, math.log(3.0)])
    # DV = mean(joint) - log(mean(exp(marginal))) = 2 - log((1 + 3) / 2) = 2 - log 2
    mi = dv_bound(joint, marginal)
    assert float(mi) == pytest.approx(2.0 - math.log(2.0))
    assert float(forget_objective(joint, marginal, mi)) == pytest.approx(2.0 - math.log(2.0))
    low = dv_bound(-joint, marginal)  # -2 - log 2 < 0: no information left to remove
    assert float(forget_objective(-joint, marginal, low)) == 0.0
    assert float(forget_objective(-joint, marginal, low, "dv")) == pytest.approx(-2 - math.log(2))
    # SMILE clips the marginal scores to [-tau, tau] inside the log-mean-exp, then floors:
    # 2 - log((e^5 + e^0) / 2) < 0 -> 0;  with tau = 0.5: 2 - log((e^0.5 + e^0) / 2).
    big = torch.tensor([10.0, 0.0])
    assert float(forget_objective(joint, big, dv_bound(joint, big), "smile")) == 0.0
    expected = 2.0 - math.log((math.exp(0.5) + 1.0) / 2.0)
    got = forget_objective(joint, big, dv_bound(joint, big), "smile", tau=0.5)
    assert float(got) == pytest.approx(expected)
    with pytest.raises(ConfigError, match="floor, smile or dv"):
        forget_objective(joint, marginal, mi, "nope")


def test_the_floor_passes_no_gradient_below_zero():
    joint = torch.tensor([-1.0, -1.0], requires_grad=True)
    marginal = torch.tensor([0.0, 0.0], requires_grad=True)
    forget_objective(joint, marginal, dv_bound(joint, marginal)).backward()
    assert joint.grad is not None and torch.equal(joint.grad, torch.zeros(2))
    joint2 = torch.tensor([2.0, 2.0], requires_grad=True)
    forget_objective(joint2, marginal, dv_bound(joint2, marginal)).backward()
    assert torch.allclose(joint2.grad, torch.full((2,), 0.5))  # d mean / d joint_i


@pytest.mark.parametrize("kind", ["floor", "dv"])
def test_engine_forget_loss_is_the_objective_of_the_critic_scores(kind):
    _, _, forget = toy_split()
    model = toy_net()
    cfg = MIUConfig(device="cpu", mine_hidden=8, forget_objective=kind, seed=3)
    with attach(model, cfg, num_groups=4) as handle:
        batch = split_batch(next(iter(torch.utils.data.DataLoader(forget, batch_size=16))))
        model(batch.inputs)
        z = handle.tap.pop()
        state = handle.generator.get_state()
        marginal = torch.randint(0, 4, (len(batch),), generator=handle.generator)
        handle.generator.set_state(state)  # forget_loss draws the same marginal groups
        crit = handle.critic_model
        assert crit is not None
        with torch.no_grad():
            joint_s = crit.scores(z, batch.groups)
            marg_s = crit.scores(z, marginal)
        by_hand = float(joint_s.mean()) - math.log(float(torch.exp(marg_s).mean()))
        loss = handle.forget_loss(z, batch.groups)
        want = max(by_hand, 0.0) if kind == "floor" else by_hand
        assert float(loss.detach()) == pytest.approx(want, abs=1e-5)
        assert handle.pop_logs()["miu/forget_mi"] == pytest.approx(by_hand, abs=1e-5)
