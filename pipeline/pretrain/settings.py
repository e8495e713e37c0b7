"""Settings of an encoder's ``pretrain`` block, checked without torch (docs/pretrain.md)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLIT = "pretrain"
DEFAULTS: dict[str, Any] = {
    "images": 8192,  # distinct unpaired images, rendered once
    "steps": 210,
    "batch_size": 128,  # images per step (two views each)
    "lr": 2.0e-3,
    "weight_decay": 0.05,
    "warmup_steps": 20,
    "temperature": 0.1,
    "projection_dim": 128,
    "recolour": 0.85,  # fraction of images whose views repaint the objects
    "rescale": 1.4,  # views scale the objects by up to this factor (or its inverse)
    "seed": 0,
}
KEYS = ("dataset", *DEFAULTS)
ZERO_ALLOWED = ("weight_decay", "warmup_steps", "recolour", "seed")


class PretrainSpecError(ValueError):
    """A malformed ``pretrain`` block; the message names the encoder and the key."""

    def __init__(self, encoder: str, key: str | None, problem: str) -> None:
        where = f"encoder {encoder!r}, pretrain" + (f" key {key!r}" if key else "")
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True)
class PretrainSettings:
    dataset: str
    images: int
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    temperature: float
    projection_dim: int
    recolour: float
    rescale: float
    seed: int


def parse_settings(encoder: str, block: Any) -> PretrainSettings:
    """The ``pretrain`` block of an encoder with defaults filled in (torch is not needed)."""
    if not isinstance(block, Mapping):
        raise PretrainSpecError(encoder, None, f"must be a mapping, not {type(block).__name__}")
    unknown = sorted(str(key) for key in block if key not in KEYS)
    if unknown:
        raise PretrainSpecError(encoder, unknown[0], f"is unknown (known: {list(KEYS)})")
    if not isinstance(block.get("dataset"), str):
        raise PretrainSpecError(encoder, "dataset", "must name a synthetic dataset of the config")
    values: dict[str, Any] = {"dataset": block["dataset"]}
    for key, default in DEFAULTS.items():
        value = block.get(key, default)
        number = int if isinstance(default, int) else int | float
        ok = isinstance(value, number) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not (value > 0 or (value == 0 and key in ZERO_ALLOWED)):
            kind = "an integer" if isinstance(default, int) else "a number"
            bound = ">= 0" if key in ZERO_ALLOWED else "> 0"
            raise PretrainSpecError(encoder, key, f"must be {kind} {bound}, not {value!r}")
        values[key] = value
    if values["batch_size"] < 2:
        raise PretrainSpecError(encoder, "batch_size", "needs at least 2 images for negatives")
    if values["recolour"] > 1:
        raise PretrainSpecError(
            encoder, "recolour", f"is a fraction in [0, 1], not {values['recolour']}"
        )
    if values["rescale"] < 1:
        raise PretrainSpecError(
            encoder, "rescale", f"must be >= 1 (1: no scaling), not {values['rescale']}"
        )
    return PretrainSettings(**values)


def initial_spec(encoder_spec: Mapping[str, Any]) -> dict[str, Any]:
    """The encoder spec trained from: same architecture, a random init seeded by the pretrain
    block's ``seed``, no pretrain block."""
    skip = ("pretrain", "weights", "pretrained", "init_seed")
    seed = encoder_spec["pretrain"].get("seed", DEFAULTS["seed"])
    kept = {key: value for key, value in encoder_spec.items() if key not in skip}
    return {**kept, "pretrained": False, "init_seed": seed}


def pretrained_spec(encoder_spec: Mapping[str, Any], weights: str | Path) -> dict[str, Any]:
    """The spec that extraction builds: the pretrain block kept (so a change in it changes
    the spec) and the trained weights loaded through the timm encoder's ``weights`` key."""
    skip = ("weights", "pretrained", "init_seed")
    return {**{k: v for k, v in encoder_spec.items() if k not in skip}, "weights": str(weights)}
