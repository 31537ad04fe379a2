"""Baselines (docs/method.md §6): each objective checked on tiny models by hand computations."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from miu_hooks import (
    ConfigError,
    L1SparseConfig,
    ModelError,
    NegGradConfig,
    RetrainConfig,
    SalUnConfig,
    SCRUBConfig,
    TrainConfig,
    unlearn,
)
from miu_hooks.data import GroupTensorDataset
from miu_hooks.methods import available_methods, config_class, resolve_run
from miu_hooks.methods import random_labels as rl_module
from miu_hooks.methods import salun as salun_module
from miu_hooks.methods.l1_sparse import L1Sparse, l1_alpha, l1_norm
from miu_hooks.methods.neggrad import NegGrad
from miu_hooks.methods.random_labels import RandomLabels, uniform_random_labels
from miu_hooks.methods.salun import SalUn, saliency_mask, top_fraction_mask
from miu_hooks.methods.scrub import SCRUB, distill_kl
from miu_hooks.seeding import epoch_generator

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_thread")]


BASELINES = ("finetune", "neggrad", "random_labels", "l1_sparse", "salun", "scrub", "retrain")
FORGET_GROUP = 3


def _data(n: int = 96, seed: int = 0, num_classes: int = 2, ratio: float = 0.75):
    """Retain and forget sets with 4 groups; the forget set is ``ratio`` of group 3."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    y = torch.randint(0, 2, (n,), generator=gen)
    s = torch.randint(0, 2, (n,), generator=gen)
    g = s + 2 * y
    pool = torch.nonzero(g == FORGET_GROUP).reshape(-1)
    forget = pool[: math.floor(ratio * len(pool))]
    keep = torch.ones(n, dtype=torch.bool)
    keep[forget] = False
    if num_classes > 2:  # K classes: groups s + 2y, the forget group stays y=1, s=1
        y = torch.randint(0, num_classes, (n,), generator=gen)
        g = s + 2 * y
        pool = torch.nonzero(g == FORGET_GROUP).reshape(-1)
        forget = pool[: math.floor(ratio * len(pool))]
        keep = torch.ones(n, dtype=torch.bool)
        keep[forget] = False
    retain_ds = GroupTensorDataset(x[keep], y[keep], g[keep])
    forget_ds = GroupTensorDataset(x[forget], y[forget], g[forget])
    return retain_ds, forget_ds


def _net(seed: int = 0, out: int = 2, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(4, 8), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(8, out))


def _cfg(cls: type[TrainConfig] = TrainConfig, **kw: Any) -> Any:
    base: dict[str, Any] = dict(epochs=2, batch_size=8, lr=0.05, device="cpu")
    base.update(kw)
    return cls(**base)


def _sgd_cfg(cls: type[TrainConfig] = TrainConfig, **kw: Any) -> Any:
    """Plain full-batch gradient steps: no momentum, no decay, constant lr, no clipping."""
    base: dict[str, Any] = dict(
        momentum=0.0, weight_decay=0.0, scheduler="constant", max_grad_norm=None
    )
    return _cfg(cls, **{**base, "batch_size": 512, **kw})


def n_batches(n: int, batch_size: int) -> int:
    """Batches of a training pass: a last batch of one joins the one before it."""
    return math.ceil(n / batch_size) - int(n > batch_size > 1 and n % batch_size == 1)


class Recorder:
    """A ``progress`` wrapper recording the groups and sizes of every batch per phase."""

    def __init__(self) -> None:
        self.groups: dict[str, list[torch.Tensor]] = {}
        self.sizes: dict[str, list[int]] = {}
        self.order: list[tuple[str, torch.Tensor]] = []

    def __call__(self, it: Iterable[Any], desc: str) -> Iterable[Any]:
        phase = desc.rsplit(" ", 1)[-1]
        for raw in it:
            self.groups.setdefault(phase, []).append(raw[2].clone())
            self.sizes.setdefault(phase, []).append(len(raw[1]))
            self.order.append((phase, raw[1].clone()))
            yield raw

    def stream(self, phase: str) -> torch.Tensor:
        return torch.cat(self.groups.get(phase, [torch.zeros(0, dtype=torch.long)]))


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _ce_on(model: nn.Module, ds: GroupTensorDataset) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model.eval()(ds.inputs), ds.labels))


