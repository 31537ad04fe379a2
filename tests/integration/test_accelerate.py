"""Accelerate integration: in-process checks, 2-process (gloo) agreement, bf16 on CPU.

The multi-process tests launch real ranks (``torchrun --standalone`` with
``Accelerator(cpu=True)``, or ``ACCELERATE_USE_CPU=true accelerate launch --multi_gpu``);
every script asserts the world size it expects, so a launcher that silently
starts fewer processes fails the test.

Agreement contract (docs/integrations.md §7): one process at batch 2B and two
processes at batch B each give the same losses and weights within rtol 1e-5
(measured: about 2e-7 relative); the two ranks hold bit-identical weights.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from model_trace import assert_no_trace, snapshot
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from miu_hooks.config import MIUConfig

_spec = importlib.util.spec_from_file_location(
    "miu_test_launch", Path(__file__).resolve().parent / "scripts" / "launch.py"
)
assert _spec is not None and _spec.loader is not None
launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch)
REPO, SCRIPTS = launch.REPO, launch.SCRIPTS
single, torchrun, accelerate_launch, _load = (
    launch.single,
    launch.torchrun,
    launch.accelerate_launch,
    launch.load,
)
RUN = SCRIPTS / "accelerate_run.py"
RTOL, ATOL = 1e-5, 1e-6
EXAMPLE_ARGS = ("--train-epochs", "2", "--epochs", "2")


# -- in-process (one rank) ----------------------------------------------------------------


@pytest.fixture
def fresh_accelerate() -> Iterator[None]:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _tiny_setup(reweight: bool = True) -> tuple[Any, ...]:
    from accelerate import Accelerator

    from miu_hooks.integrations.accelerate import reweighted_loader

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(48, 4, generator=gen), torch.randint(0, 2, (48,), generator=gen)
    g = y * 2 + torch.randint(0, 2, (48,), generator=gen)
    retain = TensorDataset(x[8:], y[8:], g[8:])
    forget = TensorDataset(x[:8], y[:8], g[:8])
    cfg = MIUConfig(mine_hidden=8, mine_warmup_iters=3, mine_iters=2, reweight=reweight)
    acc = Accelerator(cpu=True)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    retain_loader = (
        reweighted_loader(retain, forget, 8, config=cfg)
        if reweight
        else DataLoader(retain, batch_size=8, shuffle=True)
    )
    net, opt, retain_loader = acc.prepare(net, opt, retain_loader)
    return acc, net, opt, retain_loader, DataLoader(forget, batch_size=8), cfg


@pytest.mark.integration
def test_reweight_needs_the_reweighted_loader(fresh_accelerate: None) -> None:
    from accelerate import Accelerator

    from miu_hooks.integrations.accelerate import prepare_miu

    acc = Accelerator(cpu=True)
    ds = TensorDataset(torch.randn(16, 4), torch.randint(0, 2, (16,)), torch.arange(16) % 4)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loader = DataLoader(ds, batch_size=4, shuffle=True)
    net, opt, loader = acc.prepare(net, opt, loader)
    with pytest.raises(ValueError, match="reweighted_loader"):
        prepare_miu(acc, net, opt, loader, DataLoader(ds, batch_size=4), config=MIUConfig())


@pytest.mark.integration
def test_epoch_start_leaves_accelerate_state_clean(fresh_accelerate: None) -> None:
    from miu_hooks.integrations.accelerate import AccelerateRuntime, prepare_miu

    acc, net, opt, retain_loader, forget_loader, cfg = _tiny_setup()
    clean = snapshot(net)
    miu = prepare_miu(acc, net, opt, retain_loader, forget_loader, config=cfg)
    assert isinstance(miu.runtime, AccelerateRuntime) and miu.runtime.world_size == 1
    assert miu in acc._custom_objects  # registered for save_state/load_state
    before = [p.detach().clone() for p in net.parameters()]
    miu.epoch_start(0)
    # the abandoned critic-tuning iteration must not stay registered as the active loader
    assert not acc.gradient_state.in_dataloader
    assert acc.sync_gradients
    assert all(p.grad is None for p in net.parameters())  # the next retain step starts clean
    assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters(), strict=True))
    assert miu.handle.counters["tune"] == cfg.mine_warmup_iters and miu.handle.counters["forget"]
    x, y, g = next(iter(retain_loader))
    loss = miu.retain_loss(net(x), (x, y, g))
    acc.backward(loss)
    assert torch.isfinite(loss) and all(p.grad is not None for p in net.parameters())
    assert {"miu/calibration", "miu/ce", "miu/forget_mi"} <= set(miu.pop_logs())
    miu.remove()
    assert_no_trace(net, clean)  # no hook, flag or patched forward left on the model


@pytest.mark.integration
def test_reweight_off_accepts_a_plain_loader(fresh_accelerate: None) -> None:
    from miu_hooks.integrations.accelerate import prepare_miu

    acc, net, opt, retain_loader, forget_loader, cfg = _tiny_setup(reweight=False)
    miu = prepare_miu(acc, net, opt, retain_loader, forget_loader, config=cfg)
    state = miu.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert any(k.startswith("critic_model.") for k in state)
    miu.load_state_dict(state)
    miu.remove()


# -- multi-process ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Lazily run the raw loop once per configuration (shared by the tests below)."""
    return {"dir": tmp_path_factory.mktemp("accelerate_runs")}


