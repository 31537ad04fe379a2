"""``miu-unlearn demo --quick`` through click's runner and a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from miu_hooks.cli import cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]
pytest.importorskip("sklearn")

GROUPS = (
    "y=0 (digit<5), red",
    "y=0 (digit<5), green",
    "y=1 (digit>=5), red",
    "y=1 (digit>=5), green",
)
REPORT_FILES = {"model.safetensors", "report.json", "report.md", "groups.png"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("demo_cache")


def check_report(folder: Path, report: dict) -> None:
    assert REPORT_FILES <= set(os.listdir(folder))
    assert json.loads((folder / "report.json").read_text()) == report
    assert report["method"] == "miu" and report["forget_groups"] == [2]
    assert report["references"] == ["Retrain+REWEIGHT"]
    assert set(report["models"]) == {"original", "unlearned", "Retrain+REWEIGHT"}
    counts = report["groups"]["counts"]["2"]
    assert counts["forget"] == counts["total"] // 2 and report["forgotten"] == counts["forget"]
    assert report["gaps"]["unlearned"]["vs Retrain+REWEIGHT"]["avg_gap"] >= 0.0
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert f.metadata()["method"] == "miu"


def test_demo_quick_runner(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIU_HOOKS_CACHE", str(cache))
    result = CliRunner().invoke(cli, ["demo", "--quick"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "Per-group test accuracy" in out and all(g in out for g in GROUPS)
    for row in ("| Original |", "| MIU |", "| Retrain+REWEIGHT |", "Gap vs Retrain+REWEIGHT"):
        assert row in out
    report_md = Path(out.split("Report: ")[1].split()[0])
    assert report_md.name == "report.md" and report_md.is_relative_to(cache)
    check_report(report_md.parent, json.loads((report_md.parent / "report.json").read_text()))
    assert "original model: trained" in result.stderr
    folders = list(cache.glob("demo-*"))
    assert len(folders) == 1 and not list(cache.glob(".demo-*"))  # no temporary leftovers


def test_demo_quick_subprocess_reuses_the_cache(cache: Path, tmp_path: Path) -> None:
    cached = any(cache.glob("demo-*/settings.json"))  # after test_demo_quick_runner
    env = {**os.environ, "MIU_HOOKS_CACHE": str(cache), "MIU_HOOKS_DEMO_QUICK": "1"}
    script = Path(sys.executable).parent / "miu-unlearn"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "miu_hooks.cli"]
    proc = subprocess.run(
        [*cmd, "demo", "--json", "--retrain-cache", "-o", str(tmp_path / "rep")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    check_report(tmp_path / "rep", report)
    assert ("original model: cached" if cached else "original model: trained") in proc.stderr
    if cached:  # --retrain-cache reuses the Retrain+REWEIGHT model of the first test
        assert "retrain_reweight: cached" in proc.stderr