# -- registry -------------------------------------------------------------------------------------
def test_registry_has_every_baseline_and_its_reweight_variant() -> None:
    names = available_methods()
    for name in ("random_labels", "l1_sparse", "salun", "scrub", "finetune", "retrain"):
        assert name in names and f"{name}_reweight" in names
        run = resolve_run(f"{name}_reweight", config_class(name)())
        assert run.method_class.name == name and run.config.reweight is True
        assert resolve_run(name, config_class(name)()).config.reweight is False
    # NegGrad has no retain pass and MIU samples with REWEIGHT by default: no _reweight names.
    assert "neggrad" in names and "neggrad_reweight" not in names and "miu_reweight" not in names
    assert resolve_run("salun").method_class is SalUn and issubclass(SalUn, RandomLabels)
    assert resolve_run("scrub").method_class is SCRUB and SCRUB.needs_original
    assert resolve_run("l1_sparse").method_class is L1Sparse
    assert resolve_run("neggrad").method_class is NegGrad
    assert {m: config_class(m) for m in ("l1_sparse", "salun", "scrub", "neggrad", "retrain")} == {
        "l1_sparse": L1SparseConfig, "salun": SalUnConfig, "scrub": SCRUBConfig,
        "neggrad": NegGradConfig, "retrain": RetrainConfig,
    }  # fmt: skip


# -- NegGrad --------------------------------------------------------------------------------------
def test_neggrad_is_one_gradient_ascent_step_on_the_forget_set() -> None:
    retain, forget = _data()
    net = _net()
    theta0 = copy.deepcopy(net)
    lr = 0.1
    unlearn(net, retain, forget, config=_sgd_cfg(epochs=1, lr=lr), method="neggrad")
    F.cross_entropy(theta0(forget.inputs), forget.labels).backward()
    for (name, p), q in zip(net.named_parameters(), theta0.parameters(), strict=True):
        assert q.grad is not None
        torch.testing.assert_close(p.detach(), q.detach() + lr * q.grad, msg=name)


def test_neggrad_raises_forget_loss_and_refuses_reweight() -> None:
    retain, forget = _data()
    before = _ce_on(_net(), forget)
    rec, net = Recorder(), _net()
    unlearn(net, retain, forget, config=_cfg(epochs=3), method="neggrad", progress=rec)
    assert _ce_on(net, forget) > before + 0.1
    assert "retain" not in rec.groups  # no retain pass, so nothing to reweight
    with pytest.raises(ConfigError, match="no retain pass"):
        unlearn(_net(), retain, forget, config=_cfg(reweight=True), method="neggrad")
    with pytest.raises(ConfigError, match=r"unknown method 'neggrad_reweight'.*no retain pass"):
        unlearn(_net(), retain, forget, config=_cfg(), method="neggrad_reweight")


# -- Random labels --------------------------------------------------------------------------------
def test_uniform_random_labels_ignore_the_true_labels() -> None:
    labels = torch.zeros(3000, dtype=torch.long)
    drawn = uniform_random_labels(labels, 3, epoch_generator(0, 0))
    freq = torch.bincount(drawn, minlength=3).double() / len(drawn)
    assert torch.allclose(freq, torch.full((3,), 1 / 3, dtype=torch.double), atol=0.04)
    again = uniform_random_labels(labels, 3, epoch_generator(0, 0))
    assert torch.equal(drawn, again)  # a pure function of (seed, epoch)
    assert not torch.equal(drawn, uniform_random_labels(labels, 3, epoch_generator(0, 1)))
    with pytest.raises(ModelError, match="at least 2 classes"):
        uniform_random_labels(labels, 1)


