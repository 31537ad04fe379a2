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


def test_quick_benchmark_writes_both_protocols(tmp_path: Path) -> None:
    out, raw = tmp_path / "RESULTS.md", tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out),
         "--json", str(raw)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for heading in ("## Targets (issue 10)", "## Tuned protocol", "## Default protocol",
                    "### digits, r = 0.5 (tuned", "### digits, r = 0.5 (default",
                    "test accuracy per group", "## Timing", "MIU retain-step overhead",
                    "## Setup"):  # fmt: skip
        assert heading in text
    assert text.index("## Tuned protocol") < text.index("## Default protocol")
    data = json.loads(raw.read_text())
    rows = data["rows"]
    assert {r["protocol"] for r in rows} == {"reference", "default", "tuned"}
    by = {(r["protocol"], r["method"]): r for r in rows}
    assert {m for p, m in by if p == "reference"} == {"original", "retrain", "retrain_reweight"}
    for protocol in ("default", "tuned"):
        assert {m for p, m in by if p == protocol} == set(QUICK_ROWS) - {
            "original", "retrain", "retrain_reweight"}  # fmt: skip
    ref = by[("reference", "retrain_reweight")]
    assert ref["gap_rw"] == 0.0 and ref["tow_rw"] == pytest.approx(100.0)
    assert by[("reference", "retrain")]["gap_rt"] == 0.0
    for (protocol, name), r in by.items():
        assert r["seed"] == 0 and r["ratio"] == 0.5 and len(r["forget_indices"]) == r["n_forget"]
        for key in ("RA", "FA", "TA", "MIA", "EO", "GA", "worst_group"):
            assert 0.0 <= r["metrics"][key] <= 100.0, (name, key)
        if protocol != "reference":
            assert r["wall_s"] > 0 and math.isfinite(r["gap_rw"]), name
            assert r["guard"]["enabled"] and r["guard"]["source"] == "val", name
            assert r["config"]["max_grad_norm"] == 1.0, name
    # The forget sets of all rows are one and the same split.
    assert len({tuple(r["forget_indices"]) for r in rows}) == 1
    # Tuned rows carry the configuration chosen on validation; it is one of the grid's and
    # the one with the lowest validation gap, and the row ran with it.
    for sel in data["selection"]:
        row = by[("tuned", sel["method"])]
        assert row["tuned_config"] == sel["chosen"]
        gaps = [g["val_gap"] for g in sel["grid"]]
        assert len(gaps) <= 6 and sel["grid"][gaps.index(min(gaps))]["config"] == sel["chosen"]
        assert all(row["config"][k] == v for k, v in sel["chosen"].items())
    # Default rows run each method's own defaults: NegGrad's learning rate is its own.
    assert by[("default", "neggrad")]["config"]["lr"] == 3e-4
    assert by[("default", "miu")]["config"]["forget_objective"] == "floor"
    overhead = data["overhead"]
    for key in ("mlp", "conv"):
        assert overhead[key]["ratio_cache"] > 0 and overhead[key]["ratio_nocache"] > 0
    meta = data["meta"]
    assert meta["versions"]["torch"] and meta["device"].startswith("CPU")
    assert meta["setup"]["settings"]["seeds"] == [0]
