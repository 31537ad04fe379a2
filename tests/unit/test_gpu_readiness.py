"""What a first GPU run needs, checked on CPU: refused wrappers, precision="auto", TF32
scopes, deferred checks, cache placement, pinned loaders, optimiser state loaded on the
CPU, and fp16 loss scaling for adaptive clipping and SalUn's saliency pass."""

from __future__ import annotations

import copy
import importlib
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import miu_hooks.precision as precision_mod
from miu_hooks import MIUConfig, TrainConfig, attach, unlearn, validate
from miu_hooks.checks import NON_FINITE, StepChecks, deferred, require
from miu_hooks.clipping import adaptive_calibration_scale
from miu_hooks.errors import GroupRangeError, ModelError, NonFiniteLossError
from miu_hooks.feature_cache import cache_placement, chunked_score_table
from miu_hooks.loader_options import loader_options
from miu_hooks.precision import exact_fp32, resolve_precision, tf32_matmul
from miu_hooks.runtime import LocalRuntime

pytestmark = pytest.mark.unit


def _data(n: int = 48) -> tuple[TensorDataset, TensorDataset]:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 4, generator=gen), torch.randint(0, 2, (n,), generator=gen)
    g = y * 2 + torch.randint(0, 2, (n,), generator=gen)
    return TensorDataset(x[8:], y[8:], g[8:]), TensorDataset(x[:8], y[:8], g[:8])


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


CFG = MIUConfig(epochs=1, forget_epochs=1, batch_size=8, mine_hidden=8, mine_warmup_iters=2,
                mine_iters=1, device="cpu")  # fmt: skip


# -- wrappers -------------------------------------------------------------------------------------
def test_data_parallel_is_refused_everywhere_with_a_one_line_message() -> None:
    retain, forget = _data()
    wrapped = nn.DataParallel(_net())  # constructs without GPUs
    with pytest.raises(ModelError, match="torchrun") as info:
        unlearn(wrapped, retain, forget, config=CFG, num_groups=4)
    assert "\n" not in str(info.value) and "accelerate launch" in str(info.value)
    assert [type(p) for p in validate(wrapped, retain, forget, CFG, num_groups=4)] == [ModelError]
    with pytest.raises(ModelError, match="DataParallel"):
        attach(wrapped, CFG, num_groups=4)
    with pytest.raises(ModelError, match="DataParallel"):
        attach(_net(), CFG, num_groups=4, forward_model=nn.DataParallel(_net()))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile on this torch
def test_compiled_model_is_refused() -> None:
    retain, forget = _data()
    compiled = torch.compile(_net())  # an OptimizedModule; nothing is compiled until called
    with pytest.raises(ModelError, match=r"torch\.compile"):
        unlearn(compiled, retain, forget, config=CFG, num_groups=4)
    with pytest.raises(ModelError, match="uncompiled"):
        attach(compiled, CFG, num_groups=4)


def test_trainer_arguments_with_several_gpus_or_compile_are_refused() -> None:
    pytest.importorskip("transformers")
    from miu_hooks.integrations.hf import MIUCallback
    from miu_hooks.integrations.hf_state import check_trainer_args

    check_trainer_args(SimpleNamespace(n_gpu=1, torch_compile=False))
    with pytest.raises(ModelError, match=r"2 GPUs in one process.*torchrun"):
        check_trainer_args(SimpleNamespace(n_gpu=2, torch_compile=False))
    with pytest.raises(ModelError, match=r"torch\.compile"):
        check_trainer_args(SimpleNamespace(n_gpu=1, torch_compile=True))
    forget = [{"pixel_values": torch.zeros(4), "labels": 0, "group": 0}]
    callback = MIUCallback(forget, config=MIUConfig())
    args = SimpleNamespace(n_gpu=2, remove_unused_columns=False)
    with pytest.raises(ModelError, match="DataParallel"):
        callback.bind(args, _net())


# -- precision ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("bf16", "want"), [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_cuda(monkeypatch: pytest.MonkeyPatch, bf16: bool, want: str) -> None:
    seen: list[Any] = []

    def supported(including_emulation: bool = True) -> bool:
        seen.append(including_emulation)
        return bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert resolve_precision("auto", "cuda") == want
    assert seen == [False]  # emulated bf16 (pre-Ampere) does not count
    rt = LocalRuntime(torch.device("cuda"), "auto")
    assert rt.precision == want
    assert (rt.scaler is not None) == (want == "fp16")  # fp16 always gets a loss scaler
    assert resolve_precision("fp32", "cuda") == "fp32"


def test_auto_precision_is_fp32_on_cpu_and_bad_values_are_refused() -> None:
    assert resolve_precision("auto", "cpu") == "fp32"
    rt = LocalRuntime(torch.device("cpu"), "auto")
    assert (rt.precision, rt.scaler) == ("fp32", None)
    assert MIUConfig().precision == "auto"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", "cpu")