def test_random_labels_trains_forget_batches_on_uniform_labels(monkeypatch) -> None:
    retain, forget = _data(n=240, num_classes=3)
    seen: list[torch.Tensor] = []
    original_ce = rl_module.checked_cross_entropy

    def spy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen.append(targets.clone())
        return original_ce(logits, targets)

    monkeypatch.setattr(rl_module, "checked_cross_entropy", spy)
    rec = Recorder()
    epochs = 6
    unlearn(_net(out=3), retain, forget, config=_cfg(epochs=epochs), method="random_labels",
            num_groups=6, progress=rec)  # fmt: skip
    assert [p for p, _ in rec.order] == (
        ["forget"] * n_batches(len(forget), 8) + ["retain"] * n_batches(len(retain), 8)
    ) * epochs  # one forget pass, then one retain pass, every epoch
    assert len(seen) == len(rec.order)
    pairs = list(zip(rec.order, seen, strict=True))
    true_f = torch.cat([y for (p, y), _ in pairs if p == "forget"])
    used_f = torch.cat([t for (p, _), t in pairs if p == "forget"])
    for (phase, y), t in pairs:
        if phase == "retain":
            assert torch.equal(t, y)  # the retain pass keeps the true labels
    assert len(used_f) == epochs * len(forget)
    freq = torch.bincount(used_f, minlength=3).double() / len(used_f)
    assert torch.allclose(freq, torch.full((3,), 1 / 3, dtype=torch.double), atol=0.1)
    agree = float((used_f == true_f).double().mean())
    assert abs(agree - 1 / 3) < 0.12  # independent of the true label, not a copy of it
    # A fresh draw per epoch: the first two forget passes differ.
    n_f = len(forget)
    assert not torch.equal(used_f[:n_f], used_f[n_f : 2 * n_f])


# -- L1-sparse ------------------------------------------------------------------------------------
def test_l1_alpha_decays_linearly() -> None:
    assert [l1_alpha(e, 5) for e in range(5)] == pytest.approx([5e-4, 4e-4, 3e-4, 2e-4, 1e-4])
    assert L1Sparse.alpha_for(L1SparseConfig(epochs=4, l1_alpha=0.2), 3) == pytest.approx(0.05)
    for bad in (-1.0, float("nan"), "x"):
        with pytest.raises(ConfigError, match=r"L1SparseConfig\.l1_alpha=.* is invalid"):
            L1SparseConfig(l1_alpha=bad)
    with pytest.raises(ConfigError, match="epoch"):
        l1_alpha(5, 5)


def test_l1_norm_matches_hand_sum() -> None:
    net = _net()
    expected = sum(float(p.detach().abs().sum()) for p in net.parameters())
    assert float(l1_norm(net).detach()) == pytest.approx(expected, rel=1e-6)


def test_l1_sparse_step_is_ce_gradient_plus_alpha_e_sign() -> None:
    retain, forget = _data()
    epochs, alpha0, lr = 3, 0.2, 0.05
    net = _net()
    snaps = [_params(net)]
    unlearn(net, retain, forget, method="l1_sparse",
            config=_sgd_cfg(L1SparseConfig, epochs=epochs, lr=lr, l1_alpha=alpha0),
            on_epoch_end=lambda e, logs: snaps.append(_params(net)))  # fmt: skip
    for e in range(epochs):
        ref = _net()
        with torch.no_grad():
            for n, p in ref.named_parameters():
                p.copy_(snaps[e][n])
        F.cross_entropy(ref(retain.inputs), retain.labels).backward()
        alpha_e = alpha0 * (1 - e / epochs)
        for n, p in ref.named_parameters():
            assert p.grad is not None
            expected = p.detach() - lr * (p.grad + alpha_e * p.detach().sign())
            torch.testing.assert_close(snaps[e + 1][n], expected, msg=f"epoch {e} {n}")


