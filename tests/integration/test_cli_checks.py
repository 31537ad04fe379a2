"""``miu-unlearn`` on inputs a new user gets wrong: each stops early, with its own exit code.

Groups that contradict their labels (10), labels or groups beyond the model's
classes (10), NaN inputs (20), inputs that do not fit the model (19: an image
size, a test set of another size), a tap of the wrong width (11), an output
folder that cannot be replaced (14), names and options that do not fit (2, 3,
a note), and the messages of an interruption.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import save_file, save_model

from miu_hooks.cli import cli
from miu_hooks.cli.inputs import work_dir

pytestmark = pytest.mark.integration

ARCH_SRC = """import torch
from torch import nn


def build():
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 2))


class Tokens(nn.Module):
    # a head applied per token: its input [B, 3, 8] flattens to 24 values, not 8
    def __init__(self):
        super().__init__()
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(48, 24))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.embed(x).view(-1, 3, 8)).mean(1)


def tokens():
    return Tokens()
"""
N = 48


def data(n: int = N, side: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    s = (torch.arange(n) // 2) % 2
    x = torch.rand(n, 3, side, side, generator=gen) * 2 - 1
    return {"inputs": x, "labels": y, "groups": s + 2 * y, "ids": torch.arange(100, 100 + n)}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli_checks")
    save_file(data(), str(root / "train.safetensors"))
    save_file(data(seed=1), str(root / "test.safetensors"))
    (root / "arch.py").write_text(ARCH_SRC)
    arch: dict = {}
    exec(compile(ARCH_SRC, str(root / "arch.py"), "exec"), arch)  # the factories above
    torch.manual_seed(0)
    save_model(arch["build"](), str(root / "model.safetensors"))
    save_model(arch["tokens"](), str(root / "tokens.safetensors"))
    (root / "forget.csv").write_text("id\n103\n107\n111\n")
    (root / "miu.json").write_text(json.dumps({"mine_hidden": 8, "mine_warmup_iters": 2,
                                               "mine_iters": 1}))  # fmt: skip
    return root


def invoke(root: Path, out: Path, *extra: str, **files: str) -> Result:
    f = {"model": "model.safetensors", "arch": "build", "data": "train.safetensors", **files}
    args = [
        "-m", str(root / f["model"]), "--arch", f"{root / 'arch.py'}:{f['arch']}",
        "-d", str(root / f["data"]), "-f", str(root / "forget.csv"),
        "--config", str(root / "miu.json"), "--epochs", "1", "--batch-size", "16",
        "--device", "cpu", "-o", str(out), *extra,
    ]  # fmt: skip
    return CliRunner().invoke(cli, args, catch_exceptions=False)


def one_error(res: Result, code: int, *words: str) -> str:
    assert res.exit_code == code, (res.exit_code, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("miu-unlearn: error: "), res.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in res.stderr
    return lines[0]


def nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists() and not work_dir(tmp_path / "out").exists()


# -- groups and labels (exit 10) ------------------------------------------------------------------
def test_a_group_that_contradicts_its_label_exits_10_naming_the_row(root, tmp_path) -> None:
    d = data()
    d["groups"][5] = 7  # label 1, group 7: S = 2 reads y = 3
    save_file(d, str(tmp_path / "bad.safetensors"))
    shutil.copy(tmp_path / "bad.safetensors", root / "bad_groups.safetensors")
    res = invoke(root, tmp_path / "out", "-q", data="bad_groups.safetensors")
    one_error(res, 10, "1 group id contradicts its label", "row 5 (id 105) has label 1 and group 7",
              "(y = 3)", "rows count from 0")  # fmt: skip
    nothing_written(tmp_path)
    # A CSV manifest: the same check, rows numbered without the header.
    pil = pytest.importorskip("PIL.Image")
    (root / "img").mkdir(exist_ok=True)
    pil.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "img" / "0.png")
    rows = [f"img/0.png,{i % 2},{(i // 2) % 2 + 2 * (i % 2)}" for i in range(N)]
    rows[4] = "img/0.png,0,7"
    (root / "labels.csv").write_text("path,label,group\n" + "\n".join(rows) + "\n")
    (root / "rows.csv").write_text("id\n1\n")
    res = CliRunner().invoke(cli, ["-m", str(root / "model.safetensors"), "--arch",
                                   f"{root / 'arch.py'}:build", "-d", str(root / "labels.csv"),
                                   "-f", str(root / "rows.csv"), "-o", str(tmp_path / "out")])
    one_error(res, 10, "row 4 has label 0 and group 7")  # fmt: skip


def test_labels_beyond_the_models_classes_exit_10_before_any_evaluation(root, tmp_path) -> None:
    d = data()
    d["labels"][6], d["groups"][6] = 3, 7  # consistent, but the model has 2 classes
    save_file(d, str(root / "four_classes.safetensors"))
    res = invoke(root, tmp_path / "out", "-q", "--test", str(root / "test.safetensors"),
                 data="four_classes.safetensors")  # fmt: skip
    line = one_error(res, 10, "label 3 is outside [0, 2), the model's classes")
    assert "num_groups=8 with S=2 means 4 classes" in line
    nothing_written(tmp_path)


# -- inputs (exit 20 and 19) ----------------------------------------------------------------------
def test_nan_inputs_exit_20_naming_the_row(root, tmp_path) -> None:
    d = data()
    d["inputs"][9, 0, 1, 1] = float("nan")
    save_file(d, str(root / "nan.safetensors"))
    res = invoke(root, tmp_path / "out", "-q", data="nan.safetensors")
    one_error(res, 20, "the inputs of row 9 (id 109) hold NaN or Inf")
    nothing_written(tmp_path)


def test_inputs_that_do_not_fit_the_model_exit_19(root, tmp_path) -> None:
    save_file(data(side=8), str(root / "test8.safetensors"))
    res = invoke(root, tmp_path / "out", "-q", "--test", str(root / "test8.safetensors"))
    one_error(res, 19, "--test", "test8.safetensors", "forward fails on its first sample",
              "[3, 8, 8]")  # fmt: skip
    nothing_written(tmp_path)
    # An image manifest resized to another side than the model takes (--image-size).
    pil = pytest.importorskip("PIL.Image")
    (root / "img").mkdir(exist_ok=True)
    rows = []
    for i in range(N):
        pil.fromarray(np.full((4, 4, 3), 10 * (i % 20), np.uint8)).save(root / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{i % 2},{(i // 2) % 2 + 2 * (i % 2)},{100 + i}")
    (root / "manifest.csv").write_text("path,label,group,id\n" + "\n".join(rows) + "\n")
    res = invoke(root, tmp_path / "out", "-q", "--image-size", "8", data="manifest.csv")
    one_error(res, 19, "forward fails on one retain sample (inputs of shape [3, 8, 8])")
    nothing_written(tmp_path)
    assert invoke(root, tmp_path / "out", "-q", "--image-size", "4", data="manifest.csv"
                  ).exit_code == 0  # fmt: skip


# -- the tap (exit 11) -----------------------------------------------------------------------------
def test_a_tap_of_the_wrong_width_exits_11_before_any_work(root, tmp_path) -> None:
    res = invoke(root, tmp_path / "out", "-q", model="tokens.safetensors", arch="tokens")
    one_error(res, 11, "'head' flattens to 24 values", "feature_module=")
    nothing_written(tmp_path)
    # Found before the original model is evaluated (the phases are printed without -q).
    res = invoke(root, tmp_path / "out", model="tokens.safetensors", arch="tokens")
    assert res.exit_code == 11 and "run: load" in res.stderr
    assert "evaluate original" not in res.stderr


# -- the output folder (exit 14) ---------------------------------------------------------------
def test_an_output_folder_that_cannot_be_replaced_exits_14_up_front(root, tmp_path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    if shutil.which("chattr") is None or subprocess.run(
        ["chattr", "+i", str(out)], capture_output=True, check=False
    ).returncode:
        pytest.skip("chattr +i is not available here (needs root and a supporting file system)")
    try:
        res = invoke(root, out, "-q")
    finally:
        subprocess.run(["chattr", "-i", str(out)], check=True)
    one_error(res, 14, "exists but cannot be replaced")
    assert os.listdir(tmp_path) == ["out"]  # no work folder: found before the run


def test_an_output_folder_that_cannot_be_renamed_exits_14_on_any_file_system(
    root, tmp_path, monkeypatch
) -> None:
    """The same check without chattr: the run's last step renames the folder, so must the probe."""
    import errno

    import miu_hooks.cli.inputs as inputs_module

    out = tmp_path / "out"
    out.mkdir()
    real = os.rename

    def busy(src, dst, *args, **kwargs):
        if Path(src) == out:
            raise OSError(errno.EBUSY, "Device or resource busy", str(src))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(inputs_module.os, "rename", busy)
    res = invoke(root, out, "-q")
    one_error(res, 14, "exists but cannot be replaced", "Device or resource busy")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == []  # found before the run


