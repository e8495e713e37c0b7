"""Content-addressed encoder weights: local weights are known by their SHA-256, not their path
(docs/formats.md, "Encoder weights").

Local weights are a file (timm's and open_clip's ``weights``) or a model folder (a Hugging Face
``name`` that is a local directory). Their known SHA-256 (``known_weights``) is

- for a user's weights, the ``weights_sha256`` the planner put in the spec from the bytes on disk
  (``registry.planned_spec``): it is in every job spec and store request naming the encoder, so a
  rewritten file reruns what reads it and readers refuse stores extracted from other bytes;
- for weights pretrained here (a spec with a ``pretrain`` block), the ``weights_sha256`` of the
  pretraining's record beside them (``layout.weights_record``), written with them.

``check_weights`` compares the bytes with it before a model reads them (``build_encoder``), and
``python -m pipeline verify`` does the same for every file under ``results/pretrained``.
Torch-free: the planner imports it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import layout
from pipeline.fingerprint import content_sha256

from .base import EncoderLoadError


class WeightsIntegrityError(EncoderLoadError):
    """Local weights whose bytes are not the ones they are known by; names encoder, file, repair."""


@dataclass(frozen=True)
class KnownWeights:
    """Local weights and the SHA-256 they must have: ``source`` says where it is known from,
    ``repair`` what to do when the bytes differ."""

    encoder: str
    path: Path
    sha256: str
    source: str
    repair: str


def pretrained_here(encoder: str, weights: str | Path) -> KnownWeights:
    """Weights written by ``encoder``'s pretrain_encoder job, known by their record's hash."""
    record = Path(layout.weights_record(str(weights)))
    repair = f"run its pretrain_encoder job again (snakemake --force {weights})"
    try:
        sha256 = json.loads(record.read_text())["weights_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise WeightsIntegrityError(
            f"encoder {encoder!r}: weights {weights} have no readable record of their SHA-256 "
            f"({record}: {error}): {repair}"
        ) from error
    return KnownWeights(encoder, Path(weights), str(sha256), f"as recorded in {record}", repair)


def known_weights(encoder: str, spec: Mapping[str, Any], local: Path | None) -> KnownWeights | None:
    """What the local weights ``local`` of ``spec`` must hash to (None: nothing is known, as for
    a spec built by hand without ``weights_sha256``, or no local weights)."""
    if local is None:
        return None
    if "pretrain" in spec:
        return pretrained_here(encoder, local)
    if spec.get("weights_sha256") is None:
        return None
    repair = (
        "they changed after the workflow was planned; run it again, which plans with their "
        "new contents"
    )
    return KnownWeights(encoder, local, spec["weights_sha256"], "as planned", repair)


def check_weights(known: KnownWeights) -> str:
    """The SHA-256 of ``known.path``, after checking it is ``known.sha256``."""
    found = content_sha256(known.path)
    if found != known.sha256:
        raise WeightsIntegrityError(
            f"encoder {known.encoder!r}: weights {known.path} have SHA-256 {found[:12]}, not "
            f"{known.sha256[:12]} {known.source} (damaged or replaced): {known.repair}"
        )
    return found