# -- SalUn ----------------------------------------------------------------------------------------
def test_top_fraction_mask_is_global() -> None:
    scores = {"a": torch.tensor([[9.0, 1.0], [8.0, 0.5]]), "b": torch.tensor([7.0, 2.0, 3.0, 0.1])}
    mask = top_fraction_mask(scores, 0.5)
    assert mask["a"].tolist() == [[1.0, 0.0], [1.0, 0.0]] and mask["b"].tolist() == [1, 0, 1, 0]
    assert int(sum(m.sum() for m in top_fraction_mask(scores, 0.3).values())) == 2
    with pytest.raises(ConfigError, match="ratio"):
        top_fraction_mask(scores, 0.0)


def _hand_mask(model: nn.Module, forget: GroupTensorDataset, train_mode: bool) -> dict:
    ref = copy.deepcopy(model).train(train_mode)
    (-F.cross_entropy(ref(forget.inputs), forget.labels)).backward()
    grads = {n: p.grad.abs() for n, p in ref.named_parameters() if p.grad is not None}
    flat = torch.cat([g.reshape(-1) for g in grads.values()])
    threshold = flat.sort(descending=True).values[len(flat) // 2 - 1]
    return {n: (g >= threshold).float() for n, g in grads.items()}


def test_salun_mask_is_top_half_of_eval_mode_forget_gradient_computed_once(monkeypatch) -> None:
    retain, forget = _data()
    net = _net(dropout=0.5).train()
    hand = _hand_mask(net, forget, train_mode=False)
    calls: list[dict] = []

    def counting(*args: Any, **kw: Any) -> dict:
        calls.append(out := saliency_mask(*args, **kw))
        return out

    monkeypatch.setattr(salun_module, "saliency_mask", counting)
    runner: list[SalUn] = []
    monkeypatch.setattr(SalUn, "setup", _capture(SalUn.setup, runner))
    unlearn(net, retain, forget, config=_sgd_cfg(epochs=3), method="salun")
    assert len(calls) == 1  # computed once, before the first step
    mask = runner[0].mask
    assert mask is not None and mask.keys() == hand.keys()
    for n in hand:
        assert torch.equal(mask[n], hand[n]), n
    total = sum(m.numel() for m in mask.values())
    assert int(sum(m.sum() for m in mask.values())) == total // 2
    assert net.training  # the caller's mode is restored


def _capture(setup: Any, sink: list) -> Any:
    def wrapped(self: SalUn, ctx: Any) -> None:
        sink.append(self)
        setup(self, ctx)

    return wrapped


def test_salun_frozen_weights_never_move_even_with_momentum_and_decay(monkeypatch) -> None:
    retain, forget = _data()
    net = _net()
    before = _params(net)
    runner: list[SalUn] = []
    monkeypatch.setattr(SalUn, "setup", _capture(SalUn.setup, runner))
    cfg = _cfg(epochs=3, momentum=0.9, weight_decay=0.05, lr=0.1)
    unlearn(net, retain, forget, config=cfg, method="salun")
    mask = runner[0].mask
    assert mask is not None
    moved_salient = 0
    for n, p in net.named_parameters():
        frozen = mask[n] == 0
        assert torch.equal(p.detach()[frozen], before[n][frozen]), n
        moved_salient += int((p.detach()[~frozen] != before[n][~frozen]).sum())
    assert moved_salient > 0.9 * sum(int(m.sum()) for m in mask.values())


def test_salun_state_round_trip_restores_the_mask(monkeypatch) -> None:
    retain, forget = _data()
    runner: list[SalUn] = []
    monkeypatch.setattr(SalUn, "setup", _capture(SalUn.setup, runner))
    unlearn(_net(), retain, forget, config=_cfg(epochs=1), method="salun")
    state = runner[0].state_dict()
    assert {k.split(".", 1)[0] for k in state} == {"mask"}
    mask = {n: m.clone() for n, m in runner[0].mask.items()}  # type: ignore[union-attr]
    for m in runner[0].mask.values():  # type: ignore[union-attr]
        m.zero_()
    runner[0].load_state_dict(state)
    for n, m in mask.items():
        assert torch.equal(runner[0].mask[n], m)  # type: ignore[index]


def test_salun_rejects_a_bad_ratio() -> None:
    with pytest.raises(ConfigError, match=r"SalUnConfig\.salun_ratio=1\.5 is invalid: .*\(0, 1\]"):
        SalUnConfig(salun_ratio=1.5)


@pytest.mark.parametrize("ratio", [0.25, 0.75])
def test_salun_ratio_reaches_the_mask(monkeypatch, ratio: float) -> None:
    retain, forget = _data()
    runner: list[SalUn] = []
    monkeypatch.setattr(SalUn, "setup", _capture(SalUn.setup, runner))
    unlearn(_net(), retain, forget, config=_cfg(SalUnConfig, epochs=1, salun_ratio=ratio))
    mask = runner[0].mask
    assert mask is not None
    total = sum(m.numel() for m in mask.values())
    assert int(sum(m.sum() for m in mask.values())) == math.floor(ratio * total)


# -- SCRUB ----------------------------------------------------------------------------------------
def test_distill_kl_matches_a_hand_loop_at_t4() -> None:
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    temp = 4.0
    total = 0.0
    for i in range(5):
        ps = [math.exp(v / temp) for v in s[i].tolist()]
        pt = [math.exp(v / temp) for v in t[i].tolist()]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps, strict=True))
    expected = temp**2 * total / 5
    assert float(distill_kl(s, t, temp)) == pytest.approx(expected, rel=1e-5)
    assert float(distill_kl(s, t)) == pytest.approx(expected, rel=1e-5)  # T = 4 by default
    with pytest.raises(ConfigError, match="temperature"):
        distill_kl(s, t, 0.0)


