"""``examples/hf_trainer_text.py`` runs (shortened) and prints the models' group accuracies."""

from __future__ import annotations

import pytest
from example_run import run_quick

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_hf_trainer_text_example_quick(tmp_path):
    rows, proc = run_quick("hf_trainer_text.py", tmp_path)
    # columns: g0 g1 g2 g3 test GA FA
    assert rows["plain fine-tune"][5] < rows["original"][5] - 15  # plain: group 2 collapses
    assert rows["MIU"][5] > rows["plain fine-tune"][5] + 10  # MIU keeps much of it
    assert rows["MIU"][4] > rows["original"][4] - 5  # test accuracy: no collapse
    assert "MIU taps the input of 'classifier'" in proc.stdout
    assert "calibration" in proc.stdout
