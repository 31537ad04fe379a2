"""MINE's adaptive gradient clipping of the retain step (``MIUConfig.clip="adaptive"``)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from toy_problem import toy_net, toy_split

from miu_hooks import MIUConfig, attach, unlearn
from miu_hooks.clipping import adaptive_calibration_scale
from miu_hooks.data import split_batch
from miu_hooks.runtime import LocalRuntime

pytestmark = pytest.mark.unit

CFG = MIUConfig(
    epochs=2,
    forget_epochs=1,
    batch_size=16,
    mine_hidden=16,
    mine_warmup_iters=6,
    mine_iters=2,
    lr=0.05,
    mi_weight=20.0,
    device="cpu",
    # Independently drawn critics disagree from the start, so the calibration term
    # is non-zero on the first retain batch and the rule has something to scale.
    critic_init="independent",
)


def _linear_problem(weight: float):
    """A linear classifier with CE and cal = weight·(mean logit_0 − 1)², gradients by hand."""
    torch.manual_seed(0)
    lin = nn.Linear(3, 2)
    x = torch.randn(6, 3)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    logits = lin(x)
    ce = F.cross_entropy(logits, y)
    u = logits[:, 0].mean()
    cal = weight * (u - 1.0) ** 2
    with torch.no_grad():
        delta = (logits.softmax(-1) - F.one_hot(y, 2).float()) / len(y)
        g_ce = torch.cat([(delta.T @ x).reshape(-1), delta.sum(0)])
        d_u = 2 * weight * (u - 1.0)
        g_w = torch.zeros(2, 3)
        g_w[0] = d_u * x.mean(0)
        g_b = torch.tensor([float(d_u), 0.0])
        g_cal = torch.cat([g_w.reshape(-1), g_b])
    return lin, ce, cal, g_ce, g_cal


def _grad(module: nn.Module) -> torch.Tensor:
    return torch.cat([module.weight.grad.reshape(-1), module.bias.grad.reshape(-1)])


@pytest.mark.parametrize(("weight", "clipped"), [(50.0, True), (1e-3, False)])
def test_combined_gradient_is_mines_rule(weight, clipped):
    lin, ce, cal, g_ce, g_cal = _linear_problem(weight)
    s = adaptive_calibration_scale(ce, cal, lin.parameters())
    ratio = float(g_ce.norm() / g_cal.norm())
    assert (ratio < 1) == clipped  # both branches of min(1, ratio) are exercised
    assert s.dtype == torch.float32 and not s.requires_grad
    assert float(s) == pytest.approx(min(1.0, ratio), rel=1e-5)
    (ce + s * cal).backward()  # the graph was kept for the caller's backward
    expected = g_ce + min(1.0, ratio) * g_cal
    torch.testing.assert_close(_grad(lin), expected, rtol=1e-5, atol=1e-7)


def test_scale_is_one_when_the_calibration_gradient_is_zero():
    lin, ce, _, _, _ = _linear_problem(1.0)
    zero_grad_cal = 0.0 * lin(torch.ones(1, 3)).sum()
    assert float(adaptive_calibration_scale(ce, zero_grad_cal, lin.parameters())) == 1.0
    constant = torch.tensor(3.0)  # no graph at all
    assert float(adaptive_calibration_scale(ce, constant, lin.parameters())) == 1.0
    frozen = [p.requires_grad_(False) for p in lin.parameters()]
    assert float(adaptive_calibration_scale(ce, ce, frozen)) == 1.0


def test_squared_norms_go_through_all_reduce():
    lin, ce, cal, g_ce, g_cal = _linear_problem(50.0)
    seen = []

    def fake_mean(t: torch.Tensor) -> torch.Tensor:  # another rank with 4x the cal norm²
        seen.append(t.clone())
        return t * torch.tensor([1.0, 4.0])

    s = adaptive_calibration_scale(ce, cal, lin.parameters(), all_reduce=fake_mean)
    torch.testing.assert_close(seen[0], torch.stack([g_ce.pow(2).sum(), g_cal.pow(2).sum()]))
    assert float(s) == pytest.approx(0.5 * float(g_ce.norm() / g_cal.norm()), rel=1e-5)


def _data():
    _, retain, forget = toy_split()
    return retain, forget


def _run(clip: str):
    retain, forget = _data()
    logs: list[dict[str, float]] = []
    model = unlearn(
        toy_net(),
        retain,
        forget,
        config=CFG.replace(clip=clip),
        num_groups=4,
        on_epoch_end=lambda epoch, values: logs.append(dict(values)),
    )
    return model, logs


def test_unlearn_adaptive_runs_and_differs_from_norm():
    adaptive, logs = _run("adaptive")
    plain, plain_logs = _run("norm")
    weights = torch.cat([p.detach().reshape(-1) for p in adaptive.parameters()])
    assert bool(torch.isfinite(weights).all())
    pairs = zip(adaptive.parameters(), plain.parameters(), strict=True)
    assert any(not torch.equal(a, b) for a, b in pairs)
    scales = [epoch["miu/adaptive_scale"] for epoch in logs]
    assert len(scales) == CFG.epochs and all(0.0 < s <= 1.0 for s in scales)
    assert min(scales) < 1.0  # λ = 20 makes the calibration gradient the larger one
    assert all("miu/adaptive_scale" not in epoch for epoch in plain_logs)


def test_retain_loss_is_ce_plus_scaled_term():
    retain, _ = _data()
    net = toy_net()
    # untrained critics give a tiny calibration term: a large λ makes its gradient dominate
    cfg = CFG.replace(clip="adaptive", mi_weight=1e4)
    batch = split_batch(retain[:32])
    with attach(net, cfg, num_groups=4) as handle:
        net.train()
        loss = float(handle.retain_loss(net(batch.inputs), batch).detach())
        logs = handle.pop_logs()
    s, ce, cal = logs["miu/adaptive_scale"], logs["miu/ce"], logs["miu/calibration"]
    assert 0.0 < s < 1.0
    assert loss == pytest.approx(ce + s * cfg.mi_weight * cal, rel=1e-5)
    assert not math.isclose(loss, ce + cfg.mi_weight * cal, rel_tol=1e-2)


def test_sharded_runtime_is_rejected():
    runtime = LocalRuntime(torch.device("cpu"))
    runtime.sharded = True  # type: ignore[attr-defined]  # as AccelerateRuntime under FSDP
    with pytest.raises(ValueError, match=r"clip='adaptive'.*sharded"):
        attach(toy_net(), CFG.replace(clip="adaptive"), num_groups=4, runtime=runtime)
    attach(toy_net(), CFG, num_groups=4, runtime=runtime).remove()  # clip="norm" is fine


def test_config_validates_clip():
    assert MIUConfig().clip == "norm"
    cfg = MIUConfig(clip="adaptive")
    assert MIUConfig.from_dict(cfg.to_dict()) == cfg
    assert '"clip":"adaptive"' in cfg.to_json()
    with pytest.raises(ValueError, match=r"MIUConfig\.clip='bogus' is invalid: .*norm, adaptive"):
        MIUConfig(clip="bogus")
    with pytest.raises(ValueError, match=r"MIUConfig\.clip="):
        cfg.replace(clip="none")
