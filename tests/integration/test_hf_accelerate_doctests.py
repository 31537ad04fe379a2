"""The docstring examples of ``miu_hooks.integrations.*`` run, under the installed name.

``--doctest-modules`` does not collect the repository's ``integrations/`` folder
(it would import each file a second time as ``integrations.*``; see
``tests/conftest.py``), so this test runs every module's examples through
``doctest`` after importing it as ``miu_hooks.integrations.<name>``. A module
without examples fails too, so none is skipped silently.
"""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import miu_hooks.integrations

pytestmark = pytest.mark.integration

MODULES = sorted(m.name for m in pkgutil.iter_modules(miu_hooks.integrations.__path__))


def test_every_module_is_listed():
    folder = Path(miu_hooks.integrations.__path__[0])
    files = sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")
    assert MODULES == files and len(MODULES) >= 10


@pytest.fixture
def fresh_accelerate() -> Iterator[None]:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.parametrize("name", MODULES)
def test_module_examples_run_and_pass(name, fresh_accelerate, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes a file writes it here
    module = importlib.import_module(f"miu_hooks.integrations.{name}")
    assert module.__name__ == f"miu_hooks.integrations.{name}"
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out = io.StringIO()
    for test in finder.find(module, module.__name__):
        runner.run(test, out=out.write)
    result = runner.summarize(verbose=False)
    assert result.attempted > 0, f"{module.__name__} has no docstring example"
    assert result.failed == 0, out.getvalue()
