import math

import pytest
import torch
from model_trace import assert_no_trace, hooks_of, snapshot
from torch import nn
from torch.utils.data import TensorDataset
from toy_problem import toy_net, toy_split

from miu_hooks import (
    EmptyForgetSetError,
    EmptyGroupError,
    FeatureModuleNotFoundError,
    GroupRangeError,
    MIUConfig,
    NoClassifierOutputError,
    NonFiniteLossError,
    TrainConfig,
    attach,
    unlearn,
)
from miu_hooks.data import split_batch

pytestmark = pytest.mark.unit

CFG = MIUConfig(
    epochs=3,
    forget_epochs=2,
    batch_size=16,
    mine_hidden=16,
    mine_warmup_iters=6,
    mine_iters=2,
    lr=0.05,
    device="cpu",
)
# The same loop for the methods that take TrainConfig (no MIU settings).
LOOP = TrainConfig(epochs=3, batch_size=16, lr=0.05, device="cpu")


_data, _net = toy_split, toy_net


@pytest.mark.parametrize("method", ["miu", "finetune", "retrain_reweight"])
def test_same_seed_same_weights(method):
    _, retain, forget = _data()
    cfg = CFG if method == "miu" else LOOP
    a = unlearn(_net(), retain, forget, config=cfg, num_groups=4, method=method)
    b = unlearn(_net(), retain, forget, config=cfg, num_groups=4, method=method)
    c = unlearn(_net(), retain, forget, config=cfg.replace(seed=1), num_groups=4, method=method)
    for (k, va), vb, _vc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values()
    ):
        assert torch.equal(va, vb), k
    assert any(
        not torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values())
    )


