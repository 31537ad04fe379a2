"""The multi-process launcher of the integration tests (``scripts/launch.py``).

A hang must say where it hangs (every process's stacks), and a hang or crash in
process teardown after every rank finished is told apart from one in the code
under test. The fake "ranks" here are one plain process that writes the marks.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import textwrap
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "miu_test_launch", Path(__file__).resolve().parent / "scripts" / "launch.py"
)
assert _spec is not None and _spec.loader is not None
launch = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch)

pytestmark = [pytest.mark.integration, pytest.mark.multiprocess]

TIMEOUT = 15  # seconds; the fake scripts mark within one (no torch import)


def _script(tmp_path: Path, marks: list[int], end: str) -> list[str]:
    """A process that marks ``marks`` as done, then runs ``end`` (hang or exit)."""
    body = f"""
        import sys, time
        sys.path.insert(0, {str(launch.SCRIPTS)!r})
        from launch import mark_rank_done

        def teardown():
            {end}

        for rank in {marks!r}:
            mark_rank_done(rank)
        print("marked", flush=True)
        teardown()
    """
    path = tmp_path / "fake_ranks.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def test_a_hang_before_every_rank_finished_fails_with_the_stacks(tmp_path: Path) -> None:
    cmd = _script(tmp_path, [0], "time.sleep(600)")
    with pytest.raises(AssertionError) as info:
        launch.check(cmd, tmp_path, timeout=TIMEOUT, ranks=2)
    text = str(info.value)
    assert f"still ran after {TIMEOUT} s; stacks at SIGABRT" in text
    assert "Fatal Python error: Aborted" in text  # PYTHONFAULTHANDLER's dump
    assert re.search(r'fake_ranks.py", line \d+ in teardown', text)  # where it hung


def test_a_hang_after_every_rank_finished_is_a_teardown_warning(tmp_path: Path) -> None:
    cmd = _script(tmp_path, [0, 1], "time.sleep(600)")
    with pytest.warns(launch.TeardownWarning, match="after every rank finished") as record:
        out = launch.check(cmd, tmp_path, timeout=TIMEOUT, ranks=2)
    assert "marked" in out
    assert re.search(r'fake_ranks.py", line \d+ in teardown', str(record[0].message))


def test_a_crash_after_every_rank_finished_is_a_teardown_warning(tmp_path: Path) -> None:
    cmd = _script(tmp_path, [0, 1], "import os; os.abort()")
    with pytest.warns(launch.TeardownWarning, match="failed"):
        launch.check(cmd, tmp_path, timeout=TIMEOUT, ranks=2)


@pytest.mark.parametrize(
    ("marks", "end", "message"),
    [
        ([0], "sys.exit(3)", "failed (3)"),
        ([0], "pass", "exited 0, but 1 of 2 ranks called mark_rank_done"),
        ([], "sys.exit(3)", "failed (3)"),
    ],
)
def test_an_unfinished_rank_fails(tmp_path: Path, marks: list[int], end: str, message: str) -> None:
    with pytest.raises(AssertionError, match=message.replace("(", r"\(").replace(")", r"\)")):
        launch.check(_script(tmp_path, marks, end), tmp_path, timeout=TIMEOUT, ranks=2)


def test_a_single_process_needs_no_marks(tmp_path: Path) -> None:
    assert "marked" in launch.check(_script(tmp_path, [], "pass"), tmp_path, timeout=TIMEOUT)
