"""``miu-unlearn`` input formats and options: image manifests, datasets folders, every method."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from miu_hooks.cli import cli
from miu_hooks.cli.load import image_settings, load_dataset
from miu_hooks.methods import available_methods

pytestmark = pytest.mark.integration

ARCH_SRC = """from torch import nn


def build():
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 2))
"""
N = 48


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli_inputs")
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(N) % 2
    s = (torch.arange(N) // 2) % 2
    x = torch.rand(N, 3, 4, 4, generator=gen) * 2 - 1
    save_file({"inputs": x, "labels": y, "groups": s + 2 * y}, str(root / "train.safetensors"))
    (root / "arch.py").write_text(ARCH_SRC)
    torch.manual_seed(0)
    save_model(
        nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 2)),
        str(root / "model.safetensors"),
    )
    (root / "forget.csv").write_text("id,why\n3,request\n7,request\n11,request\n")
    cfg = {"mine_hidden": 8, "mine_warmup_iters": 2, "mine_iters": 1}
    (root / "miu.json").write_text(json.dumps(cfg))
    (root / "loop.json").write_text("{}")  # the methods that take TrainConfig have no MIU knobs
    return root


def invoke(root: Path, out: Path, *extra: str, data: str = "train.safetensors") -> Result:
    args = [
        "-m",
        str(root / "model.safetensors"),
        "--arch",
        f"{root / 'arch.py'}:build",
        "-d",
        str(root / data),
        "-f",
        str(root / "forget.csv"),
        "--config",
        str(root / "miu.json"),
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "-o",
        str(out),
        *extra,
    ]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.mark.parametrize("method", available_methods())
def test_every_registered_method_runs(root: Path, tmp_path: Path, method: str) -> None:
    config = root / ("miu.json" if method == "miu" else "loop.json")
    res = invoke(root, tmp_path / "out", "--method", method, "--config", str(config), "-q")
    assert res.exit_code == 0, res.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["method"] == method and report["forgotten"] == 3
    # The report records what ran: the name says whether REWEIGHT was on.
    assert report["config"]["reweight"] is (method == "miu" or method.endswith("_reweight"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--method", "finetune_reweight", "--no-reweight"), "runs with REWEIGHT"),
        (("--method", "retrain", "--reweight"), "runs without REWEIGHT"),
        (("--method", "finetune", "--lambda", "3"), "mi_weight=3.0: it is a setting of MIUConfig"),
        (("--method", "neggrad_reweight"), "no retain pass"),
    ],
)
def test_settings_that_contradict_the_method_exit_2(
    root: Path, tmp_path: Path, options: tuple[str, ...], message: str
) -> None:
    res = invoke(root, tmp_path / "out", *options, "--config", str(root / "loop.json"), "-q")
    assert res.exit_code == 2 and message in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_image_manifest(root: Path, tmp_path: Path) -> None:
    image_mod = pytest.importorskip("PIL.Image")
    pixels = np.random.default_rng(0).integers(0, 256, (N, 8, 8, 3), dtype=np.uint8)
    (root / "img").mkdir(exist_ok=True)
    rows = ["path,label,group,id"]
    data = load_file(str(root / "train.safetensors"))
    for i in range(N):
        image_mod.fromarray(pixels[i]).save(root / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{int(data['labels'][i])},{int(data['groups'][i])},{i}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    res = invoke(root, tmp_path / "out", "--image-size", "4", "--json", data="manifest.csv")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["inputs"]["data"].endswith("manifest.csv")
    from miu_hooks.cli.commands import image_workers

    # Images are decoded in worker processes unless --num-workers says otherwise.
    assert report["config"]["num_workers"] == image_workers() >= 1
    # The documented transform: RGB, bilinear resize, [0, 1], mean = std = 0.5.
    from miu_hooks.cli.data_index import read_data_index
    from miu_hooks.cli.inputs import resolve_model_source

    source = resolve_model_source(root / "model.safetensors", f"{root / 'arch.py'}:build")
    side, mode = image_settings(source, 4)
    x, label, group = load_dataset(read_data_index(root / "manifest.csv"), side=side, mode=mode)[5]
    expected = image_mod.fromarray(pixels[5]).resize((4, 4), image_mod.Resampling.BILINEAR)
    want = (np.asarray(expected, dtype=np.float32).transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    assert torch.allclose(x, torch.from_numpy(want)) and (side, mode) == (4, "RGB")
    assert (int(label), int(group)) == (int(data["labels"][5]), int(data["groups"][5]))


def test_manifest_with_a_missing_image_exits_3(root: Path, tmp_path: Path) -> None:
    (root / "broken.csv").write_text("path,label,group\nimg/none.png,0,0\n")
    res = invoke(root, tmp_path / "out", "-q", data="broken.csv")
    assert res.exit_code == 3 and "image file(s) not found" in res.stderr
    assert not (tmp_path / "out").exists()


def test_datasets_folder_needs_the_optional_package(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import miu_hooks._imports as imports

    real = imports.is_available
    monkeypatch.setattr(imports, "is_available", lambda name: name != "datasets" and real(name))
    (root / "hf_data").mkdir(exist_ok=True)
    res = invoke(root, tmp_path / "out", "-q", data="hf_data")
    assert res.exit_code == 15 and "datasets" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_missing_matplotlib_skips_the_plot_with_a_note(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    res = invoke(root, tmp_path / "out")
    assert res.exit_code == 0, res.stderr
    out = tmp_path / "out"
    assert not (out / "groups.png").exists() and (out / "model.safetensors").is_file()
    assert "groups.png skipped" in (out / "report.md").read_text()
    assert "note: groups.png skipped" in res.stderr


def test_forget_groups_option_sets_eo_and_ga_groups(root: Path, tmp_path: Path) -> None:
    res = invoke(root, tmp_path / "out", "--forget-groups", "1,3", "-q")
    assert res.exit_code == 0, res.stderr
    assert json.loads((tmp_path / "out" / "report.json").read_text())["forget_groups"] == [1, 3]
    res = invoke(root, tmp_path / "bad", "--forget-groups", "9", "-q")
    assert res.exit_code == 10 and "--forget-groups" in res.stderr


def _datasets_folder(root: Path, splits: dict[str, slice]) -> Path:
    """A DatasetDict folder of train.safetensors' samples, columns named the Trainer's way."""
    datasets = pytest.importorskip("datasets")
    data = load_file(str(root / "train.safetensors"))
    parts = {
        name: datasets.Dataset.from_dict(
            {
                "pixel_values": data["inputs"][rows].tolist(),
                "labels": data["labels"][rows].tolist(),
                "group": data["groups"][rows].tolist(),
            }
        )
        for name, rows in splits.items()
    }
    folder = root / ("dd_" + "_".join(splits))
    datasets.DatasetDict(parts).save_to_disk(str(folder))
    return folder


def test_datasets_folder_with_labels_and_pixel_values_and_a_split_per_path(
    root: Path, tmp_path: Path
) -> None:
    folder = _datasets_folder(root, {"train": slice(None), "test": slice(0, 20)})
    # `labels` and `pixel_values` are found without --label-key/--input-key; --data takes
    # the train split, --test FOLDER:test the test split of the same folder.
    res = invoke(root, tmp_path / "out", "-q", "--json", "--test", f"{folder}:test",
                 data=folder.name)  # fmt: skip
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["forgotten"] == 3 and report["inputs"]["test"] == str(folder)
    from miu_hooks.cli.data_index import read_data_index

    train, test = read_data_index(folder), read_data_index(f"{folder}:test")
    assert (len(train), train.split, train.keys["label"], train.keys["input"]) == (
        N, "train", "labels", "pixel_values")  # fmt: skip
    assert (len(test), test.split) == (20, "test")
    # --test FOLDER takes its test split by default; --split names the data's split.
    assert len(read_data_index(folder, default_split="test")) == 20
    assert len(read_data_index(folder, split="test")) == 20
    # A column named by an option is not silently swapped for another.
    res = invoke(root, tmp_path / "out2", "-q", "--input-key", "image", data=folder.name)
    assert res.exit_code == 6 and "no input column 'image'" in res.stderr, res.stderr


def test_datasets_folder_splits_are_named_or_refused(root: Path, tmp_path: Path) -> None:
    folder = _datasets_folder(root, {"a": slice(None), "b": slice(0, 8)})
    res = invoke(root, tmp_path / "out", "-q", data=folder.name)  # no train split
    assert res.exit_code == 6, res.stderr
    assert "has no split 'train' (splits: a, b)" in res.stderr and ":SPLIT" in res.stderr
    res = invoke(root, tmp_path / "out", "-q", data=f"{folder.name}:c")
    assert res.exit_code == 6 and "has no split 'c' (splits: a, b)" in res.stderr
    assert not (tmp_path / "out").exists()
    res = invoke(root, tmp_path / "out", "-q", data=f"{folder.name}:a")
    assert res.exit_code == 0, res.stderr