def _fake_matmul(monkeypatch: pytest.MonkeyPatch, value: str) -> SimpleNamespace:
    backend = SimpleNamespace(fp32_precision=value)
    monkeypatch.setattr(precision_mod, "_matmul_backend", lambda: backend)
    return backend


def test_tf32_is_scoped_and_respects_an_explicit_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    backend = _fake_matmul(monkeypatch, "none")
    with tf32_matmul("cpu"):
        assert backend.fp32_precision == "none"  # CPU: nothing to do
    with tf32_matmul("cuda"):
        assert backend.fp32_precision == "tf32"
        with exact_fp32("cuda"):  # the critics: IEEE fp32, autocast off
            assert backend.fp32_precision == "ieee"
        assert backend.fp32_precision == "tf32"
    assert backend.fp32_precision == "none"  # restored
    backend.fp32_precision = "ieee"  # the user asked for exact fp32: kept
    with tf32_matmul("cuda"):
        assert backend.fp32_precision == "ieee"


def test_critics_run_fp32_under_autocast() -> None:
    from miu_hooks.estimators import MIEstimator

    est = MIEstimator(4, 2, hidden=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = est.scores(torch.randn(3, 4), torch.tensor([0, 1, 0]))
    assert scores.dtype == torch.float32


# -- deferred checks ------------------------------------------------------------------------------
def test_deferred_checks_read_once_and_raise_the_first_failure() -> None:
    with deferred() as checks:
        require(torch.tensor(True), lambda: GroupRangeError("a"), 1)
        require(torch.tensor([True, False]), lambda: GroupRangeError("b"), 1)
        require(torch.tensor(False), lambda: NonFiniteLossError("c"), NON_FINITE)
        with deferred() as inner:  # joins the open scope: no read of its own
            assert inner is checks
        assert checks.reads == 0 and checks.pending == 3
        with pytest.raises(GroupRangeError, match="b"):
            checks.flush()
    assert checks.reads == 1 and checks.pending == 0


def test_remote_failure_names_the_rank() -> None:
    checks = StepChecks()
    checks.add(torch.tensor(True), lambda: GroupRangeError("mine"), 1)
    checks.globalise(torch.tensor([0.0, 1.0]))  # rank 1 found a bad label
    with pytest.raises(GroupRangeError, match="rank 1 found a label outside"):
        checks.flush()
    checks.add(torch.tensor(True), lambda: GroupRangeError("mine"), 1)
    with pytest.raises(NonFiniteLossError, match="another rank"):
        checks.flush(reduce_max=lambda code: torch.tensor([3.0]))  # an all-reduced code


def test_bad_label_inside_a_step_is_clamped_then_reported() -> None:
    from miu_hooks.functional import checked_cross_entropy

    logits = torch.zeros(2, 3, requires_grad=True)
    with pytest.raises(GroupRangeError, match="label 7 is outside"), deferred():
        loss = checked_cross_entropy(logits, torch.tensor([0, 7]))  # no IndexError here
        assert torch.isfinite(loss)


def test_tuning_failure_restores_the_critics() -> None:
    retain, _ = _data()
    model = _net()
    with attach(model, CFG, num_groups=4) as handle:
        handle.tune(iter(list(torch.utils.data.DataLoader(retain, batch_size=8)) * 2), 2)
        before = copy.deepcopy(handle.critic_model.state_dict())
        with torch.no_grad():
            model[0].weight.fill_(float("nan"))
        batches = iter(list(torch.utils.data.DataLoader(retain, batch_size=8)) * 2)
        with pytest.raises(NonFiniteLossError, match="critic tuning"):
            handle.tune(batches, 3)
        after = handle.critic_model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)


# -- cache, loaders -------------------------------------------------------------------------------
def test_cache_placement_follows_the_documented_sizes() -> None:
    gib = 2**30
    imagenet_vit = 1_281_167 * 768 * 4  # 3.7 GiB in fp32
    assert cache_placement(imagenet_vit, 40 * gib, True) == ("device", torch.float32)
    assert cache_placement(imagenet_vit, 10 * gib, True) == ("device", torch.bfloat16)
    assert cache_placement(imagenet_vit, 10 * gib, False) == ("host", torch.float32)
    assert cache_placement(imagenet_vit, 4 * gib, True) == ("host", torch.float32)


def test_chunked_score_table_equals_one_pass_for_a_half_cache() -> None:
    from miu_hooks.estimators import MIEstimator

    est = MIEstimator(4, 3, hidden=8)
    cache = torch.randn(10, 4).bfloat16()
    whole = est.score_table(cache.float())
    parts = chunked_score_table(est.score_table, cache, torch.device("cpu"), rows=3)
    assert torch.allclose(parts, whole, rtol=1e-6, atol=1e-6)


def test_loader_options_pin_cpu_items_for_cuda_only() -> None:
    items = [(torch.zeros(2), 0, 0)]
    assert loader_options(items, "cuda", 2)["pin_memory"] is True
    assert loader_options(items, "cpu", 2) == {
        "num_workers": 2, "pin_memory": False, "persistent_workers": True
    }
    meta_items = [(torch.zeros(2, device="meta"), 0, 0)]  # not on the CPU: never pinned
    assert loader_options(meta_items, "cuda", 0)["pin_memory"] is False


