import math

import numpy as np
import pytest
import torch

from miu_hooks import MIEstimator

pytestmark = pytest.mark.unit


def _mixture(n, sep, gen):
    """Z | G=g ~ N(+-sep * e1, I_2), G uniform over {0, 1}."""
    g = torch.randint(0, 2, (n,), generator=gen)
    z = torch.randn(n, 2, generator=gen)
    z[:, 0] += sep * (2 * g - 1).float()
    return z, g


def _analytic_mi(sep):
    """I(Z;G) = log 2 - E_z[H(G|z)] for the two-component mixture (1-D quadrature)."""
    x = np.linspace(-sep - 12, sep + 12, 200_001)
    pdf = lambda mu: np.exp(-0.5 * (x - mu) ** 2) / math.sqrt(2 * math.pi)  # noqa: E731
    p = 0.5 * pdf(sep) + 0.5 * pdf(-sep)
    post = 1 / (1 + np.exp(-2 * sep * x))
    post = np.clip(post, 1e-300, 1 - 1e-16)
    h = -(post * np.log(post) + (1 - post) * np.log1p(-post))
    return math.log(2) - float(np.trapezoid(p * h, x))


def test_estimator_recovers_gaussian_mixture_mi():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    sep = 1.0
    truth = _analytic_mi(sep)
    est = MIEstimator(2, 2, hidden=64, ema=0.01)
    opt = torch.optim.Adam(est.parameters(), lr=1e-2)
    for _ in range(400):
        z, g = _mixture(256, sep, gen)
        loss = -est(z, g, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        vals = []
        for _ in range(10):
            z, g = _mixture(20_000, sep, gen)
            vals.append(float(est(z, g, generator=gen, update_ema=False)))
    value = float(np.mean(vals))
    se = float(np.std(vals, ddof=1) / math.sqrt(len(vals)))
    assert abs(value - truth) <= 0.15 * truth, (value, truth)
    assert value <= truth + 4 * se + 1e-3, (value, truth, se)


def test_estimator_near_zero_for_independent_groups():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    est = MIEstimator(3, 4, hidden=32)
    opt = torch.optim.Adam(est.parameters(), lr=3e-3)
    for _ in range(300):
        z = torch.randn(256, 3, generator=gen)
        g = torch.randint(0, 4, (256,), generator=gen)
        loss = -est(z, g, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        z = torch.randn(50_000, 3, generator=gen)
        g = torch.randint(0, 4, (50_000,), generator=gen)
        assert abs(float(est(z, g, generator=gen, update_ema=False))) < 0.03


def test_running_mean_initialised_then_mixed():
    est = MIEstimator(2, 2, hidden=4, ema=0.1)
    scores1 = torch.tensor([0.0, 0.0])
    est.update_running_mean(scores1)
    assert bool(est.initialized)
    assert float(est.log_running_mean) == pytest.approx(0.0, abs=1e-7)
    est.update_running_mean(torch.tensor([math.log(3.0), math.log(3.0)]))
    # m = 0.1 * 3 + 0.9 * 1
    assert float(est.log_running_mean.exp()) == pytest.approx(1.2, rel=1e-6)


def test_forward_updates_ema_only_when_asked():
    est = MIEstimator(2, 3, hidden=8)
    z, g = torch.randn(16, 2), torch.randint(0, 3, (16,))
    est(z, g, update_ema=False)
    assert not bool(est.initialized)
    est(z, g)
    assert bool(est.initialized)


def test_gradient_reaches_features():
    est = MIEstimator(2, 2, hidden=8)
    z = torch.randn(8, 2, requires_grad=True)
    est(z, torch.randint(0, 2, (8,))).backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def test_state_dict_roundtrip():
    a = MIEstimator(3, 2, hidden=8)
    a(torch.randn(10, 3), torch.randint(0, 2, (10,)))
    b = MIEstimator(3, 2, hidden=8)
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) >= {"log_running_mean", "initialized"}
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    z, g, m = torch.randn(5, 3), torch.randint(0, 2, (5,)), torch.randint(0, 2, (5,))
    assert torch.equal(a(z, g, m, update_ema=False), b(z, g, m, update_ema=False))


def test_runs_in_fp32_under_autocast():
    est = MIEstimator(2, 2, hidden=8)
    z = torch.randn(4, 2).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = est(z, torch.tensor([0, 1, 0, 1]))
        scores = est.scores(z, torch.tensor([0, 1, 0, 1]))
    assert out.dtype == torch.float32 and scores.dtype == torch.float32


def test_bad_shapes_and_groups():
    est = MIEstimator(2, 2, hidden=4)
    with pytest.raises(ValueError, match=r"features \[B, 2\]"):
        est(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"group id 2 is outside \[0, 2\)"):
        est(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))


def test_shared_projection_matches_concat_network():
    """The fast path equals T(z, g) = net(concat(z, onehot(g))), values and gradients."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    est = MIEstimator(5, 4, hidden=16)
    z = torch.randn(8, 5)
    g, m = torch.randint(0, 4, (8,)), torch.randint(0, 4, (8,))

    def reference(zz, gg):
        return est.net(torch.cat([zz, F.one_hot(gg, 4).float()], 1)).reshape(-1)

    joint, marginal = est.scores_pair(z, g, m)
    assert torch.allclose(joint, reference(z, g), atol=1e-6)
    assert torch.allclose(marginal, reference(z, m), atol=1e-6)

    z1 = z.clone().requires_grad_(True)
    est.zero_grad()
    est(z1, g, m, update_ema=False).backward()
    fast = [p.grad.clone() for p in est.parameters()]
    z2 = z.clone().requires_grad_(True)
    est.zero_grad()
    (reference(z2, g).mean() - torch.logsumexp(reference(z2, m), 0) + math.log(8)).backward()
    for a, b in zip(fast, [p.grad for p in est.parameters()]):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(z1.grad, z2.grad, atol=1e-6)


@pytest.mark.parametrize("dim", [2, 64])
def test_feature_width_critic_recovers_gaussian_mixture_mi(dim):
    """MIUConfig(critic_width="feature")'s narrower critic passes the test above, same tolerance.

    Z | G=g ~ N(+-sep * e1, I_d): the other d - 1 coordinates are noise, so the
    analytic MI is the two-dimensional case's.
    """
    from miu_hooks import MIUConfig
    from miu_hooks.engine import critic_hidden

    hidden = critic_hidden(MIUConfig(critic_width="feature"), dim)
    assert hidden == {2: 32, 64: 128}[dim]  # 16 and 4 times narrower than the paper's 512
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    sep = 1.0
    truth = _analytic_mi(sep)

    def sample(n):
        g = torch.randint(0, 2, (n,), generator=gen)
        z = torch.randn(n, dim, generator=gen)
        z[:, 0] += sep * (2 * g - 1).float()
        return z, g

    est = MIEstimator(dim, 2, hidden=hidden, ema=0.01)
    opt = torch.optim.Adam(est.parameters(), lr=1e-2)
    for _ in range(400):
        z, g = sample(256)
        loss = -est(z, g, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        vals = [float(est(*sample(20_000), generator=gen, update_ema=False)) for _ in range(10)]
    value = float(np.mean(vals))
    se = float(np.std(vals, ddof=1) / math.sqrt(len(vals)))
    assert abs(value - truth) <= 0.15 * truth, (value, truth)
    assert value <= truth + 4 * se + 1e-3, (value, truth, se)
