"""What identifies a store's contents, for both layouts (docs/formats.md, "Fingerprints").

A ``request_hash`` is what a reading job expects, from its config alone (no model is loaded;
the planned encoder spec carries local weights by their SHA-256, ``registry.planned_spec``);
a ``fingerprint`` adds what only extraction knows (weights checksums, preprocessing, the
dataset's content hash). Both hash the layout's format version with the encoder, dataset,
split and precision, plus what the layout adds (``extra``: a token store's dtype and layer).
Torch- and Zarr-free: the planner imports it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.fingerprint import spec_hash


@dataclass(frozen=True)
class Format:
    """One store layout's identity: its name in messages, its format version, the extra keys
    its hashes carry (``tag``) and the rule that writes it (repair hints)."""

    kind: str
    version: int
    stage: str
    tag: dict[str, Any] = field(default_factory=dict)


# Features 2: crc32c on every chunk, finite values only, 'complete' marks a finish; 3 (tokens
# 2): each block's file sizes recorded as written (``block_bytes``), token fill NaN.
FEATURES = Format("feature store", 3, "extract_features")
TOKENS = Format("token store", 2, "extract_tokens", {"format": "tokens"})


def request_hash(
    fmt: Format,
    encoder_name: str,
    encoder_spec: dict[str, Any],
    dataset: str,
    split: str,
    precision: str,
    **extra: Any,
) -> str:
    """What a store is asked to hold, as the config says it (a token store's layer is not in
    it: chosen at run time, it is checked on its own)."""
    return spec_hash(
        {
            **fmt.tag,
            "format_version": fmt.version,
            "encoder_name": encoder_name,
            "encoder": encoder_spec,
            "dataset": dataset,
            "split": split,
            "precision": precision,
            **extra,
        }
    )


def fingerprint(
    fmt: Format,
    provenance: dict[str, Any],
    dataset: dict[str, Any],
    split: str,
    precision: str,
    **extra: Any,
) -> str:
    """Everything that determines a store's values (library versions are recorded, not keyed)."""
    return spec_hash(
        {
            **fmt.tag,
            "format_version": fmt.version,
            "encoder": {k: v for k, v in provenance.items() if k != "versions"},
            "dataset": dataset["name"],
            "content_hash": dataset["content_hash"],
            "split": split,
            "precision": precision,
            **extra,
        }
    )
