"""Versions of the libraries that determine a stage's numbers, recorded in its outputs."""

from __future__ import annotations

import platform
from importlib import metadata

TRACKED = ("torch", "timm", "transformers", "numpy", "zarr", "scikit-learn", "postalign")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
