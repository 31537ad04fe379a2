"""``miu-unlearn`` end to end: runs, bad input (CliRunner and real subprocesses), --help speed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from miu_hooks.cli import cli

pytestmark = pytest.mark.integration

ARCH_SRC = """from torch import nn


def build():
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 2))
"""
FAST = {"mine_hidden": 16, "mine_warmup_iters": 5, "mine_iters": 2}
OUTPUTS = {"model.safetensors", "report.json", "report.md", "groups.png", "ledger.json",
           "forgotten.csv"}  # fmt: skip


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_data(n: int, seed: int, size: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    s = torch.randint(0, 2, (n,), generator=gen)
    x = torch.randn(n, 3, size, size, generator=gen) + (2.0 * y - 1).view(-1, 1, 1, 1)
    return {"inputs": x, "labels": y, "groups": s + 2 * y, "ids": torch.arange(100, 100 + n)}


def build_arch() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 2))


@dataclass
class Workspace:
    root: Path
    model: Path
    arch: Path
    train: Path
    test: Path
    forget: Path
    config: Path
    groups: torch.Tensor
    ids: torch.Tensor

    def args(self, out: Path, *extra: str) -> list[str]:
        return [
            "-m",
            str(self.model),
            "--arch",
            f"{self.arch}:build",
            "-d",
            str(self.train),
            "-f",
            str(self.forget),
            "--test",
            str(self.test),
            "--config",
            str(self.config),
            "--epochs",
            "2",
            "--forget-epochs",
            "1",
            "--batch-size",
            "32",
            "--threads",
            "1",
            "--device",
            "cpu",
            "-o",
            str(out),
            *extra,
        ]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    root = tmp_path_factory.mktemp("cli_ws")
    train = make_data(256, 0)
    save_file(train, str(root / "train.safetensors"))
    save_file(make_data(128, 1), str(root / "test.safetensors"))
    (root / "arch.py").write_text(ARCH_SRC)
    torch.manual_seed(0)
    save_model(build_arch(), str(root / "model.safetensors"))
    forget_ids = train["ids"][train["groups"] == 3][:20].tolist()
    (root / "forget.csv").write_text("id\n" + "\n".join(map(str, forget_ids)) + "\n")
    (root / "miu.json").write_text(json.dumps(FAST))
    return Workspace(
        root,
        root / "model.safetensors",
        root / "arch.py",
        root / "train.safetensors",
        root / "test.safetensors",
        root / "forget.csv",
        root / "miu.json",
        train["groups"],
        train["ids"],
    )


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


def console_script() -> list[str]:
    script = Path(sys.executable).parent / "miu-unlearn"
    return [str(script)] if script.exists() else [sys.executable, "-m", "miu_hooks.cli"]


def run_runner(args: list[str]) -> Outcome:
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    return Outcome(result.exit_code, result.stdout, result.stderr)


def run_subprocess(args: list[str], cwd: Path | None = None) -> Outcome:
    proc = subprocess.run(
        [*console_script(), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        check=False,
    )
    return Outcome(proc.returncode, proc.stdout, proc.stderr)


RUNNERS: dict[str, Callable[[list[str]], Outcome]] = {
    "runner": run_runner,
    "subprocess": run_subprocess,
}


def leftovers(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}"))


# --------------------------------------------------------------------------- happy paths


def test_arch_run_writes_the_output_folder(ws: Workspace, tmp_path: Path) -> None:
    before = sha(ws.model)
    out = tmp_path / "out"
    res = run_runner(ws.args(out, "--json"))
    assert res.code == 0, res.stderr
    report = json.loads(res.stdout)
    assert set(os.listdir(out)) == OUTPUTS  # no config.json for a bare checkpoint
    assert leftovers(tmp_path, "out") == []  # the work folder is gone
    assert sha(ws.model) == before
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["method"] == "miu"
    assert json.loads(meta["config"])["epochs"] == 2
    assert meta["input_sha256"] == before
    assert meta["forget_sha256"] == sha(ws.forget)
    assert meta["miu_hooks_version"] == report["miu_hooks_version"]
    assert json.loads((out / "report.json").read_text()) == report
    total = int((ws.groups == 3).sum())
    assert report["groups"]["counts"]["3"] == {"total": total, "forget": 20, "retain": total - 20}
    assert set(report["models"]) == {"original", "unlearned"}
    for metric in ("RA", "FA", "TA", "MIA", "EO", "GA"):
        assert 0.0 <= report["models"]["unlearned"][metric] <= 100.0
    # The unlearned weights load strictly into the architecture and differ from the input.
    new, old = load_file(str(out / "model.safetensors")), load_file(str(ws.model))
    build_arch().load_state_dict(new, strict=True)
    assert any(not torch.equal(new[k], old[k]) for k in old)
    md = (out / "report.md").read_text()
    assert "| original |" in md and "| unlearned |" in md and "g3 (y=1, s=1)" in md


def test_clip_option_reaches_the_config(ws: Workspace, tmp_path: Path) -> None:
    res = run_runner(ws.args(tmp_path / "out", "--clip", "adaptive", "-q"))
    assert res.code == 0, res.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["config"]["clip"] == "adaptive"
    res = run_runner(ws.args(tmp_path / "bad", "--clip", "bogus"))
    assert res.code == 2 and "--clip" in res.stderr and "adaptive" in res.stderr
    assert not (tmp_path / "bad").exists()


def test_run_without_test_set_reports_retain_metrics(ws: Workspace, tmp_path: Path) -> None:
    args = ws.args(tmp_path / "out", "-q")
    drop = args.index("--test")
    del args[drop : drop + 2]
    res = run_runner(args)
    assert res.code == 0, res.stderr
    assert res.stdout == "" and res.stderr == ""  # --quiet
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["evaluated_on"] == "retain"
    assert set(report["models"]["unlearned"]) == {"RA", "FA", "per_group"}


def test_retain_only_metrics_use_the_evaluation_loop() -> None:
    from miu_hooks.cli.run import evaluate_model
    from miu_hooks.data import GroupTensorDataset

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)).train()
    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    g = 2 * y + torch.randint(0, 2, (40,))
    retain, forget = (
        GroupTensorDataset(x[:30], y[:30], g[:30]),
        GroupTensorDataset(x[30:], y[30:], g[30:]),
    )
    kw = {
        "retain": retain,
        "forget": forget,
        "val": None,
        "num_groups": 4,
        "num_sensitive": 2,
        "forget_groups": (3,),
    }
    short = evaluate_model(model, test=None, **kw, batch_size=7)
    full = evaluate_model(model, test=retain, **kw)
    assert model.training  # the loop restores the training flags
    assert (short["RA"], short["FA"]) == (full["RA"], full["FA"])
    assert short["per_group"] == full["per_group"]  # the test set is the retain set here
    with torch.no_grad():
        pred = model.eval()(x).argmax(-1)
    assert short["RA"] == pytest.approx(100 * (pred[:30] == y[:30]).float().mean().item())


@pytest.fixture(scope="module")
def hf_folder(ws: Workspace) -> Path:
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        image_size=4,
        patch_size=2,
        num_channels=3,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
    )
    torch.manual_seed(0)
    folder = ws.root / "vit"
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["runner", "subprocess"])
def test_hf_folder_run(ws: Workspace, hf_folder: Path, tmp_path: Path, mode: str) -> None:
    hashes = {p.name: sha(p) for p in hf_folder.iterdir()}
    args = ws.args(tmp_path / "out", "--group-names", "a0,a1,b0,b1")
    # The runner gets the folder's model.safetensors and a test set; the subprocess gets
    # the folder itself and no test set (no MIA forests: a faster subprocess).
    model = hf_folder / "model.safetensors" if mode == "runner" else hf_folder
    args[args.index("-m") + 1 : args.index("--arch") + 2] = [str(model)]
    if mode == "subprocess":
        del args[args.index("--test") : args.index("--test") + 2]
    res = RUNNERS[mode](args)
    assert res.code == 0, res.stderr
    out = tmp_path / "out"
    assert set(os.listdir(out)) == OUTPUTS | {"config.json"}
    assert {p.name: sha(p) for p in hf_folder.iterdir()} == hashes
    assert (out / "config.json").read_bytes() == (hf_folder / "config.json").read_bytes()
    assert "| a0 | a1 | b0 | b1 |" in (out / "report.md").read_text()
    assert "Report:" in res.stdout and "| unlearned |" in res.stdout
    on = json.loads((out / "report.json").read_text())["evaluated_on"]
    assert on == ("test" if mode == "runner" else "retain")
    from transformers import ViTForImageClassification

    reloaded = ViTForImageClassification.from_pretrained(out)  # a valid HF folder
    assert torch.equal(
        reloaded.classifier.weight, load_file(str(out / "model.safetensors"))["classifier.weight"]
    )
    if mode == "runner":  # a second request on the output folder continues its ledger
        more = ws.ids[ws.groups == 3][20:25].tolist()
        (tmp_path / "more.csv").write_text("id\n" + "\n".join(map(str, more)) + "\n")
        args[args.index("-m") + 1] = str(out)
        args[args.index("-f") + 1] = str(tmp_path / "more.csv")
        args[args.index("-o") + 1] = str(tmp_path / "out2")
        del args[args.index("--test") : args.index("--test") + 2]
        res = RUNNERS[mode](args)
        assert res.code == 0, res.stderr
        report = json.loads((tmp_path / "out2" / "report.json").read_text())
        assert [len(e["new_ids"]) for e in report["ledger"]] == [20, 5]
        assert report["original"]["path"] == str((hf_folder / "model.safetensors").resolve())
        assert report["models"].keys() == {"original", "previous", "unlearned"}


VIT_ARCH = """from transformers import ViTConfig, ViTForImageClassification


