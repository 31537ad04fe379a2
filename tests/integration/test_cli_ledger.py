"""``miu-unlearn`` on its own output: three requests chained through ledger.json.

Checks the ledger entries and forgotten.csv, that each request forgets the union of
every request so far (retain = data minus that union), that MIU calibrates against
the original model and not the intermediate one (also after the original moved,
found with ``--original``), the refusals (other original, other data), the request
whose ids were all forgotten before, and ``--resume`` of a continuation run.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file, save_model
from torch import nn

import miu_hooks.cli.run as cli_run
from miu_hooks.cli import cli
from miu_hooks.cli.inputs import work_dir
from miu_hooks.ledger import Ledger, weights_sha256

pytestmark = pytest.mark.integration

ARCH_SRC = """from torch import nn


def build():
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 2))
"""
N = 240
IDS = np.arange(1000, 1000 + N)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_ids(path: Path, ids: list[int]) -> Path:
    path.write_text("id\n" + "".join(f"{i}\n" for i in ids))
    return path


@dataclass
class Chain:
    root: Path
    groups: np.ndarray
    requests: list[list[int]]
    runs: dict[str, Any] = field(default_factory=dict)
    calls: list[dict[str, Any]] = field(default_factory=list)
    original_sha: str = ""
    moved: Path = Path()

    def args(self, model: Path, forget: Path, out: Path, *extra: str) -> list[str]:
        return [
            "-m", str(model), "--arch", f"{self.root / 'arch.py'}:build",
            "-d", str(self.root / "train.safetensors"), "-f", str(forget),
            "--config", str(self.root / "miu.json"), "--epochs", "2", "--forget-epochs", "1",
            "--batch-size", "16", "--threads", "1", "--device", "cpu", "--seed", "5",
            "-o", str(out), *extra,
        ]  # fmt: skip

    def forget(self, k: int) -> Path:
        return self.root / f"ids{k}.csv"


def invoke(args: list[str]) -> Any:
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    root = tmp_path_factory.mktemp("ledger_ws")
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (N,), generator=gen)
    s = torch.randint(0, 2, (N,), generator=gen)
    x = torch.randn(N, 3, 4, 4, generator=gen) + (2.0 * y - 1).view(-1, 1, 1, 1)
    groups = s + 2 * y
    save_file({"inputs": x, "labels": y, "groups": groups, "ids": torch.from_numpy(IDS)},
              str(root / "train.safetensors"))  # fmt: skip
    (root / "arch.py").write_text(ARCH_SRC)
    (root / "miu.json").write_text(json.dumps({"mine_hidden": 16, "mine_warmup_iters": 5,
                                               "mine_iters": 2}))  # fmt: skip
    (root / "orig").mkdir()
    torch.manual_seed(0)
    save_model(nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 2)),
               str(root / "orig" / "model.safetensors"))  # fmt: skip
    g = groups.numpy()
    in_g2 = IDS[g == 2].tolist()
    # Request 2 repeats 5 ids of request 1; request 3 takes ids from two groups.
    requests = [in_g2[:12], in_g2[7:20], [*in_g2[20:26], *IDS[g == 0][:4].tolist()]]
    c = Chain(root, g, requests)
    for k, ids in enumerate(requests, 1):
        write_ids(c.forget(k), ids)
    c.original_sha = sha(root / "orig" / "model.safetensors")

    real_unlearn = cli_run.unlearn

    def spy(model: nn.Module, retain: Any, forget: Any, **kw: Any) -> nn.Module:
        original = kw.get("original")
        c.calls.append({
            "original": None if original is None else weights_sha256(original),
            "model_in": weights_sha256(model), "retain": len(retain), "forget": len(forget),
        })  # fmt: skip
        return real_unlearn(model, retain, forget, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli_run, "unlearn", spy)
        out = [root / f"out{k}" for k in range(4)]
        c.runs["r1"] = invoke(c.args(root / "orig" / "model.safetensors", c.forget(1), out[1]))
        assert c.runs["r1"].exit_code == 0, c.runs["r1"].stderr
        # The original moves away: request 2 needs --original.
        c.moved = root / "moved" / "orig.safetensors"
        c.moved.parent.mkdir()
        shutil.move(root / "orig" / "model.safetensors", c.moved)
        c.runs["lost"] = invoke(c.args(out[1], c.forget(2), out[2]))
        c.runs["r2"] = invoke(c.args(out[1], c.forget(2), out[2], "--original", str(c.moved)))
        assert c.runs["r2"].exit_code == 0, c.runs["r2"].stderr
        c.runs["r3"] = invoke(c.args(out[2], c.forget(3), out[3]))
        assert c.runs["r3"].exit_code == 0, c.runs["r3"].stderr
    yield c


def report(c: Chain, k: int) -> dict[str, Any]:
    return json.loads((c.root / f"out{k}" / "report.json").read_text())


def test_the_ledger_records_every_request(chain: Chain) -> None:
    c = chain
    seen: set[int] = set()
    for k in (1, 2, 3):
        out = c.root / f"out{k}"
        rep = report(c, k)
        ledger = json.loads((out / "ledger.json").read_text())
        assert ledger["requests"] == rep["ledger"]
        assert len(rep["ledger"]) == k
        entry = rep["ledger"][-1]
        ids = c.requests[k - 1]
        assert entry["ids"] == ids
        assert entry["new_ids"] == [i for i in ids if i not in seen]
        seen |= set(ids)
        assert entry["forgotten"] == rep["forgotten"] == ledger["forgotten"] == len(seen)
        assert entry["forget_sha256"] == sha(c.forget(k))
        assert entry["method"] == "miu"
        assert dt.datetime.fromisoformat(entry["finished_at"]).tzinfo is not None
        previous = c.root / f"out{k - 1}" / "model.safetensors"
        model_in = c.original_sha if k == 1 else sha(previous)
        assert entry["model_in_sha256"] == model_in
        assert entry["model_out_sha256"] == sha(out / "model.safetensors")
        assert rep["ledger"][: k - 1] == (report(c, k - 1)["ledger"] if k > 1 else [])
        assert (out / "forgotten.csv").read_text() == "id\n" + "".join(
            f"{i}\n" for i in sorted(seen)
        )
        assert ledger["data_sha256"] == sha(c.root / "train.safetensors")
        assert rep["original"]["sha256"] == ledger["original"]["sha256"] == c.original_sha
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            assert f.metadata()["original_sha256"] == c.original_sha
    # The first request names the input model; later ones where it was found.
    assert report(c, 1)["original"]["path"] == str((c.root / "orig/model.safetensors").resolve())
    assert report(c, 2)["original"]["path"] == str(c.moved.resolve())
    assert report(c, 3)["original"]["path"] == str(c.moved.resolve())
    assert Ledger.load(c.root / "out3" / "ledger.json").forgotten.tolist() == sorted(seen)
    md = (c.root / "out3" / "report.md").read_text()
    assert "## Deletion requests" in md and md.count("| miu |") == 3


def test_each_request_forgets_the_union_and_keeps_the_rest(chain: Chain) -> None:
    c = chain
    union: set[int] = set()
    for k in (1, 2, 3):
        union |= set(c.requests[k - 1])
        counts = report(c, k)["groups"]["counts"]
        mask = np.isin(IDS, sorted(union))
        for g in range(4):
            expect = {
                "total": int((c.groups == g).sum()),
                "forget": int((c.groups[mask] == g).sum()),
                "retain": int((c.groups[~mask] == g).sum()),
            }
            assert counts[str(g)] == expect, (k, g)
        call = c.calls[k - 1]
        assert (call["retain"], call["forget"]) == (N - len(union), len(union))


def test_miu_calibrates_against_the_original_not_the_intermediate(chain: Chain) -> None:
    c = chain
    orig = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 2))
    orig.load_state_dict(load_file(str(c.moved)))
    first, second, third = c.calls
    assert first["original"] is None  # the input model itself is the original
    for call, prev in ((second, "out1"), (third, "out2")):
        intermediate = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 2))
        intermediate.load_state_dict(load_file(str(c.root / prev / "model.safetensors")))
        assert call["model_in"] == weights_sha256(intermediate)  # starts from the last output
        assert call["original"] == weights_sha256(orig) != call["model_in"]
    models = report(c, 2)["models"]
    assert list(models) == ["original", "previous", "unlearned"]


def test_a_lost_original_needs_the_original_option(chain: Chain) -> None:
    lost = chain.runs["lost"]
    assert lost.exit_code == 3 and "--original" in lost.stderr
    assert len(lost.stderr.strip().splitlines()) == 1


def inputs_digest(c: Chain) -> dict[str, str]:
    files = [c.root / "train.safetensors", c.moved, *(c.forget(k) for k in (1, 2, 3))]
    files += sorted((c.root / "out1").iterdir())
    return {str(p): sha(p) for p in files}


def test_an_original_with_another_sha256_is_refused(chain: Chain, tmp_path: Path) -> None:
    c = chain
    fake = tmp_path / "orig.safetensors"
    tensors = load_file(str(c.moved))
    tensors["1.bias"] = tensors["1.bias"] + 1e-3
    save_file(tensors, str(fake))
    before = inputs_digest(c)
    out = tmp_path / "out"
    res = invoke(c.args(c.root / "out1", c.forget(2), out, "--original", str(fake)))
    assert res.exit_code == 17, res.stderr
    assert "sha256" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists() and not work_dir(out).exists()
    assert inputs_digest(c) == before


def test_other_data_is_refused(chain: Chain, tmp_path: Path) -> None:
    c = chain
    data = load_file(str(c.root / "train.safetensors"))
    data["inputs"] = data["inputs"] * 1.01  # same ids, labels and groups; other samples
    save_file(data, str(tmp_path / "train.safetensors"))
    args = c.args(c.root / "out1", c.forget(2), tmp_path / "out")
    args[args.index("-d") + 1] = str(tmp_path / "train.safetensors")
    res = invoke(args)
    assert res.exit_code == 18, res.stderr
    assert "data" in res.stderr and "sha256" in res.stderr
    assert not (tmp_path / "out").exists()


def test_a_request_forgotten_before_writes_nothing(chain: Chain, tmp_path: Path) -> None:
    c = chain
    ids = write_ids(tmp_path / "again.csv", [*c.requests[0][:3], *c.requests[2][-2:]])
    out = tmp_path / "out"
    res = invoke(c.args(c.root / "out3", ids, out, "--json"))
    assert res.exit_code == 0, res.stderr
    assert "forgotten by earlier requests" in res.stderr and "nothing written" in res.stderr
    assert json.loads(res.stdout)["nothing_to_do"] is True
    assert not out.exists() and not work_dir(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.csv"]


def test_original_option_without_a_ledger_is_refused(chain: Chain, tmp_path: Path) -> None:
    c = chain
    res = invoke(c.args(c.moved, c.forget(1), tmp_path / "out", "--original", str(c.moved)))
    assert res.exit_code == 18 and "--original" in res.stderr
    assert not (tmp_path / "out").exists()


def test_resume_of_a_continuation_run(
    chain: Chain, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = chain
    real_unlearn = cli_run.unlearn

    def stop_after_first_epoch(*a: Any, **kw: Any) -> nn.Module:
        tick = kw["on_epoch_end"]

        def on_epoch_end(epoch: int, logs: dict[str, float]) -> None:
            tick(epoch, logs)
            raise KeyboardInterrupt

        return real_unlearn(*a, **{**kw, "on_epoch_end": on_epoch_end})

    out = tmp_path / "out2"
    args = c.args(c.root / "out1", c.forget(2), out, "--original", str(c.moved))
    monkeypatch.setattr(cli_run, "unlearn", stop_after_first_epoch)
    stopped = invoke(args)
    assert stopped.exit_code == 130 and "--resume" in stopped.stderr
    assert not out.exists() and (work_dir(out) / "run.json").is_file()
    monkeypatch.setattr(cli_run, "unlearn", real_unlearn)
    resumed = invoke([*args, "--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    # Same weights, ledger and forgotten set as the uninterrupted request 2. (The files'
    # bytes may differ: safetensors does not keep the metadata's order.)
    resumed_w = load_file(str(out / "model.safetensors"))
    straight_w = load_file(str(c.root / "out2" / "model.safetensors"))
    assert resumed_w.keys() == straight_w.keys()
    assert all(torch.equal(resumed_w[k], straight_w[k]) for k in resumed_w)
    volatile = ("finished_at", "model_out_sha256")
    entries = json.loads((out / "ledger.json").read_text())["requests"]
    assert entries[-1]["model_out_sha256"] == sha(out / "model.safetensors")
    strip = [{k: v for k, v in e.items() if k not in volatile} for e in entries]
    expect = [{k: v for k, v in e.items() if k not in volatile} for e in report(c, 2)["ledger"]]
    assert strip == expect
    assert (out / "forgotten.csv").read_text() == (c.root / "out2" / "forgotten.csv").read_text()
