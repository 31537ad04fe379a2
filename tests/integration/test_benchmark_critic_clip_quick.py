"""``benchmarks/critic_clip.py --quick`` end to end: the critic-clipping benchmark's smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench_check import assert_rerenders

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_quick_critic_clip_benchmark_writes_results(tmp_path: Path) -> None:
    pytest.importorskip("transformers")  # the tiny ViT is built from a transformers config
    out = tmp_path / "clip.md"
    script = ROOT / "benchmarks" / "critic_clip.py"
    proc = subprocess.run([sys.executable, str(script), "--quick", "--seeds", "0", "--out",
                           str(out)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    raw = json.loads(out.with_suffix(".json").read_text())
    assert list(raw["result"]) == ["ResNet-18", "conv backbone (16 px)",
                                   "tiny ViT (hidden 64, 32 px)", "benchmark MLP"]  # fmt: skip
    for name, cell in raw["result"].items():
        assert f"## {name} (original: TA" in text
        runs = cell["runs"]
        assert [r["bound"] for r in runs] == [10.0, None], name  # clipped, then unclipped
        clipped, free = runs
        assert clipped["steps"] > 0 and clipped["norm_max"] >= clipped["norm_median"] > 0
        if clipped["above_bound"] == 0 and free["above_bound"] == 0:
            # The bound never bound: the two runs computed the same thing.
            assert clipped["quality"] == free["quality"], name
            assert clipped["calibration"] == pytest.approx(free["calibration"]), name
    assert_rerenders(script, out, tmp_path)