def test_unlearn_leaves_model_clean_and_keys_unchanged():
    _, retain, forget = _data()
    model = _net(bn=True)
    clean = snapshot(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    out = unlearn(model, retain, forget, config=CFG, num_groups=4)
    assert out is model
    assert_no_trace(model, clean)  # same class, keys, flags; no hook left
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(
        torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()
    )
    assert torch.equal(torch.get_rng_state(), rng)  # caller's RNG untouched


def test_resume_matches_uninterrupted(tmp_path):
    _, retain, forget = _data()
    full = unlearn(_net(), retain, forget, config=CFG, num_groups=4)

    class Stop(Exception):
        pass

    def stop_after_first(epoch, logs):
        if epoch == 0:
            raise Stop

    with pytest.raises(Stop):
        unlearn(
            _net(),
            retain,
            forget,
            config=CFG,
            num_groups=4,
            state_dir=tmp_path,
            on_epoch_end=stop_after_first,
        )
    resumed = unlearn(
        _net(), retain, forget, config=CFG, num_groups=4, state_dir=tmp_path, resume=True
    )
    for (k, va), vb in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(va, vb), k


@pytest.mark.parametrize("scheduler", ["cosine", "constant"])
def test_resume_restores_the_scheduler_state(tmp_path, monkeypatch, scheduler):
    import json

    from safetensors import safe_open

    from miu_hooks.unlearn import STATE_FILE

    _, retain, forget = _data()
    cfg = LOOP.replace(epochs=4, scheduler=scheduler)
    full = unlearn(_net(), retain, forget, config=cfg, method="finetune")

    class Stop(Exception):
        pass

    def stop_after_second(epoch, logs):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        unlearn(_net(), retain, forget, config=cfg, method="finetune", state_dir=tmp_path,
                on_epoch_end=stop_after_second)  # fmt: skip
    with safe_open(str(tmp_path / STATE_FILE), framework="pt") as f:
        saved = json.loads(f.metadata()["scheduler"])
    assert saved["last_epoch"] == 2 and len(saved["_last_lr"]) == 1
    steps = []
    step = torch.optim.lr_scheduler.LRScheduler.step
    monkeypatch.setattr(torch.optim.lr_scheduler.LRScheduler, "step",
                        lambda self, *a: (steps.append(1), step(self, *a))[1])  # fmt: skip
    resumed = unlearn(_net(), retain, forget, config=cfg, method="finetune", state_dir=tmp_path,
                      resume=True)  # fmt: skip
    assert len(steps) == 1 + 2  # the constructor's step and epochs 2, 3: nothing replayed
    for (k, va), vb in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(va, vb), k


def test_resume_state_without_a_scheduler_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    from miu_hooks import CheckpointError
    from miu_hooks.unlearn import STATE_FILE

    _, retain, forget = _data()
    unlearn(_net(), retain, forget, config=LOOP.replace(epochs=1), method="finetune",
            state_dir=tmp_path)  # fmt: skip
    from safetensors import safe_open

    with safe_open(str(tmp_path / STATE_FILE), framework="pt") as f:
        meta = dict(f.metadata())
    del meta["scheduler"]
    save_file(load_file(str(tmp_path / STATE_FILE)), str(tmp_path / STATE_FILE), metadata=meta)
    with pytest.raises(CheckpointError, match="no readable scheduler state"):
        unlearn(_net(), retain, forget, config=LOOP.replace(epochs=1), method="finetune",
                state_dir=tmp_path, resume=True)  # fmt: skip


def test_feature_cache_matches_recomputation():
    _, retain, forget = _data()
    a = unlearn(_net(), retain, forget, config=CFG.replace(feature_cache="on"), num_groups=4)
    b = unlearn(_net(), retain, forget, config=CFG.replace(feature_cache="off"), num_groups=4)
    for va, vb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.allclose(va, vb, atol=1e-5)


def test_forget_pass_lowers_forget_mi_and_critics_fixed_outside_tuning():
    full, retain, forget = _data()
    model = _net()
    with attach(model, CFG.replace(mine_lr=0.1), num_groups=4) as handle:
        loader = torch.utils.data.DataLoader(full, batch_size=32, shuffle=True)
        handle.tune(iter(list(loader) * 20), 60)
        crit = {k: v.clone() for k, v in handle.critic_model.state_dict().items()}
        assert not any(p.requires_grad for p in handle.critic_model.parameters())
        batch = split_batch(next(iter(torch.utils.data.DataLoader(forget, batch_size=64))))
        marginals = torch.randint(
            0, 4, (50, len(batch)), generator=torch.Generator().manual_seed(0)
        )

        def forget_mi():
            with torch.no_grad():
                model(batch.inputs)
                z = handle.tap.pop()
                return float(
                    torch.stack(
                        [
                            handle.critic_model(z, batch.groups, m, update_ema=False)
                            for m in marginals
                        ]
                    ).mean()
                )

        before = forget_mi()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(10):
            model(batch.inputs)
            loss = handle.forget_loss(handle.tap.pop(), batch.groups)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert forget_mi() < before - 0.05
        for k, v in handle.critic_model.state_dict().items():
            if k not in ("log_running_mean", "initialized"):
                assert torch.equal(v, crit[k]), k


def test_tuning_restores_batchnorm_and_uses_original_features():
    full, _, _ = _data()
    model = _net(bn=True)
    with torch.no_grad():
        model[0].weight.mul_(3.0)
    cfg = CFG.replace(mine_warmup_iters=3)
    handle = attach(model, cfg, num_groups=4, original=_net(bn=True))
    try:
        bn = {k: v.clone() for k, v in model[1].named_buffers()}
        seen = []
        orig_tap_pop = handle.tap_original.pop

        def spy():
            z = orig_tap_pop()
            seen.append(z)
            return z

        handle.tap_original.pop = spy
        loader = torch.utils.data.DataLoader(full, batch_size=32)
        handle.tune(iter(list(loader)), 3)
        for k, v in model[1].named_buffers():
            assert torch.equal(v, bn[k]), k
        assert len(seen) == 3 and not handle.original.training
        assert handle.counters["tune"] == 3
    finally:
        handle.remove()
    assert hooks_of(model) == {} and hooks_of(handle.original) == {}


def test_clipping_bounds_the_update():
    _, retain, forget = _data()
    cfg = CFG.replace(
        epochs=1,
        forget_epochs=0,
        mine_warmup_iters=1,
        lr=1.0,
        momentum=0.0,
        weight_decay=0.0,
        max_grad_norm=1e-3,
        batch_size=len(retain),
        reweight=False,
        scheduler="constant",
    )
    model = _net()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    unlearn(model, retain, forget, config=cfg, num_groups=4)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert float((after - before).norm()) == pytest.approx(1e-3, rel=1e-3)


def test_state_dict_roundtrip_continues_identically():
    full, _, _ = _data()
    loader = list(torch.utils.data.DataLoader(full, batch_size=32))
    a = attach(_net(), CFG, num_groups=4)
    a.tune(iter(loader), 3)
    state = a.state_dict()
    b = attach(_net(), CFG, num_groups=4)
    b.load_state_dict(state)
    a.tune(iter(loader), 2)
    b.tune(iter(loader), 2)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    a.remove()
    b.remove()


# --- bad input -------------------------------------------------------------------------


def test_empty_forget_set():
    _, retain, forget = _data()
    empty = TensorDataset(
        torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    )
    with pytest.raises(EmptyForgetSetError, match="forget set is empty"):
        unlearn(_net(), retain, empty, config=CFG)


def test_group_emptied_by_forget_set():
    full, _, _ = _data()
    x, y, g = full.tensors
    m = g == 1
    with pytest.raises(EmptyGroupError, match="group 1"):
        unlearn(
            _net(), TensorDataset(x[~m], y[~m], g[~m]), TensorDataset(x[m], y[m], g[m]), config=CFG
        )


def test_group_and_label_out_of_range():
    _, retain, forget = _data()
    x, y, g = forget.tensors
    with pytest.raises(GroupRangeError, match=r"group id 3 is outside \[0, 3\)"):
        unlearn(_net(), retain, forget, config=CFG, num_groups=3)
    xr, yr, gr = retain.tensors
    bad = TensorDataset(xr, torch.where(yr == 1, 5, yr), gr)
    with pytest.raises(GroupRangeError, match=r"label 5 is outside \[0, 2\)"):
        unlearn(_net(), bad, forget, config=LOOP, num_groups=4, method="finetune")


def test_feature_module_not_found():
    _, retain, forget = _data()
    with pytest.raises(FeatureModuleNotFoundError, match="'missing' not found"):
        unlearn(_net(), retain, forget, config=CFG, num_groups=4, feature_module="missing")


def test_model_without_classifier_output():
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 2)

        def forward(self, x):
            return {"scores": self.fc(x)}

    _, retain, forget = _data()
    with pytest.raises(NoClassifierOutputError, match="has no logits"):
        unlearn(DictOut(), retain, forget, config=CFG, num_groups=4)


