"""``import miu_hooks`` stays light, and the installed package layout resolves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.unit

HEAVY = ("transformers", "accelerate", "sklearn", "click", "safetensors", "matplotlib")

# One interpreter (torch is imported once): record the optional packages loaded
# after ``import miu_hooks`` and again after importing the demo package and its toy data.
_PROBE = f"""
import json, sys
heavy = {HEAVY!r}
def loaded():
    return sorted(set(m.split(".")[0] for m in sys.modules) & set(heavy))
import miu_hooks
out = {{"version": miu_hooks.__version__, "after_package": loaded()}}
import miu_hooks.demo
out["after_demo"] = loaded()
print(json.dumps(out))
"""


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # Run from an empty folder so the *installed* package is imported, not the checkout.
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    proc = _run(_PROBE, tmp_path_factory.mktemp("import_probe"))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_miu_hooks_loads_no_optional_dependency(probe: dict[str, Any]) -> None:
    assert probe["after_package"] == [], f"import miu_hooks pulled in {probe['after_package']}"
    assert isinstance(probe["version"], str) and probe["version"]


def test_demo_package_loads_sklearn_lazily(probe: dict[str, Any]) -> None:
    assert probe["after_demo"] == [], f"import miu_hooks.demo pulled in {probe['after_demo']}"


def test_integrations_package_is_mapped(tmp_path: Path) -> None:
    code = (
        "import json, miu_hooks.integrations as m\n"
        "print(json.dumps({'name': m.__name__, 'file': m.__file__}))\n"
    )
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, (
        "import miu_hooks.integrations failed; is the package installed "
        "(pip install -e .)?\n" + proc.stderr
    )
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["name"] == "miu_hooks.integrations"
    path = Path(out["file"])
    assert path.name == "__init__.py"
    # editable install: <repo>/integrations/; regular install: site-packages/miu_hooks/integrations/
    assert path.parent.name == "integrations"
