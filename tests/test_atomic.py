"""Atomic writes: all-or-nothing, and the final file's mode follows the umask."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import polars as pl
import pytest

from pipeline import atomic


@pytest.fixture
def umask():
    """Set the process umask for one test, restoring it afterwards."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_umask(value: int) -> None:
        os.umask(value)

    yield set_umask
    os.umask(saved)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    assert atomic.current_umask() == mask
    atomic.write_text(tmp_path / "a.txt", "hello")
    atomic.write_json(tmp_path / "sub" / "b.json", {"x": 1})
    atomic.write_parquet(pl.DataFrame({"x": [1, 2]}), tmp_path / "c.parquet")
    with atomic.atomic_path(tmp_path / "d.bin") as tmp:
        tmp.write_bytes(b"\0")
        tmp.chmod(0o600)  # whatever the block leaves, the result follows the umask
    for name in ("a.txt", "sub/b.json", "c.parquet", "d.bin"):
        assert mode(tmp_path / name) == expected, name
    assert (tmp_path / "a.txt").read_text() == "hello"


def test_umask_fallback_without_proc(tmp_path, umask, monkeypatch):
    umask(0o027)
    real_open = open

    def no_proc(file, *args, **kwargs):
        if str(file).startswith("/proc/"):
            raise FileNotFoundError(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_proc)
    assert atomic.current_umask() == 0o027
    monkeypatch.undo()
    assert atomic.current_umask() == 0o027  # the fallback restored it


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.txt"
    atomic.write_text(target, "old")
    with pytest.raises(RuntimeError), atomic.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]
