"""``benchmarks/sequence.py --quick`` end to end: the repeated-requests benchmark's smoke run."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from bench_check import assert_rerenders

from miu_hooks import Ledger

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SEQUENCES = ("miu", "finetune_reweight", "miu_alone")


def test_quick_sequence_benchmark_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS_sequence.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sequence.py"), "--quick", "--requests", "3",
         "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for heading in (
        "## Avg. Gap to Retrain+REWEIGHT on D_r(k), after each request k",
        "## Forgetting reversal",
        "## After request 3: every metric",
        "## Setup",
    ):
        assert heading in text  # fmt: skip
    assert "python benchmarks/sequence.py --quick --requests 3" in text
    assert_rerenders(ROOT / "benchmarks" / "sequence.py", out, tmp_path, "--requests", "3")
    raw = json.loads(out.with_suffix(".json").read_text())
    (seed,) = raw["seeds"]
    chunks = seed["chunks"]
    assert len(chunks) == 3 and not set(chunks[0]) & set(chunks[1])
    records = seed["records"]
    for row in (*SEQUENCES, "retrain_reweight"):
        mine = sorted((r for r in records if r["row"] == row), key=lambda r: r["request"])
        assert [r["request"] for r in mine] == [1, 2, 3], row
        # Request k is scored on the union of chunks 1..k.
        assert [r["n_forget"] for r in mine] == [len(chunks[0]), len(chunks[0]) + len(chunks[1]),
                                                 sum(map(len, chunks))]  # fmt: skip
        for r in mine:
            assert math.isfinite(r["gap"]) and len(r["chunk_acc"]) == 3
            assert all(0.0 <= a <= 100.0 for a in r["chunk_acc"])
    assert all(r["gap"] == 0.0 for r in records if r["row"] == "retrain_reweight")
    assert {r["row"] for r in records} >= {"original", "miu_once", "finetune_reweight_once"}
    for row in ("miu", "finetune_reweight"):  # each sequence kept a consistent ledger
        ledger = Ledger.from_dict(seed["ledgers"][row])
        assert [list(e.new_ids) for e in ledger.requests] == chunks
        assert ledger.forgotten.tolist() == sorted(itertools.chain.from_iterable(chunks))
        entries = ledger.requests
        assert entries[0].model_in_sha256 == ledger.original_sha256
        assert all(a.model_out_sha256 == b.model_in_sha256 for a, b in itertools.pairwise(entries))
