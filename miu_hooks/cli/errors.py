"""Errors of the ``miu-unlearn`` command line and their exit codes.

Imports nothing heavy (no torch): the command line maps an exception to its
exit code before any model is loaded. Each type gets its own code, and the
table below is the one printed by ``miu-unlearn --help``.

Example:
    >>> from miu_hooks.errors import EmptyGroupError
    >>> exit_code(EmptyGroupError("group 2 emptied")), exit_code(RuntimeError("bug"))
    (9, 1)
"""

from __future__ import annotations

import signal

from miu_hooks.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    EmptyForgetSetError,
    EmptyGroupError,
    FeatureModuleNotFoundError,
    GroupRangeError,
    InputMismatchError,
    LedgerError,
    MIUError,
    NoClassifierOutputError,
    NonFiniteInputError,
    NonFiniteLossError,
    OriginalMismatchError,
)

__all__ = [
    "EXIT_CODES",
    "EXIT_INTERNAL",
    "EXIT_USAGE",
    "ArchitectureError",
    "ForgetListError",
    "InputNotFoundError",
    "Interrupted",
    "MissingDependencyError",
    "NothingToForget",
    "OutputError",
    "exit_code",
    "exit_code_table",
]


class InputNotFoundError(MIUError, FileNotFoundError):
    """An input path (model, data, forget list, reference) does not exist."""


class ArchitectureError(CheckpointError):
    """The architecture cannot be built: no ``config.json`` and no ``--arch``, or a bad factory."""


class ForgetListError(DataError):
    """The forget CSV is unreadable, has no id column, or lists bad, repeated or unknown ids."""


class OutputError(MIUError):
    """The output folder cannot be written, or writing it would overwrite an input."""


class MissingDependencyError(MIUError, ImportError):
    """An optional dependency needed by this input is not installed."""


class NothingToForget(Exception):
    """Every id of the request was forgotten by an earlier one: nothing is run or written.

    Not an :class:`MIUError`: the command line prints the message and exits 0,
    since the input model already is the model without those samples.

    Attributes:
        message: What the command line prints.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Interrupted(KeyboardInterrupt):
    """Raised by the SIGTERM handler so that cleanup runs as for Ctrl-C.

    Attributes:
        signum: The signal that stopped the run.
    """

    def __init__(self, signum: int = signal.SIGINT) -> None:
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        super().__init__(name)
        self.signum = int(signum)


EXIT_INTERNAL = 1
EXIT_USAGE = 2

# (code, exception type, meaning); the most specific type wins (see exit_code).
EXIT_CODES: tuple[tuple[int, type[BaseException] | None, str], ...] = (
    (0, None, "success (also: every id was forgotten before; nothing is written)"),
    (EXIT_INTERNAL, None, "unexpected internal error (set MIU_HOOKS_DEBUG=1 for a traceback)"),
    (EXIT_USAGE, ConfigError, "bad usage: unknown option or method, invalid option value"),
    (3, InputNotFoundError, "an input file or folder does not exist"),
    (4, CheckpointError, "unreadable, truncated or corrupt safetensors; keys/shapes mismatch"),
    (5, ArchitectureError, "no config.json and no --arch, or --arch cannot build the model"),
    (6, DataError, "data unreadable or malformed (e.g. no group column)"),
    (7, ForgetListError, "forget CSV unreadable, header-less, non-integer/duplicate/unknown ids"),
    (8, EmptyForgetSetError, "the forget list is empty"),
    (9, EmptyGroupError, "the forget list removes every sample of a group"),
    (10, GroupRangeError, "a label or group id is out of range, or a group contradicts its label"),
    (11, FeatureModuleNotFoundError, "the classification head (feature tap) was not found"),
    (12, NoClassifierOutputError, "the model output carries no [batch, classes] logits"),
    (13, NonFiniteLossError, "a loss became NaN/Inf during the run (nothing was written)"),
    (14, OutputError, "output folder not writable, not empty, or equal to/containing an input"),
    (15, MissingDependencyError, "an optional dependency is missing (the message says which)"),
    (16, MIUError, "another miu_hooks error"),
    (17, OriginalMismatchError, "the original model's file has another sha256 than the ledger's"),
    (18, LedgerError, "the input's ledger.json is unreadable or does not fit the data or options"),
    (19, InputMismatchError, "the inputs do not fit the model (e.g. --image-size, --test size)"),
    (20, NonFiniteInputError, "the input data hold NaN or Inf (the row is named)"),
    (130, KeyboardInterrupt, "interrupted by Ctrl-C (SIGINT); rerun with --resume"),
    (143, Interrupted, "terminated by SIGTERM; rerun with --resume"),
)
_BY_TYPE = {exc: code for code, exc, _ in EXIT_CODES if exc is not None}


def exit_code(exc: BaseException) -> int:
    """Return the exit code of ``exc``: that of its most specific listed type.

    A SIGTERM interruption exits with ``128 + signal number`` (143), as shells do.
    """
    if isinstance(exc, Interrupted):
        return 128 + exc.signum if exc.signum != signal.SIGINT else 130
    for cls in type(exc).__mro__:
        if cls in _BY_TYPE:
            return _BY_TYPE[cls]
    return EXIT_INTERNAL


def exit_code_table() -> str:
    """Return the exit codes as aligned plain-text lines (for ``--help``)."""
    return "\n".join(f"{code:>4}  {meaning}" for code, _, meaning in EXIT_CODES)