def test_scrub_config_defaults_and_validation() -> None:
    cfg = SCRUBConfig()
    assert (cfg.scrub_temperature, cfg.scrub_kl_weight, cfg.scrub_ce_weight) == (4.0, 0.001, 0.99)
    assert (cfg.scrub_retain_batch_size, cfg.forget_epochs) == (128, 5)
    for key, bad in (("scrub_temperature", 0), ("scrub_kl_weight", -1.0),
                     ("scrub_retain_batch_size", 0)):  # fmt: skip
        with pytest.raises(ConfigError, match=rf"SCRUBConfig\.{key}="):
            SCRUBConfig(**{key: bad})


def _scrub_update(retain, forget, *, extra: dict, forget_epochs: int, lr: float = 0.1):
    student, teacher = _net(seed=0), _net(seed=1)
    theta0 = copy.deepcopy(student)
    cfg = _sgd_cfg(SCRUBConfig, epochs=1, lr=lr, forget_epochs=forget_epochs,
                   scrub_retain_batch_size=512, **extra)  # fmt: skip
    unlearn(student, retain, forget, config=cfg, method="scrub", original=teacher)
    return student, theta0, teacher.eval()


def test_scrub_max_step_ascends_kl_t_on_the_forget_set() -> None:
    retain, forget = _data()
    lr = 0.1
    # Zero retain weights isolate the max step: the min step then has a zero gradient.
    student, theta0, teacher = _scrub_update(
        retain, forget, lr=lr, forget_epochs=1,
        extra={"scrub_ce_weight": 0.0, "scrub_kl_weight": 0.0},
    )  # fmt: skip
    with torch.no_grad():
        t = teacher(forget.inputs)
    p_t = F.softmax(t / 4, -1)
    kl = 16 * (p_t * (p_t.log() - F.log_softmax(theta0(forget.inputs) / 4, -1))).sum(-1).mean()
    kl.backward()
    for (n, p), q in zip(student.named_parameters(), theta0.parameters(), strict=True):
        assert q.grad is not None
        torch.testing.assert_close(p.detach(), q.detach() + lr * q.grad, msg=n)


