"""Count the host reads of tensor values that ``miu_hooks`` code makes (GPU syncs).

On a GPU, reading a tensor's value on the host (``t.item()``, ``bool(t)``,
``int(t)``, ``float(t)``, ``t.tolist()``, a tensor used as a Python index,
``t.cpu()``) waits for every kernel queued before it. :class:`HostReadCounter`
patches those ``torch.Tensor`` methods for the length of a ``with`` block and
counts the calls made while ``miu_hooks`` code is on the call stack, so the
count can be taken on a CPU, where nothing actually waits.

Calls are not counted when the DataLoader machinery is on the stack: samplers
and collation work on host tensors by design (the REWEIGHT sampler's draws, the
loader's seeds), which read nothing from a GPU. On a GPU,
``torch.cuda.set_sync_debug_mode`` counts the real syncs instead
(``benchmarks/gpu_check.py`` does both).

Used by ``tests/unit/test_host_syncs.py`` (loaded by path) and ``gpu_check.py``.
"""

from __future__ import annotations

import collections
import os
import sys
from collections.abc import Iterable
from types import FrameType, TracebackType
from typing import Any

import torch

__all__ = ["READS", "HostReadCounter"]

#: The ``torch.Tensor`` methods that read a value on the host.
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu")


def _package_roots() -> tuple[str, ...]:
    import miu_hooks

    roots = [os.path.dirname(os.path.abspath(miu_hooks.__file__))]
    try:
        import miu_hooks.integrations as integrations

        roots.append(os.path.dirname(os.path.abspath(integrations.__file__)))
    except ImportError:  # the Trainer/Accelerate extras are not installed
        pass
    return tuple(root + os.sep for root in roots)


_EXCLUDED = (os.sep + os.path.join("torch", "utils", "data") + os.sep,)


class HostReadCounter:
    """Count host reads of tensor values made from ``miu_hooks`` code (see the module doc).

    Attributes:
        count: Reads counted so far.
        sites: ``(method, file:line of the innermost miu_hooks frame) -> count``.

    Example:
        >>> import miu_hooks.functional as F
        >>> with HostReadCounter() as reads:
        ...     _ = F.group_counts(torch.tensor([0, 1]), 2)
        >>> reads.count
        1
    """

    def __init__(self, roots: Iterable[str] | None = None) -> None:
        self.roots = tuple(roots) if roots is not None else _package_roots()
        self.count = 0
        self.sites: collections.Counter[tuple[str, str]] = collections.Counter()
        self._saved: dict[str, Any] = {}

    def _site(self, frame: FrameType | None) -> str | None:
        """The innermost frame in the package, or ``None`` when not counted."""
        site: str | None = None
        while frame is not None:
            name = frame.f_code.co_filename
            if any(part in name for part in _EXCLUDED):
                return None
            if site is None and name.startswith(self.roots):
                site = f"{os.path.basename(name)}:{frame.f_lineno}"
            frame = frame.f_back
        return site

    def _wrap(self, method: str, original: Any) -> Any:
        counter = self

        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            site = counter._site(sys._getframe(1))
            if site is not None:
                counter.count += 1
                counter.sites[(method, site)] += 1
            return original(tensor, *args, **kwargs)

        return counted

    def __enter__(self) -> HostReadCounter:
        for method in READS:
            original = getattr(torch.Tensor, method)
            self._saved[method] = torch.Tensor.__dict__.get(method, _MISSING)
            setattr(torch.Tensor, method, self._wrap(method, original))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for method, saved in self._saved.items():
            if saved is _MISSING:
                delattr(torch.Tensor, method)
            else:
                setattr(torch.Tensor, method, saved)
        self._saved = {}

    def report(self, top: int = 12) -> str:
        """The most frequent sites, one per line."""
        return "\n".join(f"{n:6d}  {m:<9} {site}" for (m, site), n in self.sites.most_common(top))


_MISSING = object()
