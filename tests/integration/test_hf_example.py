"""``examples/hf_trainer_vit.py`` runs (shortened) and prints the three models' group accuracies."""

from __future__ import annotations

import pytest
from example_run import run_quick

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_hf_trainer_example_quick(tmp_path):
    rows, proc = run_quick("hf_trainer_vit.py", tmp_path)
    # columns: g0 g1 g2 g3 test GA FA
    assert rows["MIU"][5] > rows["plain fine-tune"][5] + 20  # GA: group 2 keeps its accuracy
    assert rows["MIU"][4] > rows["original"][4] - 10  # test accuracy: no collapse
    assert "miu/calibration" not in proc.stderr  # the log summary goes to stdout
    assert "calibration" in proc.stdout
