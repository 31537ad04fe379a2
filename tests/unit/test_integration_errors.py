"""Input and setting errors raised in ``integrations/`` are MIUError subclasses, too.

``tests/unit/test_errors.py`` scans ``miu_hooks/``; the integrations live in the
repository's ``integrations/`` folder (installed as ``miu_hooks.integrations``),
so they are scanned here. Their behaviour is tested with the Trainer and
Accelerate in ``tests/integration``.
"""

import ast
import builtins
from pathlib import Path

import pytest

import miu_hooks.integrations

pytestmark = pytest.mark.unit

BUILTIN_ERRORS = {n for n in dir(builtins) if n.endswith("Error")}


def test_no_plain_builtin_error_is_raised_in_the_integrations():
    root = Path(miu_hooks.integrations.__path__[0])
    files = sorted(root.glob("*.py"))
    assert len(files) > 10
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                func = node.exc.func
                if isinstance(func, ast.Name) and func.id in BUILTIN_ERRORS:
                    found.append(f"{path.name}:{node.lineno} {func.id}")
    assert found == []