def test_non_finite_loss_stops_with_step_and_finite_weights():
    _, retain, forget = _data()
    model = _net()
    with torch.no_grad():
        model[2].weight.fill_(math.inf)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"non-finite .* step at epoch 0"):
        unlearn(model, retain, forget, config=LOOP, num_groups=4, method="finetune")
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]) or torch.isfinite(v).all(), k


def test_nan_in_mi_estimate_is_named():
    _, retain, forget = _data()
    model = _net()
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    with pytest.raises(NonFiniteLossError, match="critic tuning"):
        unlearn(model, retain, forget, config=CFG, num_groups=4)


def test_original_score_table_tracks_tuning():
    """Î_o from T_o's score table equals a T_o forward, before and after more tuning."""
    from miu_hooks.data import IndexedDataset

    full, _, _ = _data()
    model = _net()
    with attach(model, CFG, num_groups=4) as handle:
        loader = torch.utils.data.DataLoader(IndexedDataset(full), batch_size=32)
        handle.build_feature_cache(loader, len(full))
        batch = split_batch(next(iter(loader)))
        plain = split_batch((batch.inputs, batch.labels, batch.groups))  # no index: a forward
        z = model[:-1](batch.inputs).detach()
        for round_ in range(2):
            handle.tune(iter(list(loader) * 4), 8)
            values = []
            for b in (batch, plain):
                gen, ema = handle.generator.get_state(), handle.critic_original.state_dict()
                values.append(handle.retain_penalty(z, b))
                handle.generator.set_state(gen)
                handle.critic_original.load_state_dict(ema)
            assert handle._original_scores is not None, round_
            assert torch.allclose(values[0], values[1], rtol=1e-5, atol=1e-7), round_


@pytest.mark.parametrize("init", ["shared", "independent"])
def test_shared_critic_init_gives_zero_calibration_before_features_move(init):
    """With z_u == z_o, shared critics tuned together agree exactly; independent ones do not."""
    full, _, _ = _data()
    model = _net()
    with attach(model, CFG.replace(critic_init=init), num_groups=4) as handle:
        loader = torch.utils.data.DataLoader(full, batch_size=32)
        handle.tune(iter(list(loader) * 4), 10)
        batch = split_batch(next(iter(loader)))
        z = model[:-1](batch.inputs).detach()
        mi_u, mi_o = handle.mi_pair(z, handle.original_features(batch), batch.groups)
    if init == "shared":
        assert float(mi_u) == float(mi_o)
    else:
        assert abs(float(mi_u) - float(mi_o)) > 1e-6
