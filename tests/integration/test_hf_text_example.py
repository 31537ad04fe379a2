"""``examples/hf_trainer_text.py`` runs (shortened) and prints the models' group accuracies."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "hf_trainer_text.py"


def test_hf_trainer_text_example_quick(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MIU_EXAMPLE_QUICK": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE), "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^(original|plain fine-tune|MIU)\s+((?:-?\d+\.\d\s*)+)$", line)
        if m:
            rows[m.group(1)] = [float(v) for v in m.group(2).split()]
    assert set(rows) == {"original", "plain fine-tune", "MIU"}, proc.stdout
    # columns: g0 g1 g2 g3 test GA FA
    assert all(len(v) == 7 for v in rows.values())
    assert rows["plain fine-tune"][5] < rows["original"][5] - 15  # plain: group 2 collapses
    assert rows["MIU"][5] > rows["plain fine-tune"][5] + 10  # MIU keeps much of it
    assert rows["MIU"][4] > rows["original"][4] - 5  # test accuracy: no collapse
    assert "MIU taps the input of 'classifier'" in proc.stdout
    assert "calibration" in proc.stdout
