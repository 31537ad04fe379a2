"""Run an ``examples/hf_trainer_*.py`` script shortened and read its table (not a test module)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ROW = re.compile(r"^(original|plain fine-tune|MIU)\s+((?:-?\d+\.\d\s*)+)$")


def run_quick(name: str, out: Path) -> tuple[dict[str, list[float]], subprocess.CompletedProcess]:
    """Run ``examples/<name>`` with ``MIU_EXAMPLE_QUICK=1``; return its rows and the process.

    Rows map "original", "plain fine-tune" and "MIU" to the printed columns
    (g0 g1 g2 g3 test GA FA). The run must exit 0 and print the three rows.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MIU_EXAMPLE_QUICK": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        m = ROW.match(line)
        if m:
            rows[m.group(1)] = [float(v) for v in m.group(2).split()]
    assert set(rows) == {"original", "plain fine-tune", "MIU"}, proc.stdout
    assert all(len(v) == 7 for v in rows.values()), rows
    return rows, proc
