"""``benchmarks/gpu_check.sh --smoke``: the GPU check's every path, run on the CPU.

The script runs as it would on a GPU machine (its own venv with the system's
packages, nothing installed but the checkout, a hard time limit) with a tiny
ViT. The library's host reads per timed step are exact here: one per MIU retain
step, plus one per epoch for the logged means on the paths that log per epoch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_smoke_runs_every_path(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_VENV=str(tmp_path / "venv"),
               GPU_CHECK_JSON=str(tmp_path / "out.json"), GPU_CHECK_WORK=str(tmp_path / "work"),
               OMP_NUM_THREADS="1", GPU_CHECK_TIMEOUT="240")  # fmt: skip
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    result = json.loads((tmp_path / "out.json").read_text())
    rows = {(r["path"], r["method"]): r for r in result["rows"]}
    assert set(rows) == {(p, m) for p in ("unlearn", "accelerate", "trainer")
                         for m in ("plain", "miu")}  # fmt: skip
    assert all(r["finite"] and r["ms_per_step"] > 0 for r in rows.values())
    assert set(result["ratios"]) == {"unlearn", "accelerate", "trainer"}
    assert result["fp16"] == {"finite": True} and result["smoke"] and result["device"] == "cpu"
    steps = result["steps_per_epoch"]
    reads = {key: r["library_reads_per_step"] for key, r in rows.items()}
    assert reads == {
        ("unlearn", "plain"): 1.0,  # the step's one read
        ("unlearn", "miu"): (steps + 1) / steps,  # + the epoch's logged means
        ("accelerate", "plain"): 0.0,  # the user's own loop: nothing of ours
        ("accelerate", "miu"): (steps + 1) / steps,  # retain_loss + pop_logs per epoch
        ("trainer", "plain"): 0.0,
        ("trainer", "miu"): 1.0,  # logging_steps is beyond the run: no pop_logs
    }
    assert "MIU throughput" in proc.stdout