def test_scrub_min_step_is_gamma_ce_plus_alpha_kl_t() -> None:
    retain, forget = _data()
    lr, gamma, alpha = 0.1, 0.25, 0.5
    student, theta0, teacher = _scrub_update(
        retain, forget, lr=lr, forget_epochs=0,
        extra={"scrub_ce_weight": gamma, "scrub_kl_weight": alpha},
    )  # fmt: skip
    logits = theta0(retain.inputs)
    with torch.no_grad():
        p_t = F.softmax(teacher(retain.inputs) / 4, -1)
    kl = 16 * (p_t * (p_t.log() - F.log_softmax(logits / 4, -1))).sum(-1).mean()
    (gamma * F.cross_entropy(logits, retain.labels) + alpha * kl).backward()
    for (n, p), q in zip(student.named_parameters(), theta0.parameters(), strict=True):
        assert q.grad is not None
        torch.testing.assert_close(p.detach(), q.detach() - lr * q.grad, msg=n)


def test_scrub_teacher_runs_in_eval_mode_and_retain_batches_are_resized() -> None:
    retain, forget = _data()
    teacher = _net(seed=1, dropout=0.5).train()
    modes: list[bool] = []
    teacher.register_forward_hook(lambda m, i, o: modes.append(m.training))
    rec = Recorder()
    cfg = _cfg(SCRUBConfig, epochs=3, forget_epochs=2, batch_size=8, scrub_retain_batch_size=5)
    unlearn(_net(dropout=0.5), retain, forget, config=cfg, method="scrub", original=teacher,
            progress=rec)  # fmt: skip
    assert modes and not any(modes)
    assert len(rec.sizes["forget"]) == 2 * n_batches(len(forget), 8)  # e < E_f only
    retain_sizes = rec.sizes["retain"]
    assert len(retain_sizes) == 3 * n_batches(len(retain), 5) and max(retain_sizes) == 5
    # None: the min step's batches are the run's batch_size.
    rec = Recorder()
    cfg = _cfg(SCRUBConfig, epochs=1, forget_epochs=0, batch_size=7, scrub_retain_batch_size=None)
    unlearn(_net(), retain, forget, config=cfg, original=teacher, progress=rec)
    assert len(retain) == 78 and "forget" not in rec.sizes
    assert rec.sizes["retain"] == [7] * 10 + [8]  # 78 = 11·7 + 1: the single one joins a batch


# -- every method, with and without REWEIGHT ------------------------------------------------------
@pytest.mark.parametrize("method", BASELINES)
def test_every_baseline_runs_with_and_without_reweight(method: str) -> None:
    retain, forget = _data(ratio=0.75)
    streams, nets = {}, {}
    for rw in (False, True):
        rec, net = Recorder(), _net()
        name = f"{method}_reweight" if rw else method
        if method == "neggrad" and rw:
            continue  # no retain pass: no neggrad_reweight
        unlearn(net, retain, forget, config=_cfg(epochs=2), method=name, num_groups=4,
                progress=rec)  # fmt: skip
        assert all(torch.isfinite(p).all() for p in net.parameters())
        streams[rw], nets[rw] = rec.stream("retain"), net
    if method == "neggrad":
        assert len(streams[False]) == 0
        return
    share = {rw: float((s == FORGET_GROUP).double().mean()) for rw, s in streams.items()}
    n_train = len(retain) + len(forget)
    target = float((torch.cat([retain.groups, forget.groups]) == FORGET_GROUP).sum()) / n_train
    # Without REWEIGHT the stream is a permutation of D_r; with it, group 3 is drawn
    # about N_3(D) / |D| of the time (w = 4 at r = 0.75).
    assert sorted(streams[False].tolist()) == sorted(retain.groups.tolist() * 2)
    assert share[True] > share[False] + 0.05
    assert abs(share[True] - target) < 0.12
