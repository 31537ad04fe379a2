"""Every core entry point leaves no trace on the model (``tests/support/model_trace.py``).

``unlearn`` runs every registered method once (1 epoch, tiny MLP with BatchNorm,
put in eval mode with one frozen layer, so a run that forgets to restore the
mode or ``requires_grad`` is caught); ``attach`` + ``MIUHandle.remove`` runs a
forget pass and a retain step in between. The HF and Accelerate entry points
are checked in ``tests/integration/test_hf_no_trace.py`` and
``tests/integration/test_accelerate.py``. The first tests show that the check
itself fails on each kind of trace.
"""

from __future__ import annotations

import pytest
import torch
from model_trace import assert_no_trace, hooks_of, snapshot
from torch import nn
from torch.utils.data import DataLoader
from toy_problem import toy_net, toy_split

from miu_hooks import MIUConfig, attach, available_methods, unlearn
from miu_hooks.config import TrainConfig

pytestmark = pytest.mark.unit

LOOP = TrainConfig(epochs=1, batch_size=16, device="cpu")  # converted to each method's config
CFG = MIUConfig(
    epochs=1,
    forget_epochs=1,
    batch_size=16,
    mine_hidden=8,
    mine_warmup_iters=2,
    mine_iters=1,
    device="cpu",
)


def _model() -> nn.Sequential:
    net = toy_net(bn=True)
    net.eval()
    net[0].bias.requires_grad_(False)
    return net


# -- the check fails on each kind of trace ---------------------------------------------------
TRACES = {
    "forward hook": lambda m: m[3].register_forward_hook(lambda *a: None),
    "forward pre-hook with kwargs": lambda m: m.register_forward_pre_hook(
        lambda mod, a, kw: None, with_kwargs=True
    ),
    "backward hook": lambda m: m[0].register_full_backward_hook(lambda *a: None),
    "state_dict hook": lambda m: m.register_state_dict_post_hook(lambda *a: None),
    "tensor hook": lambda m: m[0].weight.register_hook(lambda g: g),
    "global hook": lambda m: nn.modules.module.register_module_forward_hook(lambda *a: None),
    "requires_grad": lambda m: m[3].weight.requires_grad_(False),
    "training flag": lambda m: m[1].train(),
    "patched forward": lambda m: setattr(m[2], "forward", lambda x: x),
    "state_dict keys": lambda m: m.register_buffer("extra", torch.zeros(1)),
    "dtype": lambda m: m[3].double(),
}


@pytest.mark.parametrize("kind", sorted(TRACES))
def test_the_check_catches(kind):
    model = _model()
    before = snapshot(model)
    assert_no_trace(model, before, same_values=True)  # a clean model passes
    handle = TRACES[kind](model)
    try:
        with pytest.raises(AssertionError):
            assert_no_trace(model, before)
    finally:
        if hasattr(handle, "remove"):
            handle.remove()


def test_the_check_catches_changed_values_only_when_asked():
    model = _model()
    before = snapshot(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert_no_trace(model, before)
    with pytest.raises(AssertionError, match="values changed"):
        assert_no_trace(model, before, same_values=True)


def test_hooks_of_a_clean_model_is_empty():
    assert hooks_of(_model()) == {}


# -- the entry points ---------------------------------------------------------------------------
@pytest.mark.parametrize("method", available_methods())
def test_unlearn_leaves_no_trace(method):
    _, retain, forget = toy_split()
    model = _model()
    before = snapshot(model)
    cfg = CFG if method == "miu" else LOOP
    out = unlearn(model, retain, forget, config=cfg, num_groups=4, method=method)
    assert out is model
    assert_no_trace(model, before)


def test_attach_and_remove_leave_no_trace():
    _, retain, forget = toy_split()
    model = _model()
    before = snapshot(model)
    handle = attach(model, CFG, num_groups=4)
    handle.remove()
    assert_no_trace(model, before, same_values=True)  # attaching alone changes nothing

    handle = attach(model, CFG, num_groups=4)
    assert hooks_of(model)  # the taps are there while attached
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    handle.epoch_start(
        0,
        optimizer=opt,
        forget_loader=DataLoader(forget, batch_size=8),
        tune_loader=DataLoader(retain, batch_size=16),
    )
    x, y, g = next(iter(DataLoader(retain, batch_size=16)))
    handle.retain_loss(model(x), handle.split((x, y, g))).backward()
    opt.step()
    handle.remove()
    model.eval()
    assert handle.counters["forget"] > 0
    assert_no_trace(model, before)
