"""Fingerprints: stable hashes of what determines an output (docs/formats.md, "Fingerprints").

One canonical JSON (sorted keys, compact separators, ``str`` for anything else) for every
spec hash, one byte-level digest for arrays, and one content hash of files and folders, so two
modules never disagree on what "the same spec" or "the same weights" means.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import atomic, layout

log = logging.getLogger(__name__)

# A file whose mtime or ctime is this recent when it is hashed may be written again within the
# same timestamp tick, unseen by its stat: its hash is not cached (as git treats "racy" files).
RACY_NS = 2_000_000_000


def canonical_json(obj: Any) -> str:
    """``obj`` as JSON whose text depends only on its content (key order does not matter)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def spec_hash(obj: Any) -> str:
    """SHA-256 of the canonical JSON of a JSON-able spec."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def arrays_digest(*arrays: np.ndarray | None) -> str:
    """SHA-256 over the shapes, dtypes and bytes of some arrays (None included as such)."""
    digest = hashlib.sha256()
    for a in arrays:
        if a is None:
            digest.update(b"none")
            continue
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(memoryview(a).cast("B"))
    return digest.hexdigest()


def sha256_files(paths: Iterable[str | Path]) -> str:
    """SHA-256 of the files' contents, concatenated in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def content_sha256(path: str | Path, cache: str | Path | None = None) -> str:
    """What a local weights file or model folder holds, by content: a file's SHA-256; a
    folder's, the SHA-256 of the lines ``<name> <sha256>`` of its files (top level, not hidden,
    by name). Each file's hash is cached in ``cache`` (default ``layout.HASH_CACHE``) under its
    resolved path with its (size, mtime_ns, ctime_ns, inode, device), and read again when any of
    these changed, so a multi-GB checkpoint is not read at every DAG build."""
    path, cache = Path(path), Path(cache or layout.HASH_CACHE)
    if not path.is_dir():
        return _file_sha256(path, cache)
    files = sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith("."))
    lines = "".join(f"{f.name} {_file_sha256(f, cache)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _read_cache(cache: Path) -> dict[str, Any]:
    try:
        entries = json.loads(cache.read_text())
    except (OSError, ValueError):  # none yet, or damaged: hash again
        return {}
    return entries if isinstance(entries, dict) else {}


def _file_sha256(path: Path, cache: Path) -> str:
    name, key = str(path.resolve()), _stat_key(path)
    entry = _read_cache(cache).get(name)
    if isinstance(entry, dict) and entry.get("stat") == key and "sha256" in entry:
        return entry["sha256"]
    hashed_at = time.time_ns()
    sha256 = sha256_files([path])
    if _stat_key(path) == key and hashed_at - max(key[1], key[2]) > RACY_NS:
        entries = {
            other: value for other, value in _read_cache(cache).items() if os.path.exists(other)
        }
        entries[name] = {"stat": key, "sha256": sha256}
        try:
            atomic.write_json(cache, entries)
        except OSError as error:  # a read-only results folder: hash again next time
            log.debug("cannot write the hash cache %s: %s", cache, error)
    return sha256
