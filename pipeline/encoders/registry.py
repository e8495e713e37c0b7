"""The encoder registry: ``spec["source"]`` names a spec parser and an encoder class."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .base import Encoder, EncoderSpecError
from .text import HFTextEncoder, parse_bundled_spec, parse_hf_spec
from .vision import TimmVisionEncoder, parse_timm_spec


class Source(NamedTuple):
    parse: Callable[[str, Mapping[str, Any]], Any]
    encoder: Callable[[str, Any], Encoder]


SOURCES: dict[str, Source] = {
    "timm": Source(parse_timm_spec, TimmVisionEncoder),
    "huggingface": Source(parse_hf_spec, HFTextEncoder),
    "bundled": Source(parse_bundled_spec, HFTextEncoder),
}


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


def build_encoder(name: str, spec: Mapping[str, Any]) -> Encoder:
    """Validate ``spec`` and construct its encoder, weights loaded, in eval mode on the CPU."""
    source = _source(name, spec)
    return source.encoder(name, source.parse(name, spec))
