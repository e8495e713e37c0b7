"""Content-addressed results: work whose key is the same is done once (docs/architecture.md,
"Identical runs once").

A ``KeyedFolders`` root holds at most one folder per key, ``<root>/<key>/``, which appears
whole or not at all: it is filled in a temporary sibling ``.<key>.<random>`` and moved in with
one rename (atomic on POSIX file systems, NFS included). Every read and write of a key happens
while holding an exclusive lock on ``<root>/<key>.lock`` (``atomic.locked``), so two jobs that
need one key at once take turns: the first does the work and files it, the second finds it.
Entries are a cache: deleting one, or the whole root, only costs the work again.

Where the file system gives no ``flock`` (Lustre mounted ``noflock``), the lock is skipped
with a warning; a lock that is only node-local (docs/architecture.md) has the same effect: two
jobs may then do one key's work twice, each filing its own complete folder, and a reader whose
entry is replaced under it fails and does the work itself.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from pipeline import atomic, layout

log = logging.getLogger(__name__)
KEY = re.compile(r"[0-9a-f]{64}")  # a fingerprint.spec_hash


class KeyedFolders:
    """The content-addressed folders under ``root`` (module docstring)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def folder(self, key: str) -> Path:
        if not KEY.fullmatch(key):
            raise ValueError(f"{key!r} is not a content key (a 64-digit SHA-256)")
        return self.root / key

    def entries(self) -> list[Path]:
        """Every filed folder (temporary ones and locks left out)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and KEY.fullmatch(p.name))

    @contextmanager
    def claim(self, key: str) -> Iterator[Path | None]:
        """Hold ``key``'s lock for the block; yield its folder when one is filed, else None."""
        folder = self.folder(key)
        with ExitStack() as stack:
            try:
                stack.enter_context(atomic.locked(f"{folder}{layout.LOCK_SUFFIX}"))
            except OSError as error:  # no flock on this file system
                log.warning("%s: no lock (%s); jobs may repeat this key's work", folder, error)
            yield folder if folder.is_dir() else None

    def put(self, key: str, fill: Callable[[Path], None]) -> Path:
        """File ``key``'s folder (inside ``claim``): ``fill(folder)`` writes it in a temporary
        sibling, which then replaces any folder filed before."""
        folder = self.folder(key)
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f".{key}.*"):  # left by a killed job (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        try:
            os.chmod(tmp, 0o777 & ~atomic.current_umask())  # mkdtemp's 0700 would hide it
            fill(tmp)
            if folder.is_dir():
                old = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
                os.replace(folder, old / key)  # out of the way in one rename, then removed
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return folder


def link_files(source: Path, target: Path) -> None:
    """Hard links in ``target`` to every file of the folder ``source`` (copies where the file
    system has none): an entry that shares its bytes with a run folder, and keeps them when
    the run is written again (every write replaces a file by a new one, ``pipeline.atomic``).
    Hidden files (a killed write's temporaries) are left out."""
    for path in sorted(source.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            try:
                os.link(path, target / path.name)
            except OSError:
                shutil.copy2(path, target / path.name)
