"""Shared checks of the benchmark smoke tests (not a test module)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def assert_rerenders(script: Path, out: Path, cwd: Path, *extra: str) -> None:
    """``script --from-json`` rebuilds ``out`` byte for byte from its raw JSON record alone."""
    again = cwd / "again.md"
    proc = subprocess.run(
        [sys.executable, str(script), *extra, "--from-json", str(out.with_suffix(".json")),
         "--out", str(again)],
        cwd=cwd, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0 and again.read_text() == out.read_text(), proc.stderr[-3000:]
