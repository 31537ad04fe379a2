"""Deferred step checks: many device-side conditions, one host read per training step.

Reading a CUDA tensor's value on the host (``bool(t)``, ``t.item()``) waits for
every kernel queued before it. A step that checks its labels, its group ids and
the finiteness of three loss terms one by one therefore stalls the GPU five
times. Here each condition is recorded as a boolean tensor with the error it
stands for; :meth:`StepChecks.flush` reads them **once** (one ``bool`` of their
conjunction) and, only when one failed, finds and raises the first failing
check's error.

* :func:`require` records a check in the active scope, or reads it at once when
  there is none (the behaviour of a plain call).
* :func:`deferred` opens a scope, or joins the one already open, so a step
  nested in a larger loop (an epoch of :func:`miu_hooks.unlearn`) is read by the
  loop's own flush, right before its optimiser step.
* Rank-local checks (a label range on this rank's batch, a loss term computed
  from this rank's batch) must fail on *every* rank, otherwise the healthy ranks
  wait in the next collective until a timeout. :meth:`StepChecks.local_code`
  folds the pending local checks into a number that the engine gathers with the
  step's features (:meth:`StepChecks.globalise`); a step without such a gather
  all-reduces it in :meth:`StepChecks.flush` (``reduce_max``). Either way every
  rank reads the same verdict and raises: the rank whose check failed raises
  its own error, the others an error naming that rank (`GroupRangeError` or
  `NonFiniteLossError`, by the kind of check).

Checks used inside a scope must not let a bad value crash the device first:
:func:`miu_hooks.functional.checked_cross_entropy` clamps labels before the
loss (an out-of-range target is a device-side assert on CUDA) and reports them
through :func:`require`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import Tensor

from miu_hooks.errors import GroupRangeError, MIUError, NonFiniteLossError

__all__ = [
    "GROUP_RANGE",
    "LABEL_RANGE",
    "NON_FINITE",
    "StepChecks",
    "active_checks",
    "deferred",
    "require",
]

#: Codes of the kinds of failure, in the order they are reported across ranks.
LABEL_RANGE, GROUP_RANGE, NON_FINITE = 1, 2, 3
_KINDS: dict[int, tuple[type[MIUError], str]] = {
    LABEL_RANGE: (GroupRangeError, "a label outside the model's classes"),
    GROUP_RANGE: (GroupRangeError, "a group id outside [0, num_groups)"),
    NON_FINITE: (NonFiniteLossError, "a non-finite loss term"),
}

ErrorFactory = Callable[[], MIUError]
Reduce = Callable[[Tensor], Tensor]

_ACTIVE: ContextVar[StepChecks | None] = ContextVar("miu_hooks_step_checks", default=None)


@dataclass
class _Check:
    ok: Tensor
    error: ErrorFactory
    code: int
    local: bool  # not covered by a gathered verdict yet
    own: bool  # depends on this rank's data only (reported before other ranks' failures)


class StepChecks:
    """Checks recorded since the last :meth:`flush` (see the module docstring).

    Attributes:
        reads: Host reads made by :meth:`flush` so far (one per flush with pending
            checks while everything passes).

    Example:
        >>> checks = StepChecks()
        >>> checks.add(torch.tensor(True), lambda: NonFiniteLossError("never"), NON_FINITE)
        >>> checks.flush()
        >>> checks.add(torch.tensor(False), lambda: NonFiniteLossError("bad"), NON_FINITE)
        >>> checks.flush()
        Traceback (most recent call last):
        ...
        miu_hooks.errors.NonFiniteLossError: bad
    """

    def __init__(self) -> None:
        self._pending: list[_Check] = []
        self._remote: list[Tensor] = []  # gathered local codes, one entry per rank
        self.reads = 0

    def add(self, ok: Tensor, error: ErrorFactory, code: int, *, local: bool = True) -> None:
        """Record that ``ok`` (a boolean tensor, reduced with ``all``) must hold.

        Args:
            ok: Boolean tensor; the check passes when every element is true.
            error: Builds the error raised when the check fails (called only then).
            code: :data:`LABEL_RANGE`, :data:`GROUP_RANGE` or :data:`NON_FINITE`.
            local: Whether the value depends on this rank's data only (``False`` for
                values computed from gathered data, equal on every rank).
        """
        self._pending.append(_Check(ok.detach().reshape(-1).all(), error, code, local, local))

    @property
    def pending(self) -> int:
        """Number of checks recorded since the last flush."""
        return len(self._pending)

    def local_code(self, device: torch.device | None = None) -> Tensor:
        """Float scalar: the largest code of a failing local check, 0 when none fails.

        No host read; gather it with the step's features and pass the result to
        :meth:`globalise`.
        """
        local = [c for c in self._pending if c.local]
        if not local:
            return torch.zeros((), device=device)
        codes = torch.stack([c.ok.logical_not().float() * c.code for c in local])
        return codes.amax().to(device) if device is not None else codes.amax()

    def globalise(self, codes: Tensor) -> None:
        """Use ``codes`` (every rank's :meth:`local_code`, in rank order) as the verdict.

        The local checks recorded so far are now covered on every rank: the flush
        fails on all ranks when any entry of ``codes`` is non-zero.
        """
        for check in self._pending:
            check.local = False
        self._remote.append(codes.detach().reshape(-1).float())

    def flush(self, reduce_max: Reduce | None = None) -> None:
        """Read every pending check at once and raise the first failing one's error.

        Args:
            reduce_max: All-reduces a tensor with ``max`` over ranks (several
                processes); used for local checks no gather has covered.

        Raises:
            MIUError: The error of the first failing check of this rank, or, when
                only another rank failed, an error naming it (by the kind of check).
        """
        if not self._pending and not self._remote:
            return
        pending, remote = self._pending, self._remote
        self._pending, self._remote = [], []
        if reduce_max is not None and any(c.local for c in pending):
            code = torch.stack([c.ok.logical_not().float() * c.code for c in pending if c.local])
            remote.append(reduce_max(code.amax().reshape(1)))
        flags = [c.ok for c in pending] + [(r == 0).all() for r in remote]
        self.reads += 1
        if bool(torch.stack([f.to(flags[0].device) for f in flags]).all()):
            return
        # Failure path only (more reads are fine): this rank's own data first, then
        # another rank's, then values of the global batch (which a bad rank spoils too).
        for check in pending:
            if check.own and not bool(check.ok):
                raise check.error()
        for codes in remote:
            if bool((codes != 0).any()):
                rank = int(codes.argmax()) if codes.numel() > 1 else None
                raise _remote_error(int(codes.max()), rank)
        for check in pending:
            if not bool(check.ok):
                raise check.error()


def _remote_error(code: int, rank: int | None) -> MIUError:
    cls, what = _KINDS.get(code, (NonFiniteLossError, "a failed check"))
    where = f"rank {rank}" if rank is not None else "another rank"
    return cls(
        f"{where} found {what} in this step (its own error names it); every rank stops here"
    )


def active_checks() -> StepChecks | None:
    """The checks of the innermost open :func:`deferred` scope, if any."""
    return _ACTIVE.get()


def require(ok: Tensor, error: ErrorFactory, code: int, *, local: bool = True) -> None:
    """Record ``ok`` in the active scope, or check it now (one host read) without one.

    Example:
        >>> require(torch.tensor([True, True]), lambda: GroupRangeError("no"), GROUP_RANGE)
        >>> with deferred() as checks:
        ...     require(torch.tensor(True), lambda: GroupRangeError("no"), GROUP_RANGE)
        ...     checks.pending
        1
    """
    checks = _ACTIVE.get()
    if checks is not None:
        checks.add(ok, error, code, local=local)
    elif not bool(ok.detach().all()):
        raise error()


@contextlib.contextmanager
def deferred(reduce_max: Reduce | None = None) -> Iterator[StepChecks]:
    """Collect :func:`require` calls; read them once when the scope ends without error.

    Inside an open scope this joins it and reads nothing on exit: the scope's
    owner flushes (e.g. right before its optimiser step).

    Args:
        reduce_max: See :meth:`StepChecks.flush` (only used by a new scope).

    Example:
        >>> with deferred() as checks:
        ...     require(torch.isfinite(torch.tensor(1.0)), lambda: NonFiniteLossError("x"),
        ...             NON_FINITE)
        >>> checks.reads
        1
    """
    outer = _ACTIVE.get()
    if outer is not None:
        yield outer
        return
    checks = StepChecks()
    token = _ACTIVE.set(checks)
    try:
        yield checks
    finally:
        _ACTIVE.reset(token)
    checks.flush(reduce_max)
