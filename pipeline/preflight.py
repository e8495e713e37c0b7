"""Checks that need the model libraries, run once before the first job (Snakemake's
``onstart``), so reading the workflow stays torch-free yet a bad name or an absent device
fails before any job starts or deletes an output. Errors name the config key."""

from __future__ import annotations

import difflib
from typing import Any

from pipeline.config import ConfigError


def preflight(config: dict[str, Any], *, local: bool) -> None:
    """Every encoder can do what its spec asks (model name, input size, pooling, token
    length); the configured device exists where jobs run (``local``: on this machine; a
    cluster's compute nodes are not this machine, so it is skipped there)."""
    for name, spec in config["encoders"].items():
        if spec["source"] == "timm":
            check_timm_encoder(name, spec)
        elif spec["source"] in ("huggingface", "bundled"):
            check_text_encoder(name, spec)
    if local:
        check_device(config["runtime"]["device"])


def check_timm_encoder(name: str, spec: dict[str, Any]) -> None:
    """The model exists, takes the configured image size, and has a class token for ``cls``
    pooling; built on the meta device (no memory, no weights), its pretrained config read
    offline."""
    import timm
    import torch

    key = f"config key 'encoders.{name}"
    if not timm.is_model(spec["name"]):
        close = difflib.get_close_matches(spec["name"], timm.list_models(), n=3)
        hint = f"; close: {', '.join(close)}" if close else ""
        raise ConfigError(f"{key}.name': timm has no model {spec['name']!r}{hint}")
    try:
        with torch.device("meta"):
            model = timm.create_model(spec["name"], pretrained=False, **spec["model_kwargs"])
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise ConfigError(f"{key}.model_kwargs': {spec['name']} cannot be built: {err}") from err
    patch_embed = getattr(model, "patch_embed", None)
    fixed = (
        patch_embed is not None
        and getattr(patch_embed, "strict_img_size", False)
        and not getattr(model, "dynamic_img_size", False)
    )
    size = spec.get("image_size")
    if fixed and size is not None and tuple(patch_embed.img_size) != (size, size):
        native = patch_embed.img_size[0]
        raise ConfigError(
            f"{key}.image_size': {spec['name']} has a fixed input size of {native} px, not "
            f"{size}; set image_size: {native} (or model_kwargs img_size / dynamic_img_size)"
        )
    if spec.get("pooling") == "cls" and getattr(model, "num_prefix_tokens", 1) == 0:
        raise ConfigError(
            f"{key}.pooling': {spec['name']} has no class token to pool; use pooling: mean"
        )


def check_text_encoder(name: str, spec: dict[str, Any]) -> None:
    """``max_tokens`` fits the model's positions, where its config is on this machine."""
    from transformers import AutoConfig

    from pipeline.encoders.registry import SOURCES

    parsed = SOURCES[spec["source"]].parse(name, spec)
    if parsed.max_tokens is None:
        return
    try:
        model_config = AutoConfig.from_pretrained(
            parsed.location, revision=parsed.revision, local_files_only=True
        )
    except (OSError, ValueError):
        return  # not on this machine (a hub id not cached yet): the job will say
    positions = getattr(model_config, "max_position_embeddings", None)
    if positions is None:
        return
    if "roberta" in getattr(model_config, "model_type", ""):
        positions -= (model_config.pad_token_id or 0) + 1  # positions start after padding
    if parsed.max_tokens > positions:
        raise ConfigError(
            f"config key 'encoders.{name}.max_tokens': {parsed.max_tokens} tokens, but "
            f"{parsed.name} has {positions} positions"
        )


def check_device(device: str) -> None:
    """A ``cuda`` / ``cuda:N`` device must exist here; ``auto`` and ``cpu`` always do."""
    if not device.startswith("cuda"):
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = int(device.partition(":")[2] or 0)
    if index >= count:
        raise ConfigError(
            f"config key 'runtime.device': {device!r} asked for, but this machine has "
            f"{count} CUDA device(s) torch can use; set device: auto or cpu"
        )
