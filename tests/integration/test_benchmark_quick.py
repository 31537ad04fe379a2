"""``benchmarks/run.py --quick`` end to end: the CI smoke run of the benchmark."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
QUICK_ROWS = ("original", "retrain", "retrain_reweight", "finetune", "neggrad",
              "random_labels_reweight", "l1_sparse", "salun_reweight", "scrub", "miu")  # fmt: skip


def test_quick_benchmark_writes_results(tmp_path: Path) -> None:
    out, raw = tmp_path / "RESULTS.md", tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out),
         "--json", str(raw)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for heading in ("## Targets (issue 6)", "## MIU retain-step overhead", "## digits, r = 0.5",
                    "test accuracy per group", "## Setup"):  # fmt: skip
        assert heading in text
    for row in QUICK_ROWS:
        assert f"| {row} |" in text
    data = json.loads(raw.read_text())
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == set(QUICK_ROWS)
    ref = rows["retrain_reweight"]
    assert ref["gap_rw"] == 0.0 and ref["tow_rw"] == pytest.approx(100.0)
    assert rows["retrain"]["gap_rt"] == 0.0
    for name, r in rows.items():
        assert r["seed"] == 0 and r["ratio"] == 0.5 and len(r["forget_indices"]) == r["n_forget"]
        for key in ("RA", "FA", "TA", "MIA", "EO", "GA", "worst_group"):
            assert 0.0 <= r["metrics"][key] <= 100.0, (name, key)
        if name != "original":
            assert r["wall_s"] > 0 and math.isfinite(r["gap_rw"]), name
    # The forget sets of all rows are one and the same split.
    assert len({tuple(r["forget_indices"]) for r in rows.values()}) == 1
    overhead = data["overhead"]
    for key in ("mlp", "conv"):
        assert overhead[key]["ratio_cache"] > 0 and overhead[key]["ratio_nocache"] > 0
    meta = data["meta"]
    assert meta["versions"]["torch"] and meta["device"].startswith("CPU")
    assert meta["setup"]["settings"]["seeds"] == [0]
