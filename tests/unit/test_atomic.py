"""Atomic writes: a failure at any point leaves the old file (or folder) and no temporary file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from miu_hooks import atomic
from miu_hooks.atomic import (
    atomic_save_safetensors,
    atomic_write,
    atomic_write_bytes,
    atomic_write_folder,
    atomic_write_text,
)

pytestmark = pytest.mark.unit


def _names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_text_and_bytes_replace_the_old_content(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text("old")
    assert atomic_write_text(path, "new ü") == path
    assert path.read_text(encoding="utf-8") == "new ü"
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert _names(tmp_path) == ["r.json"]


def test_creates_missing_parent_folders(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "a" / "b" / "c.txt", "x")
    assert path.read_text() == "x"


def test_file_gets_the_usual_mode_not_mkstemps_0600(tmp_path: Path) -> None:
    mask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "m.txt", "x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_mid_write_keeps_the_old_file_and_no_temp_file(
    tmp_path: Path, error: BaseException
) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old weights")

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half of the new")  # partly written, then the failure
        raise error

    with pytest.raises(type(error)):
        atomic_write(path, write)
    assert path.read_bytes() == b"old weights"
    assert _names(tmp_path) == ["model.safetensors"]


def test_failure_in_the_rename_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")

    def fail(src: object, dst: object) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert _names(tmp_path) == ["state.json"]


def test_failure_without_an_old_file_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        atomic_write(tmp_path / "x.bin", lambda tmp: (_ for _ in ()).throw(ValueError("bad")))
    assert _names(tmp_path) == []


def test_safetensors_round_trip_with_metadata(tmp_path: Path) -> None:
    tensors = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2])}
    path = atomic_save_safetensors(tmp_path / "t.safetensors", tensors, {"epoch": "3"})
    loaded = load_file(path)
    assert set(loaded) == {"w", "b"}
    assert torch.equal(loaded["w"], tensors["w"]) and torch.equal(loaded["b"], tensors["b"])
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"epoch": "3"}
    assert _names(tmp_path) == ["t.safetensors"]


def test_safetensors_error_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    atomic_save_safetensors(path, {"w": torch.ones(2)})
    shared = torch.zeros(4)
    with pytest.raises(Exception):  # noqa: B017 - safetensors refuses shared memory
        atomic_save_safetensors(path, {"a": shared, "b": shared})
    assert torch.equal(load_file(path)["w"], torch.ones(2))
    assert _names(tmp_path) == ["t.safetensors"]


def test_folder_is_replaced_whole(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    written = atomic_write_folder(
        out, {"a.txt": lambda p: p.write_text("a"), "plot.png": lambda p: False}
    )
    assert written == ["a.txt"]
    assert _names(out) == ["a.txt"] and _names(tmp_path) == ["out"]


def test_folder_writer_failure_keeps_the_old_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("old")

    def fail(p: Path) -> None:
        p.write_text("partial")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError):
        atomic_write_folder(out, {"report.json": lambda p: p.write_text("new"), "x": fail})
    assert (out / "report.json").read_text() == "old"
    assert _names(out) == ["report.json"] and _names(tmp_path) == ["out"]
