"""The ``miu-unlearn`` command line: a thin click layer over the library.

Modules:

- :mod:`~miu_hooks.cli.commands`: the click group (``cli``) and :func:`main`,
  the console-script entry point;
- :mod:`~miu_hooks.cli.errors`: the CLI's error types and their exit codes;
- :mod:`~miu_hooks.cli.options`: the settings options, built from the config fields;
- :mod:`~miu_hooks.cli.data_index`: torch-free reading of data files
  (ids, labels and groups) so bad input fails before torch is imported;
- :mod:`~miu_hooks.cli.inputs`: checking every input (:func:`~miu_hooks.cli.inputs.prepare`);
- :mod:`~miu_hooks.cli.load`: building models and data sets from checked inputs;
- :mod:`~miu_hooks.cli.chain`: the ledger of deletion requests carried by every
  output, and continuing it when ``--model`` is an earlier output;
- :mod:`~miu_hooks.cli.run`: the resumable run (:func:`~miu_hooks.cli.run.execute`);
- :mod:`~miu_hooks.cli.report`: console output, ``report.md`` and ``groups.png``.

``cli`` and ``main`` are loaded on first access, so importing a submodule such
as :mod:`miu_hooks.cli.errors` does not import click.

Example:
    >>> from miu_hooks.cli import main
    >>> main(["--version"])  # doctest: +ELLIPSIS
    miu-unlearn, version ...
    0
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from miu_hooks.cli.commands import cli, main

__all__ = ["cli", "main"]


def __getattr__(name: str) -> Any:
    # PEP 562: import click (through commands) only when the command line is used.
    if name in __all__:
        return getattr(importlib.import_module("miu_hooks.cli.commands"), name)
    raise AttributeError(f"module 'miu_hooks.cli' has no attribute {name!r}")