def _run_once(runs: dict[str, Any], key: str, launch: Any, *args: str) -> dict[str, Any]:
    if key not in runs:
        out = runs["dir"] / f"{key}.pt"
        launch(RUN, *args, "--out", str(out), cwd=runs["dir"])
        runs[key] = _load(out)
    return runs[key]


def one_process_fp32(runs: dict[str, Any]) -> dict[str, Any]:
    return _run_once(runs, "p1", single, "--expect-world", "1", "--batch", "8", "--grad-accum", "2")


def two_processes_fp32(runs: dict[str, Any]) -> dict[str, Any]:
    ckpt = str(runs["dir"] / "ckpt")
    return _run_once(
        runs,
        "p2",
        torchrun,
        "--expect-world", "2", "--batch", "4", "--grad-accum", "2", "--save-state", ckpt,
        "--runtime-checks",
    )  # fmt: skip


@pytest.mark.integration
@pytest.mark.multiprocess
@pytest.mark.slow
def test_distributed_runtime_two_ranks(runs: dict[str, Any]) -> None:
    # dist_runtime_check.run_checks ran on both ranks inside the 2-process raw-loop run:
    # gather order/values/backward, unequal-batch error, all_reduce_mean, bucketed
    # gradient averaging, and global-batch MI == single-process MI (loss and gradients).
    assert two_processes_fp32(runs)["runtime_checks"]


@pytest.mark.integration
@pytest.mark.multiprocess
@pytest.mark.slow
def test_raw_loop_two_processes_match_one_process(runs: dict[str, Any]) -> None:
    one, two = one_process_fp32(runs), two_processes_fp32(runs)
    assert (one["world"], two["world"]) == (1, 2)
    assert two["max_rank_diff"] == 0.0  # bit-identical model and critics on both ranks
    assert one["counters"] == two["counters"]
    torch.testing.assert_close(
        torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=RTOL, atol=ATOL
    )
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=RTOL, atol=ATOL)
    for name, value in one["critic_model"].items():
        torch.testing.assert_close(two["critic_model"][name], value, rtol=RTOL, atol=ATOL)
    for e1, e2 in zip(one["logs"], two["logs"], strict=True):
        for key in ("miu/mi_model", "miu/mi_original", "miu/tune_mi_model"):
            assert abs(e1[key] - e2[key]) <= ATOL + RTOL * abs(e1[key]), (key, e1, e2)
    # the run unlearned something: the forget-pass MI was minimised from a non-zero value
    assert one["logs"][0]["miu/forget_mi"] != 0.0


@pytest.mark.integration
@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_process_checkpoint_restores_critics(runs: dict[str, Any]) -> None:
    two = two_processes_fp32(runs)
    assert two["critic_changed_after_save"] and two["critic_restored"]
    assert two["epoch_after_load"] == 0


@pytest.mark.integration
@pytest.mark.slow
def test_bf16_on_cpu_is_finite_and_close_to_fp32(runs: dict[str, Any]) -> None:
    fp32 = one_process_fp32(runs)
    bf16 = _run_once(
        runs,
        "bf16",
        single,
        "--expect-world", "1", "--batch", "8", "--grad-accum", "2", "--precision", "bf16",
    )  # fmt: skip
    losses = torch.tensor(bf16["losses"])
    assert torch.isfinite(losses).all()
    assert not torch.equal(losses, torch.tensor(fp32["losses"]))  # autocast really ran
    torch.testing.assert_close(losses, torch.tensor(fp32["losses"]), rtol=0.02, atol=0.01)
    for e32, e16 in zip(fp32["logs"], bf16["logs"], strict=True):
        for key in ("miu/mi_model", "miu/mi_original", "miu/forget_mi", "miu/calibration"):
            if key in e32:
                assert abs(e16[key] - e32[key]) <= 5e-3 + 0.05 * abs(e32[key]), (key, e32, e16)


@pytest.mark.integration
def test_run_script_fails_loudly_on_a_missing_rank(tmp_path: Path) -> None:
    # What a launcher that silently starts one process (accelerate launch --cpu
    # --num_processes 2) looks like to the script: it must fail, not pass.
    with pytest.raises(AssertionError, match="expected 2 processes, got 1"):
        single(RUN, "--expect-world", "2", "--batch", "8", cwd=tmp_path)


@pytest.mark.integration
@pytest.mark.slow
def test_example_single_process(tmp_path: Path) -> None:
    out = single(REPO / "examples" / "accelerate_loop.py", "--cpu", "--expect-world", "1",
                 *EXAMPLE_ARGS, cwd=tmp_path)  # fmt: skip
    assert "ranks agree: 1 process(es), max |diff| = 0.0" in out


@pytest.mark.integration
@pytest.mark.multiprocess
@pytest.mark.slow
def test_example_two_processes_accelerate_launch(tmp_path: Path) -> None:
    out = accelerate_launch(REPO / "examples" / "accelerate_loop.py", "--expect-world", "2",
                            *EXAMPLE_ARGS, cwd=tmp_path)  # fmt: skip
    assert "ranks agree: 2 process(es), max |diff| = 0.0" in out
