"""Atomic file writes: a temporary file beside the destination, fsync, then a rename.

Every file the library writes (weights, resume state, reports) goes through
:func:`atomic_write` (or :func:`atomic_write_folder` for a whole output
folder), so an interruption or an error leaves either the old file or the
complete new one, and never a temporary file. The temporary file lives in the
destination's folder (a rename is atomic only within one file system), is
flushed to disk before :func:`os.replace`, and gets the usual file mode
(``0o666`` minus the umask) rather than :func:`tempfile.mkstemp`'s ``0o600``.

Only the standard library is imported; safetensors is imported when
:func:`atomic_save_safetensors` is called.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "atomic_save_safetensors",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_folder",
    "atomic_write_text",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """Create or replace ``path`` by calling ``write(tmp)`` on a temporary file, atomically.

    ``write`` receives the path of an empty temporary file in the destination's
    folder and writes the whole content there (it may also replace the file, as
    some libraries do). The file is then fsynced and renamed over ``path``. On
    any error, ``KeyboardInterrupt`` included, the temporary file is removed,
    ``path`` is left as it was and the error propagates. Missing parent folders
    are created.

    Args:
        path: The destination.
        write: Writes the content to the path it is given.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Example:
        >>> import tempfile
        >>> p = atomic_write(Path(tempfile.mkdtemp()) / "a.txt", lambda t: t.write_text("hi"))
        >>> p.read_text(), sorted(q.name for q in p.parent.iterdir())
        ('hi', ['a.txt'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_folder(
    out: str | os.PathLike[str], writers: Mapping[str, Callable[[Path], Any]]
) -> list[str]:
    """Create folder ``out`` with one file per writer, atomically.

    Every file is written into a fresh hidden folder beside ``out``, which is
    then renamed to ``out`` (an existing ``out`` is swapped out and deleted), so
    an interruption leaves either the old folder or the complete new one. A
    writer returning ``False`` wrote nothing (e.g. an optional plot). The files
    are fsynced before the rename.

    Args:
        out: The folder to create or replace.
        writers: File name -> function writing that file at the path it is given.

    Returns:
        The names of the files written.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "run"
        >>> writers = {"a.txt": lambda p: p.write_text("1"), "b.png": lambda p: False}
        >>> atomic_write_folder(out, writers)
        ['a.txt']
        >>> sorted(q.name for q in out.iterdir()), sorted(q.name for q in out.parent.iterdir())
        (['a.txt'], ['run'])
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    try:
        written = [name for name, write in writers.items() if write(tmp / name) is not False]
        for name in written:
            _fsync_file(tmp / name)
        if out.exists():
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if old.exists() and not out.exists():
                os.rename(old, out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return written


def _fsync_file(path: Path) -> None:
    if path.is_file():
        with open(path, "rb+") as fh:
            os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    """Flush the rename to disk where the platform allows it (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`).

    Example:
        >>> import tempfile
        >>> atomic_write_bytes(Path(tempfile.mkdtemp()) / "b.bin", b"ok").read_bytes()
        b'ok'
    """
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`).

    Example:
        >>> import tempfile
        >>> atomic_write_text(Path(tempfile.mkdtemp()) / "r.json", "{}").read_text()
        '{}'
    """
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def atomic_save_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Save ``tensors`` (and string ``metadata``) to ``path`` as safetensors, atomically.

    Tensors must be contiguous and must not share memory
    (:func:`safetensors.torch.save_file`'s rules).

    Example:
        >>> import tempfile, torch
        >>> from safetensors.torch import load_file
        >>> p = atomic_save_safetensors(Path(tempfile.mkdtemp()) / "t.safetensors",
        ...                             {"w": torch.ones(2)}, {"epoch": "3"})
        >>> load_file(p)["w"].tolist()
        [1.0, 1.0]
    """
    from safetensors.torch import save_file

    meta = dict(metadata) if metadata is not None else None
    return atomic_write(path, lambda tmp: save_file(dict(tensors), str(tmp), metadata=meta))
