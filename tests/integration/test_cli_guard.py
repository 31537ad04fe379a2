"""``miu-unlearn`` and the collapse guard: a forced collapse is restored and reported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from miu_hooks.cli import cli
from miu_hooks.methods.finetune import FineTune

pytestmark = pytest.mark.integration

ARCH_SRC = """from torch import nn


def build():
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 2))
"""


def _data(n: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    s = torch.randint(0, 2, (n,), generator=gen)
    x = torch.randn(n, 3, 4, 4, generator=gen) + (2.0 * y - 1).view(-1, 1, 1, 1)
    return {"inputs": x, "labels": y, "groups": s + 2 * y, "ids": torch.arange(n)}


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli_guard")
    train = _data(256, 0)
    for name, data in (("train", train), ("test", _data(128, 1)), ("val", _data(128, 2))):
        save_file(data, str(root / f"{name}.safetensors"))
    (root / "arch.py").write_text(ARCH_SRC)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(50):  # a trained original: the classes are separable
        opt.zero_grad()
        nn.functional.cross_entropy(net(train["inputs"]), train["labels"]).backward()
        opt.step()
    save_model(net, str(root / "model.safetensors"))
    ids = train["ids"][train["groups"] == 3][:20].tolist()
    (root / "forget.csv").write_text("id\n" + "\n".join(map(str, ids)) + "\n")
    return root


def _run(ws: Path, out: Path, *extra: str) -> Any:
    args = ["-m", str(ws / "model.safetensors"), "--arch", f"{ws / 'arch.py'}:build",
            "-d", str(ws / "train.safetensors"), "-f", str(ws / "forget.csv"),
            "--test", str(ws / "test.safetensors"), "--method", "finetune", "--epochs", "3",
            "--batch-size", "32", "--lr", "0.01", "--device", "cpu", "--threads", "1",
            "-o", str(out), *extra]  # fmt: skip
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.fixture()
def wreck_epoch_1(monkeypatch: pytest.MonkeyPatch) -> None:
    original = FineTune.run_epoch

    def run_epoch(self: Any, ctx: Any, epoch: int) -> None:
        original(self, ctx, epoch)
        if epoch == 1:
            with torch.no_grad():
                ctx.model[3].bias[0] += 1e4  # every input is now class 0

    monkeypatch.setattr(FineTune, "run_epoch", run_epoch)


def test_cli_guard_restores_and_reports(ws: Path, tmp_path: Path, wreck_epoch_1: None) -> None:
    res = _run(ws, tmp_path / "out", "--val", str(ws / "val.safetensors"))
    assert res.exit_code == 0, res.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    guard = report["guard"]
    assert guard["fired"] and guard["failed_epoch"] == 1 and guard["restored_epoch"] == 0
    assert guard["source"] == "val" and guard["original_accuracy"] > 90
    assert "Collapse guard: FIRED" in res.stdout and "warning: collapse guard" in res.stderr
    assert "Collapse guard: FIRED" in (tmp_path / "out" / "report.md").read_text()
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert float(saved["3.bias"][0]) < 100  # epoch 0's weights, not the wrecked ones
    assert report["models"]["unlearned"]["TA"] > 90


def test_cli_no_guard_keeps_the_collapsed_weights(ws: Path, tmp_path: Path,
                                                   wreck_epoch_1: None) -> None:  # fmt: skip
    res = _run(ws, tmp_path / "out", "--val", str(ws / "val.safetensors"), "--no-guard")
    assert res.exit_code == 0, res.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["guard"]["enabled"] is False and report["config"]["guard"] is False
    assert "Collapse guard: off" in res.stdout
    assert float(load_file(str(tmp_path / "out" / "model.safetensors"))["3.bias"][0]) > 1e3


def test_cli_guard_off_on_a_tiny_retain_set_says_why(ws: Path, tmp_path: Path) -> None:
    res = _run(ws, tmp_path / "out")  # 236 retain samples: a tenth is under 50
    assert res.exit_code == 0, res.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["guard"]["enabled"] is False and "pass --val" in report["guard"]["reason"]
    assert "note: collapse guard off" in res.stderr and "Traceback" not in res.stderr


def test_cli_retrain_reinitialises_and_defaults_clip(ws: Path, tmp_path: Path) -> None:
    res = _run(ws, tmp_path / "out", "--method", "retrain", "--epochs", "1", "--lr", "1e-6")
    assert res.exit_code == 0, res.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["config"]["reinit"] is True and report["config"]["max_grad_norm"] == 1.0
    given = load_file(str(ws / "model.safetensors"))
    saved = load_file(str(tmp_path / "out" / "model.safetensors"))
    # lr 1e-6 for one epoch cannot move trained weights far: these are fresh ones.
    assert (saved["1.weight"] - given["1.weight"]).abs().mean() > 0.05
