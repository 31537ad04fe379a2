"""An error found on one rank stops every rank at the same step (2 CPU ranks, gloo).

``scripts/rank_errors.py`` breaks rank 1's retain batch (a label outside the
model's classes, a NaN input; with and without the MI term, whose gather
otherwise carries the verdict) and checks with a barrier that no rank is left
waiting in a collective; without the shared verdict rank 0 would block in its
next collective until the process-group timeout.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "miu_test_launch", Path(__file__).resolve().parent / "scripts" / "launch.py"
)
assert _spec is not None and _spec.loader is not None
launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch)

pytestmark = [pytest.mark.integration, pytest.mark.multiprocess, pytest.mark.slow]


def test_every_rank_raises_a_rank_local_error(tmp_path: Path) -> None:
    launch.torchrun(launch.SCRIPTS / "rank_errors.py", str(tmp_path), cwd=launch.SCRIPTS)
    written = sorted(tmp_path.glob("rank*.txt"))
    assert [p.name for p in written] == ["rank0.txt", "rank1.txt"]
    out = "\n".join(p.read_text() for p in written)
    lines = {
        tuple(line.split(" ", 3)[1:3]): line.split(" ", 3)[3]
        for line in out.splitlines()
        if line.startswith("RANK_ERROR ")
    }
    assert out.count("RANK_ERRORS_DONE") == 2, out[-3000:]
    assert lines[("label", "1")].startswith("GroupRangeError label 5 is outside [0, 2)")
    assert lines[("label", "0")].startswith("GroupRangeError rank 1 found a label outside")
    # The NaN is in rank 1's data: it says so; rank 0 names rank 1.
    assert lines[("nan", "1")].startswith("NonFiniteInputError the inputs of 1 sample")
    assert lines[("nan", "0")].startswith("NonFiniteLossError rank 1 found a non-finite")
    assert lines[("label_without_mi", "1")].startswith("GroupRangeError label 5")
    assert lines[("label_without_mi", "0")].startswith("GroupRangeError another rank found")
