"""Fingerprints: stable hashes of what determines an output (docs/formats.md, "Fingerprints").

One canonical JSON (sorted keys, compact separators, ``str`` for anything else) for every
spec hash, and one byte-level digest for arrays, so two modules never disagree on what
"the same spec" means.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np


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
