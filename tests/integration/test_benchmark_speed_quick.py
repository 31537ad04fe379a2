"""``benchmarks/speed_backbones.py --quick`` end to end: the speed benchmark's smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench_check import assert_rerenders

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("benchmark MLP", "MLP 64-64, 1k x 20", "MLP 64-64, 2k x 40", "conv backbone",
         "tiny ViT (hidden 64, 32 px)", "ResNet-18")  # fmt: skip
VARIANTS = ("miu", "miu, fresh features", "finetune_reweight", "retrain_reweight")


def test_quick_speed_benchmark_writes_results(tmp_path: Path) -> None:
    pytest.importorskip("transformers")  # the tiny ViT is built from a transformers config
    out = tmp_path / "speed.md"
    script = ROOT / "benchmarks" / "speed_backbones.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for heading in ("## Whole runs", "## Critic warm-up against a retain epoch",
                    "## Retain step"):  # fmt: skip
        assert heading in text
    raw = json.loads(out.with_suffix(".json").read_text())
    steps = ("benchmark MLP", "tiny ViT (hidden 64, 32 px)", "conv backbone", "ResNet-18")
    assert tuple(raw["whole"]) == TASKS and tuple(raw["steps"]) == steps
    for name, cell in raw["whole"].items():
        runs = cell["runs"]
        assert set(runs) == set(VARIANTS), name  # one timed repetition of every variant
        for variant, done in runs.items():
            (run,) = done
            assert run["wall_s"] > 0 and run["stopped"] is None, (name, variant)
            assert len(run["phases"]["retain"]) == run["epochs"], (name, variant)
            if variant != "retrain_reweight":
                assert run["epochs"] == 5  # MIU and the fine-tune: the same epochs
            # MIU's tuning phases: the warm-up, then one per later epoch.
            want = 5 if variant.startswith("miu") else 0
            assert len(run["tune"]) == want, (name, variant)
        if name.startswith("MLP") or name == "benchmark MLP":
            # No BatchNorm, no dropout: reused features are the fresh ones.
            a, b = runs["miu"][0]["quality"], runs["miu, fresh features"][0]["quality"]
            assert a == pytest.approx(b, abs=1.0), name
    assert_rerenders(script, out, tmp_path)
