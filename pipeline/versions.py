"""Versions of the libraries that determine a stage's numbers, recorded in its outputs, and of
the package's own code (``code_version``: part of every content key, ``pipeline.reuse``)."""

from __future__ import annotations

import hashlib
import platform
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

TRACKED = ("torch", "timm", "transformers", "numpy", "zarr", "scikit-learn", "postalign")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@cache
def source_digest() -> str:
    """SHA-256 over the package's Python sources (each file's path and bytes, in path order)."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


@cache
def code_version() -> dict[str, Any]:
    """The library versions and the digest of this package's sources: a result made with other
    code is never taken for this code's (an edit to any module, a comment included, counts)."""
    return {"libraries": library_versions(), "sources": source_digest()}
