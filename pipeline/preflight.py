"""Checks that need the model libraries, run once before the first job (Snakemake's
``onstart``), so reading the workflow stays torch-free yet a bad name or an absent device
fails before any job starts or deletes an output. Errors name the config key."""

from __future__ import annotations

import difflib
from typing import Any

from pipeline.config import ConfigError


def preflight(config: dict[str, Any], *, local: bool) -> None:
    """Timm model names exist; the configured device exists where jobs run (``local``: on
    this machine; a cluster's compute nodes are not this machine, so it is skipped there)."""
    import timm

    for name, spec in config["encoders"].items():
        if spec["source"] == "timm" and not timm.is_model(spec["name"]):
            close = difflib.get_close_matches(spec["name"], timm.list_models(), n=3)
            hint = f"; close: {', '.join(close)}" if close else ""
            raise ConfigError(
                f"config key 'encoders.{name}.name': timm has no model {spec['name']!r}{hint}"
            )
    if local:
        check_device(config["runtime"]["device"])


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
