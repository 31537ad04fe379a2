"""``miu-unlearn`` interrupted by SIGTERM or Ctrl-C, then ``--resume``: same final weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from miu_hooks.cli import cli
from miu_hooks.cli.inputs import work_dir
from miu_hooks.unlearn import STATE_FILE

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EPOCHS = 4
ARCH_SRC = """from torch import nn


def build():
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 2))
"""
# No --test: the run skips MIA's random forests, which would dominate its time.
# The signal lands within milliseconds of epoch 0's state file; epochs 1-3 and the
# final evaluation (about a second each) leave ample time.
CONFIG = {"mine_hidden": 32, "mine_warmup_iters": 10, "mine_iters": 10}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume_ws")
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (256,), generator=gen)
    s = torch.randint(0, 2, (256,), generator=gen)
    x = torch.randn(256, 3, 4, 4, generator=gen) + (2.0 * y - 1).view(-1, 1, 1, 1)
    save_file({"inputs": x, "labels": y, "groups": s + 2 * y}, str(root / "train.safetensors"))
    (root / "arch.py").write_text(ARCH_SRC)
    torch.manual_seed(0)
    save_model(
        nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 2)),
        str(root / "model.safetensors"),
    )
    (root / "forget.csv").write_text("id\n" + "\n".join(str(i) for i in range(0, 60, 3)) + "\n")
    (root / "miu.json").write_text(json.dumps(CONFIG))
    return root


def args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "-m",
        str(root / "model.safetensors"),
        "--arch",
        f"{root / 'arch.py'}:build",
        "-d",
        str(root / "train.safetensors"),
        "-f",
        str(root / "forget.csv"),
        "--config",
        str(root / "miu.json"),
        "--epochs",
        str(EPOCHS),
        "--forget-epochs",
        "2",
        "--batch-size",
        "16",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--seed",
        "3",
        "-o",
        str(out),
        *extra,
    ]


def command() -> list[str]:
    script = Path(sys.executable).parent / "miu-unlearn"
    return [str(script)] if script.exists() else [sys.executable, "-m", "miu_hooks.cli"]


@pytest.fixture(scope="module")
def uninterrupted(
    inputs: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("reference") / "out"
    result = CliRunner().invoke(cli, args(inputs, out, "-q"), catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return load_file(str(out / "model.safetensors"))


def interrupt(inputs: Path, out: Path, sig: int) -> subprocess.CompletedProcess[str]:
    """Start a run, send ``sig`` once the first epoch's state file exists, and wait."""
    state = work_dir(out) / STATE_FILE
    proc = subprocess.Popen(
        [*command(), *args(inputs, out, "-q")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def finished_epoch(out: Path) -> int:
    with safe_open(str(work_dir(out) / STATE_FILE), framework="pt") as f:
        return int(f.metadata()["epoch"])


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sigterm_then_resume_gives_the_uninterrupted_weights(
    inputs: Path, uninterrupted: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    stopped = interrupt(inputs, out, signal.SIGTERM)
    assert stopped.returncode == 143, stopped.stderr
    lines = stopped.stderr.strip().splitlines()
    assert len(lines) == 1 and "interrupted (SIGTERM)" in lines[0] and "--resume" in lines[0]
    assert "Traceback" not in stopped.stderr
    # No half-written model: the output folder does not exist, only the work folder.
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [work_dir(out).name]
    work = sorted(p.name for p in work_dir(out).iterdir())
    assert not [n for n in work if n.endswith(".tmp")], work
    done = finished_epoch(out)
    assert 0 <= done < EPOCHS - 1, "the signal should land mid-run"

    # A resume with other settings is refused and keeps the work.
    changed = CliRunner().invoke(cli, args(inputs, out, "--resume", "--lr", "0.5"))
    assert changed.exit_code == 4 and "other inputs or settings" in changed.stderr
    assert finished_epoch(out) == done

    resumed = subprocess.run(
        [*command(), *args(inputs, out, "--resume")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    # The epoch counter goes on from where the run stopped (not from 1).
    counts = [ln.split(": ")[1] for ln in resumed.stderr.splitlines() if " epochs: " in ln]
    assert counts == [f"{e}/{EPOCHS}" for e in range(done + 2, EPOCHS + 1)], resumed.stderr
    assert_same(load_file(str(out / "model.safetensors")), uninterrupted)
    assert not work_dir(out).exists()


def test_ctrl_c_then_resume_in_process(
    inputs: Path, uninterrupted: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    stopped = interrupt(inputs, out, signal.SIGINT)
    assert stopped.returncode == 130, stopped.stderr
    assert "interrupted (Ctrl-C)" in stopped.stderr and "Traceback" not in stopped.stderr
    assert not out.exists() and work_dir(out).is_dir()
    result = CliRunner().invoke(cli, args(inputs, out, "--resume"), catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert "resuming" in result.stderr
    assert_same(load_file(str(out / "model.safetensors")), uninterrupted)


def test_a_fresh_run_discards_stale_work(inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    work_dir(out).mkdir()
    (work_dir(out) / "run.json").write_text("{}")
    result = CliRunner().invoke(cli, args(inputs, out, "--epochs", "1"), catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert "discarding" in result.stderr
    assert not work_dir(out).exists() and (out / "model.safetensors").is_file()
    assert os.listdir(tmp_path) == ["out"]