def build():
    return ViTForImageClassification(ViTConfig(
        image_size=4, patch_size=2, num_channels=3, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=2))
"""


def test_hf_weights_file_loads_with_an_arch_factory(
    ws: Workspace, hf_folder: Path, tmp_path: Path
) -> None:
    """``-m vit/model.safetensors --arch factory``: keys renamed by save_pretrained still load."""
    from transformers import ViTForImageClassification

    from miu_hooks.cli.inputs import resolve_model_source
    from miu_hooks.cli.load import load_model

    (tmp_path / "vit_arch.py").write_text(VIT_ARCH)
    weights = hf_folder / "model.safetensors"
    source = resolve_model_source(weights, f"{tmp_path / 'vit_arch.py'}:build")
    loaded = load_model(source, seed=5)  # another seed: every weight must come from the file
    want = ViTForImageClassification.from_pretrained(hf_folder).state_dict()
    assert loaded.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    args = ws.args(tmp_path / "out", "-q")
    args[args.index("-m") + 1] = str(weights)
    args[args.index("--arch") + 1] = f"{tmp_path / 'vit_arch.py'}:build"
    del args[args.index("--test") : args.index("--test") + 2]
    res = run_runner(args)
    assert res.code == 0, res.stderr


@pytest.mark.slow
def test_hf_folder_with_other_shapes_exits_4(
    ws: Workspace, hf_folder: Path, tmp_path: Path
) -> None:
    from transformers import ViTConfig

    bad = tmp_path / "vit_bad"
    bad.mkdir()
    shutil.copyfile(hf_folder / "model.safetensors", bad / "model.safetensors")
    ViTConfig(
        image_size=4,
        patch_size=2,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        num_labels=2,
    ).save_pretrained(bad)
    before = sha(bad / "model.safetensors")
    args = ws.args(tmp_path / "out", "-q")
    args[args.index("-m") + 1 : args.index("--arch") + 2] = [str(bad)]
    res = run_runner(args)
    assert res.code == 4, res.stderr
    line = res.stderr.strip()
    assert "\n" not in line and "does not match" in line and "shape mismatch" in line
    assert sha(bad / "model.safetensors") == before and not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- bad input


@dataclass
class Case:
    args: Callable[[Workspace, Path], list[str]]
    code: int
    words: tuple[str, ...]
    needs_torch: bool = False


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def _forget(text: str | bytes) -> Callable[[Workspace, Path], list[str]]:
    def args(ws: Workspace, tmp: Path) -> list[str]:
        a = ws.args(tmp / "out")
        a[a.index("-f") + 1] = str(_write(tmp / "forget.csv", text))
        return a

    return args


def _replace(
    flag: str, make: Callable[[Workspace, Path], str]
) -> Callable[[Workspace, Path], list[str]]:
    def args(ws: Workspace, tmp: Path) -> list[str]:
        a = ws.args(tmp / "out")
        a[a.index(flag) + 1] = make(ws, tmp)
        return a

    return args


def _truncated(ws: Workspace, tmp: Path) -> str:
    return str(_write(tmp / "model.safetensors", ws.model.read_bytes()[:-40]))


def _wrong_shapes(ws: Workspace, tmp: Path) -> str:
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.ReLU(), nn.Linear(8, 2))
    save_model(net, str(tmp / "model.safetensors"))
    return str(tmp / "model.safetensors")


def _no_config(ws: Workspace, tmp: Path) -> list[str]:
    a = ws.args(tmp / "out")
    del a[a.index("--arch") : a.index("--arch") + 2]
    return a


def _no_groups(ws: Workspace, tmp: Path) -> str:
    data = load_file(str(ws.train))
    del data["groups"]
    save_file(data, str(tmp / "nogroups.safetensors"))
    return str(tmp / "nogroups.safetensors")


def _emptied(ws: Workspace, tmp: Path) -> list[str]:
    ids = ws.ids[ws.groups == 1].tolist()
    return _forget("id\n" + "\n".join(map(str, ids)) + "\n")(ws, tmp)


def _missing(ws: Workspace, tmp: Path) -> str:
    return str(tmp / "nope.safetensors")


def _garbage(ws: Workspace, tmp: Path) -> str:
    return str(_write(tmp / "model.safetensors", b"junk" * 9))


def _nan(ws: Workspace, tmp: Path) -> list[str]:
    args = [*ws.args(tmp / "out"), "--lr", "1e30"]
    del args[args.index("--test") : args.index("--test") + 2]  # skip the MIA forests
    return args


def _out_is_file(ws: Workspace, tmp: Path) -> str:
    return str(_write(tmp / "blocker", "a file") / "out")


def _out_is_input(ws: Workspace, tmp: Path) -> str:
    return str(ws.root)


CASES = {
    "missing-model": Case(_replace("-m", _missing), 3, ("not found",)),
    "truncated-safetensors": Case(_replace("-m", _truncated), 4, ("not a valid safetensors",)),
    "garbage-safetensors": Case(_replace("-m", _garbage), 4, ("safetensors",)),
    "shape-mismatch": Case(_replace("-m", _wrong_shapes), 4, ("shape mismatch",), True),
    "no-config-no-arch": Case(_no_config, 5, ("no config.json", "--arch")),
    "unreadable-csv": Case(_forget(b"id\n\xff\xfe\x00\x81\n"), 7, ("cannot read",)),
    "headerless-csv": Case(_forget("101\n102\n"), 7, ("no header",)),
    "non-integer-ids": Case(_forget("id\n101\nabc\n1.5\n"), 7, ("not integers", "'abc'")),
    "unknown-ids": Case(_forget("id\n101\n99999\n"), 7, ("not in", "99999")),
    "duplicate-ids": Case(_forget("id\n101\n102\n101\n"), 7, ("unique", "101")),
    "empty-forget-list": Case(_forget("id\n"), 8, ("no ids",)),
    "forget-empties-group": Case(_emptied, 9, ("every sample of group 1",)),
    "data-without-groups": Case(_replace("-d", _no_groups), 6, ("no group column", "'groups'")),
    "out-not-writable": Case(_replace("-o", _out_is_file), 14, ("not writable",)),
    "out-is-input-folder": Case(_replace("-o", _out_is_input), 14, ("refusing to overwrite",)),
    "nan-loss": Case(_nan, 13, ("non-finite",), True),
}


def _check_bad_input(ws: Workspace, tmp_path: Path, case: Case, runner: str) -> None:
    args = [*case.args(ws, tmp_path), "-q"]
    model = Path(args[args.index("-m") + 1])
    out = Path(args[args.index("-o") + 1])
    hashes = {p: sha(p) for p in (ws.model, model) if p.is_file()}
    listing = sorted(os.listdir(out.parent)) if out.parent.is_dir() else None
    res = RUNNERS[runner](args)
    assert res.code == case.code, (res.code, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("miu-unlearn: error: "), res.stderr
    for word in case.words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in res.stderr + res.stdout and res.stdout == ""
    assert {p: sha(p) for p in hashes} == hashes  # inputs are byte-identical
    if out.parent.is_dir():  # no partial output, no work folder
        assert sorted(os.listdir(out.parent)) == listing


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_runner(ws: Workspace, tmp_path: Path, name: str) -> None:
    _check_bad_input(ws, tmp_path, CASES[name], "runner")


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if c.needs_torch else n
        for n, c in sorted(CASES.items())
    ],
)
def test_bad_input_subprocess(ws: Workspace, tmp_path: Path, name: str) -> None:
    _check_bad_input(ws, tmp_path, CASES[name], "subprocess")


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_output_parent(ws: Workspace, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        res = run_runner(ws.args(locked / "out", "-q"))
    finally:
        locked.chmod(0o700)
    assert res.code == 14 and "not writable" in res.stderr
    assert os.listdir(locked) == []


def test_usage_errors_exit_2(ws: Workspace, tmp_path: Path) -> None:
    res = run_runner(ws.args(tmp_path / "out", "--method", "nope"))
    assert res.code == 2 and "nope" in res.stderr and "miu" in res.stderr
    res = run_runner(ws.args(tmp_path / "out", "--lr", "-1"))
    assert res.code == 2 and "lr" in res.stderr
    res = run_runner(["-m", str(ws.model), "-f", str(ws.forget)])
    assert res.code == 2 and "--data" in res.stderr
    assert not (tmp_path / "out").exists()


def test_non_empty_out_needs_overwrite(ws: Workspace, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = run_runner(ws.args(out, "-q"))
    assert res.code == 14 and "--overwrite" in res.stderr
    assert os.listdir(out) == ["keep.txt"]


# --------------------------------------------------------------------------- start-up


def test_help_and_version_are_fast_and_torch_free() -> None:
    probe = (
        "import sys, time; t = time.perf_counter(); from miu_hooks.cli import main; "
        "main(['--help']); main(['--version']); "
        "print('PROBE', 'torch' in sys.modules, 'numpy' in sys.modules, time.perf_counter() - t)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    _, torch_loaded, numpy_loaded, _ = proc.stdout.strip().splitlines()[-1].split()
    assert (torch_loaded, numpy_loaded) == ("False", "False")
    assert "Exit codes:" in proc.stdout and "143" in proc.stdout
    best = min([_timed([*console_script(), "--help"]) for _ in range(3)])
    assert best < 1.0, f"miu-unlearn --help took {best:.2f} s"
    assert _timed([*console_script(), "--version"]) < 1.0


def _timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, capture_output=True, timeout=60, check=True)
    return time.perf_counter() - start


def test_methods_subcommand_lists_the_registry() -> None:
    from miu_hooks.methods import available_methods

    res = run_runner(["methods"])
    rows = [line.split(None, 2) for line in res.stdout.splitlines()]
    assert res.code == 0 and [r[0] for r in rows] == available_methods()
    what = {name: (cls, runs) for name, cls, runs in rows}
    # The name says what runs: X without REWEIGHT, X_reweight with it (MIU: on by default).
    assert what["retrain"] == ("RetrainConfig", "REWEIGHT off")
    assert what["retrain_reweight"] == ("RetrainConfig", "REWEIGHT on")
    assert what["salun_reweight"] == ("SalUnConfig", "REWEIGHT on")
    assert what["miu"][1].startswith("REWEIGHT on") and "ablation" in what["miu"][1]
    assert what["neggrad"][1].startswith("no retain pass")


def test_exit_codes_are_distinct() -> None:
    from miu_hooks.cli.errors import EXIT_CODES

    codes = [code for code, _, _ in EXIT_CODES]
    assert len(codes) == len(set(codes))
