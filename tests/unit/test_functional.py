import math

import pytest
import torch

from miu_hooks import (
    EmptyGroupError,
    GroupRangeError,
    calibration_loss,
    dv_bound,
    ema_log_mean_exp,
    group_index,
    group_weights,
    log_mean_exp,
)

pytestmark = pytest.mark.unit


def test_group_index_matches_formula():
    y = torch.tensor([0, 1, 2, 2, 1])
    s = torch.tensor([2, 0, 1, 2, 1])
    assert group_index(y, s, 3).tolist() == [2, 3, 7, 8, 4]


@pytest.mark.parametrize(
    ("y", "s", "msg"),
    [([0, -1], [0, 0], "labels must be >= 0"), ([0, 1], [0, 2], "outside [0, 2)")],
)
def test_group_index_rejects_out_of_range(y, s, msg):
    with pytest.raises(GroupRangeError, match=msg.replace("[", r"\[").replace(")", r"\)")):
        group_index(torch.tensor(y), torch.tensor(s), 2)


def test_group_weights_hand_computation():
    # D: group 0 x4, group 1 x2, group 2 x6, group 3 absent everywhere.
    train = torch.tensor([0] * 4 + [1] * 2 + [2] * 6)
    # D_r: forget 3 of group 2 and 1 of group 0.
    retain = torch.tensor([0] * 3 + [1] * 2 + [2] * 3)
    w = group_weights(train, retain, num_groups=4)
    assert w.dtype == torch.float32
    assert w.tolist() == pytest.approx([4 / 3, 1.0, 2.0, 1.0])


def test_group_weights_reproduce_training_mixture():
    gen = torch.Generator().manual_seed(0)
    train = torch.randint(0, 5, (1000,), generator=gen)
    keep = torch.rand(1000, generator=gen) > (train == 3).float() * 0.9
    retain = train[keep]
    w = group_weights(train, retain, 5)
    mass = torch.bincount(retain, minlength=5).double() * w.double()
    p_train = torch.bincount(train, minlength=5).double() / 1000
    assert torch.allclose(mass / mass.sum(), p_train, atol=1e-12)


def test_group_weights_emptied_group_is_named():
    with pytest.raises(EmptyGroupError, match="group 2 has 3 training samples"):
        group_weights(torch.tensor([0, 1, 2, 2, 2]), torch.tensor([0, 1]))


def test_group_weights_retain_not_subset():
    with pytest.raises(GroupRangeError, match="more retain samples"):
        group_weights(torch.tensor([0, 1]), torch.tensor([0, 0, 1]))


def test_log_mean_exp_matches_naive():
    s = torch.randn(50, dtype=torch.float64)
    assert float(log_mean_exp(s)) == pytest.approx(math.log(float(s.exp().mean())), rel=1e-5)


def test_log_mean_exp_is_stable_for_large_scores():
    s = torch.full((8,), 1000.0)
    assert float(log_mean_exp(s)) == pytest.approx(1000.0)


def test_dv_bound_value():
    joint = torch.tensor([1.0, 2.0, 3.0])
    marginal = torch.tensor([0.0, 1.0, 2.0])
    expected = 2.0 - math.log((1 + math.e + math.e**2) / 3)
    assert float(dv_bound(joint, marginal)) == pytest.approx(expected, rel=1e-6)


def test_ema_log_mean_exp_value_and_corrected_gradient():
    s = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)
    log_m = torch.tensor(0.3)
    out = ema_log_mean_exp(s, log_m)
    assert float(out.detach()) == pytest.approx(float(log_mean_exp(s.detach())), rel=1e-6)
    out.backward()
    expected = s.detach().exp() / (3 * math.exp(0.3))
    assert torch.allclose(s.grad, expected, rtol=1e-6)


def test_calibration_loss_stops_gradient_into_original():
    mi_u = torch.tensor(0.7, requires_grad=True)
    mi_o = torch.tensor(0.2, requires_grad=True)
    calibration_loss(mi_u, mi_o).backward()
    assert float(mi_u.grad) == pytest.approx(2 * 0.5)
    assert mi_o.grad is None