def test_num_workers_reaches_every_loader_of_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from miu_hooks.methods.miu import MIU

    seen: list[Any] = []
    setup = MIU.setup
    monkeypatch.setattr(MIU, "setup", lambda self, ctx: (seen.append(ctx), setup(self, ctx))[1])
    retain, forget = _data()
    unlearn(_net(), retain, forget, config=CFG.replace(num_workers=1), num_groups=4)
    ctx = seen[0]
    for loader in (ctx.retain_loader, ctx.forget_loader, ctx.tune_loader):
        assert (loader.num_workers, loader.persistent_workers) == (1, True)


# -- resume: optimiser state on the CPU -----------------------------------------------------------
def test_resume_reads_the_state_on_the_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    import safetensors.torch

    retain, forget = _data()
    cfg = TrainConfig(epochs=2, batch_size=8, optimizer="adamw", device="cpu")
    unlearn(_net(), retain, forget, config=cfg, method="finetune", state_dir=tmp_path)
    devices: list[str] = []
    load_file = safetensors.torch.load_file

    def spy(path: str, device: str = "cpu") -> dict[str, torch.Tensor]:
        devices.append(device)
        return load_file(path, device=device)

    monkeypatch.setattr(safetensors.torch, "load_file", spy)
    optimizers: list[torch.optim.Optimizer] = []
    module = importlib.import_module("miu_hooks.unlearn")
    build = module.build_optimizer
    monkeypatch.setattr(module, "build_optimizer",
                        lambda m, c: optimizers.append(build(m, c)) or optimizers[-1])  # fmt: skip
    # The run's device is named "cpu:0", so the state is read where the run computes only
    # if it is read with device="cpu:0"; on a GPU that would be "cuda:0".
    unlearn(_net(), retain, forget, config=cfg, method="finetune", state_dir=tmp_path,
            resume=True, runtime=LocalRuntime(torch.device("cpu", 0)))  # fmt: skip
    assert devices == ["cpu"]
    steps = [s["step"] for s in optimizers[0].state.values()]
    assert steps and all(t.device.type == "cpu" for t in steps)


# -- fp16 loss scaling ----------------------------------------------------------------------------
class _Scaler:
    """Stands for a GradScaler: multiplies losses by a fixed scale."""

    def __init__(self, scale: float) -> None:
        self.value = scale
        self.calls = 0

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return loss * self.value


def test_adaptive_scale_uses_the_loss_scale_and_ignores_overflow() -> None:
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    ce, cal = w.sum(), 4 * w.sum()
    scaler = _Scaler(2.0**14)
    s = adaptive_calibration_scale(ce, cal, [w], scale_loss=scaler.scale)
    assert float(s) == 0.25 and scaler.calls == 2  # the ratio does not depend on the scale
    overflow = adaptive_calibration_scale(ce, cal, [w], scale_loss=_Scaler(1e38).scale)
    assert float(overflow) == 1.0  # inf/inf would be NaN: the scaler skips that step anyway


def test_salun_saliency_pass_uses_the_scaler_and_falls_back_on_overflow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from miu_hooks.config import SalUnConfig
    from miu_hooks.methods.salun import SalUn

    retain, forget = _data()
    cfg = SalUnConfig(epochs=1, batch_size=8, device="cpu", max_grad_norm=None)
    runners: list[SalUn] = []
    setup = SalUn.setup
    monkeypatch.setattr(SalUn, "setup", lambda self, ctx: (runners.append(self), setup(self, ctx)))
    scalers = (None, _Scaler(2.0**12), _Scaler(1e38))
    for scaler in scalers:
        rt = LocalRuntime(torch.device("cpu"), "fp32", scaler=scaler)
        rt.step = lambda opt: opt.step()  # type: ignore[method-assign]
        rt.backward = lambda loss: loss.backward()  # type: ignore[method-assign]
        unlearn(_net(), retain, forget, config=cfg, method="salun", num_groups=4, runtime=rt)
    assert all(s.calls > 0 for s in scalers[1:])  # the saliency pass scaled its losses
    masks = [r.mask for r in runners]
    for other in masks[1:]:  # same mask: scaled, and after the overflow's unscaled retry
        assert all(torch.equal(masks[0][n], other[n]) for n in masks[0])


def test_fp16_runs_on_cpu_with_a_real_grad_scaler() -> None:
    retain, forget = _data()
    for method, cfg in (
        ("miu", CFG.replace(precision="fp16", clip="adaptive", epochs=2)),
        ("salun", __import__("miu_hooks").SalUnConfig(epochs=1, batch_size=8, device="cpu",
                                                       precision="fp16")),
    ):  # fmt: skip
        net = _net()
        unlearn(net, retain, forget, config=cfg, method=method, num_groups=4)
        assert all(torch.isfinite(p).all() for p in net.parameters()), method
