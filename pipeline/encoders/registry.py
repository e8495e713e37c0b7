"""The encoder registry: ``spec["source"]`` names a modality, a spec parser and an encoder class.

Parsers are torch-free (``specs.py``), so validating a config never imports a model library;
the encoder class is imported only when an encoder is built.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pipeline.fingerprint import canonical_json, content_sha256

from .base import Encoder, EncoderSpecError
from .specs import parse_bundled_spec, parse_hf_spec, parse_open_clip_spec, parse_timm_spec
from .weights import KnownWeights, check_weights, known_weights


class Source(NamedTuple):
    modality: Literal["vision", "text"]
    parse: Callable[[str, Mapping[str, Any]], Any]
    encoder: str  # "module:Class" of the encoder, imported on build


SOURCES: dict[str, Source] = {
    "timm": Source("vision", parse_timm_spec, "pipeline.encoders.vision:TimmVisionEncoder"),
    "huggingface": Source("text", parse_hf_spec, "pipeline.encoders.text:HFTextEncoder"),
    "bundled": Source("text", parse_bundled_spec, "pipeline.encoders.text:HFTextEncoder"),
    # the two towers of one CLIP model, an already-aligned pair (the reference row)
    "open_clip_vision": Source(
        "vision", parse_open_clip_spec, "pipeline.encoders.clip:OpenCLIPVisionEncoder"
    ),
    "open_clip_text": Source(
        "text", parse_open_clip_spec, "pipeline.encoders.clip:OpenCLIPTextEncoder"
    ),
}


def sources_of(modality: str) -> list[str]:
    """The source names whose encoders are of ``modality`` ("vision" or "text")."""
    return [name for name, source in SOURCES.items() if source.modality == modality]


def _source(name: str, spec: Mapping[str, Any]) -> Source:
    if not isinstance(spec, Mapping):
        raise EncoderSpecError(name, None, f"spec must be a mapping, got {type(spec).__name__}")
    source = spec.get("source")
    if source not in SOURCES:
        raise EncoderSpecError(name, "source", f"unknown {source!r}; known: {sorted(SOURCES)}")
    return SOURCES[source]


def validate_encoder_spec(name: str, spec: Mapping[str, Any]) -> None:
    """Cheap checks (keys, types, local files) without loading any model."""
    _source(name, spec).parse(name, spec)


@lru_cache(maxsize=256)
def _local_weights(name: str, spec_json: str) -> Path | None:
    """The local weights file or folder of a spec (parsed once per spec: the planner asks often)."""
    spec = json.loads(spec_json)
    return _source(name, spec).parse(name, spec).local_weights


def local_weights(name: str, spec: Mapping[str, Any]) -> Path | None:
    """The local file or folder an encoder's weights are read from, None for hub, bundled or
    random weights."""
    return _local_weights(name, canonical_json(spec))


def planned_spec(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec an encoder of the config is built from: with local weights, their SHA-256 as
    ``weights_sha256`` (``weights``: content-addressed, docs/formats.md, "Encoder weights")."""
    local = local_weights(name, spec)
    return dict(spec) if local is None else {**spec, "weights_sha256": content_sha256(local)}


def encoder_weights(name: str, spec: Mapping[str, Any]) -> KnownWeights | None:
    """The local weights of ``spec`` with the SHA-256 they are known by (``known_weights``)."""
    return known_weights(name, spec, local_weights(name, spec))


def build_encoder(name: str, spec: Mapping[str, Any]) -> Encoder:
    """Validate ``spec`` and construct its encoder, weights loaded, in eval mode on the CPU;
    local weights are checked against their known SHA-256 first (``check_weights``)."""
    source = _source(name, spec)
    parsed = source.parse(name, spec)
    if (known := known_weights(name, spec, parsed.local_weights)) is not None:
        check_weights(known)
    module, cls = source.encoder.split(":")
    return getattr(importlib.import_module(module), cls)(name, parsed)
