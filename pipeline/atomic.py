"""Atomic file writes: a reader never sees a half-written file (and a lock for jobs that
share one store).

Everything is written to a temporary sibling and moved into place with ``os.replace``,
which is atomic on POSIX file systems. The file ends with the mode a plain ``open`` would
give it, ``0o666 & ~umask`` (``tempfile.mkstemp`` alone would leave every result 0600,
unreadable to the group a cluster shares results with).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows.

    Linux (4.7 and later) reports it in ``/proc/self/status``; elsewhere it is read by
    setting and restoring it under a lock, which is only racy against other threads that
    create files in that instant without going through this function.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        umask = os.umask(0o022)
        os.umask(umask)
    return umask


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` if the block succeeds.

    The file moved into place has mode ``0o666 & ~umask``, whatever mode the block left.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~current_umask())
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def copy(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Copy a file onto ``target`` atomically; a folder file by file, then remove the files of
    ``target`` that ``source`` lacks: a reader sees every file whole, old or new, never fewer."""
    source, target = Path(source), Path(target)
    if not source.is_dir():
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        return
    files = {path.relative_to(source) for path in source.rglob("*") if path.is_file()}
    for name in sorted(files):
        copy(source / name, target / name)
    for path in sorted(target.rglob("*"), reverse=True):  # a folder after what it holds
        if path.is_file() and path.relative_to(target) not in files:
            path.unlink()
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()


@contextmanager
def locked(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created if missing) for the block: jobs
    that share one store take turns. ``flock`` is advisory and released when the process
    dies, so a killed holder never leaves it taken."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(frame: Any, path: str | os.PathLike[str]) -> None:
    """Write a polars DataFrame or a pyarrow Table to Parquet atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = frame if isinstance(frame, pa.Table) else frame.to_arrow()
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
