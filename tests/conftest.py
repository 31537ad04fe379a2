"""Test-suite configuration: offline Hugging Face, GPU auto-skip, collection rules."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Nothing is ever downloaded in tests: a stray hub call fails fast instead of hanging.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent

# The launched scripts are programs, not test modules: run as ``python script.py`` they
# import their sibling ``launch`` from their own folder, which an import by pytest
# (``--doctest-modules``) cannot see.
collect_ignore = ["integration/scripts"]


def pytest_configure(config: pytest.Config) -> None:
    """Keep the repository's ``integrations/`` folder out of collection.

    ``integrations/`` is installed as ``miu_hooks.integrations``; collecting it
    under its folder name (e.g. with ``--doctest-modules .``) would import its
    files a second time as ``integrations.*``. It is exercised through
    ``tests/integration/`` under its installed name instead. A ``collect_ignore``
    list here would only cover paths below ``tests/``, so the folder is added to
    ``--ignore``; this holds for every run that loads this conftest at start-up
    (the default ``testpaths``, or any path under ``tests/`` on the command line).
    """
    path = str(REPO_ROOT / "integrations")
    ignore = config.getoption("ignore", default=None)
    if ignore is None:
        config.option.ignore = [path]
    elif path not in ignore:
        ignore.append(path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` when no CUDA device is available."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module: tiny models run fastest and reproducibly on one,
    and do not spin on a loaded 2-core machine. Use with ``pytest.mark.usefixtures``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
