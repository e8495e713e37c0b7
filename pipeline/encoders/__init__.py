"""Frozen encoders: a pooled vector per layer (and every token of chosen layers), from timm,
Hugging Face or a bundled model."""

from .base import Encoder, EncoderLoadError, EncoderSpecError
from .registry import SOURCES, build_encoder, validate_encoder_spec

__all__ = [
    "SOURCES",
    "Encoder",
    "EncoderLoadError",
    "EncoderSpecError",
    "build_encoder",
    "validate_encoder_spec",
]