# -- names, options, messages ------------------------------------------------------------------
def test_group_names_must_name_every_group(root, tmp_path) -> None:
    one_error(invoke(root, tmp_path / "out", "-q", "--group-names", "a,b"), 2,
              "--group-names gives 2 names for 4 groups")  # fmt: skip
    nothing_written(tmp_path)


def test_forget_epochs_beyond_epochs_get_a_note(root, tmp_path) -> None:
    res = invoke(root, tmp_path / "out", "--forget-epochs", "9")
    assert res.exit_code == 0, res.stderr
    assert "note: forget epochs (9) exceed epochs (1): every epoch has a forget pass" in res.stderr


def test_a_missing_reference_is_named_as_the_reference(root, tmp_path) -> None:
    res = invoke(root, tmp_path / "out", "-q", "--test", str(root / "test.safetensors"),
                 "--reference", f"R={tmp_path / 'nope'}/")  # fmt: skip
    one_error(res, 3, "--reference 'R' not found")


def test_an_interruption_names_what_stopped_the_run(root, tmp_path, monkeypatch) -> None:
    import miu_hooks.cli.run as run_module
    from miu_hooks.cli.errors import Interrupted

    for raised, code, shown in ((KeyboardInterrupt(), 130, "(Ctrl-C)"),
                                (Interrupted(15), 143, "(SIGTERM)")):  # fmt: skip
        def stop(*args, exc=raised, **kwargs):
            raise exc

        monkeypatch.setattr(run_module, "unlearn", stop)
        res = invoke(root, tmp_path / "out", "-q")
        assert res.exit_code == code
        assert f"miu-unlearn: interrupted {shown}; finished work is kept" in res.stderr
        assert "()" not in res.stderr
