"""Configuration: validated once against the JSON schema, defaults filled in, cross-checked.

``validate_config`` runs when the Snakefile is parsed, so a wrong key, type or value fails
before any job starts, with a message that names the key.
"""

from __future__ import annotations

import copy
import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"
VISION_SOURCES = {"timm"}
TEXT_SOURCES = {"huggingface", "bundled"}
KARPATHY_SPLITS = ["train", "val", "test"]


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


@cache
def load_schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from err
    return validate_config(raw if raw is not None else {})


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``config`` with defaults filled in; raise ConfigError naming the key."""
    config = copy.deepcopy(config)
    validator = _DefaultFillingValidator(load_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(config))
    if error is not None:
        raise ConfigError(f"config key '{_key(error.absolute_path)}': {error.message}")
    _check_references(config)
    _check_components(config)
    return config


def _key(path: Any) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _fill_defaults(validator_class: type) -> type:
    properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, props, instance, schema):
        if isinstance(instance, dict):
            for name, sub in props.items():
                if isinstance(sub, dict) and "default" in sub:
                    instance.setdefault(name, copy.deepcopy(sub["default"]))
        yield from properties(validator, props, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_DefaultFillingValidator = _fill_defaults(jsonschema.Draft202012Validator)


def dataset_splits(spec: dict[str, Any]) -> list[str]:
    """The split names a dataset spec provides."""
    if spec["source"] in ("synthetic", "image_folder"):
        return list(spec["splits"])  # a mapping of sizes or a list of names
    return KARPATHY_SPLITS


def _check_references(config: dict[str, Any]) -> None:
    encoders, datasets = config["encoders"], config["datasets"]
    experiment = config["experiment"]
    for i, pair in enumerate(experiment["pairs"]):
        for role, sources in (("vision", VISION_SOURCES), ("text", TEXT_SOURCES)):
            name = pair[role]
            key = f"experiment.pairs.{i}.{role}"
            if name not in encoders:
                raise ConfigError(
                    f"config key '{key}': encoder {name!r} is not defined under 'encoders' "
                    f"(defined: {', '.join(sorted(encoders))})"
                )
            if encoders[name]["source"] not in sources:
                raise ConfigError(
                    f"config key '{key}': encoder {name!r} has source "
                    f"{encoders[name]['source']!r}, which is not a {role} encoder"
                )
    refs = [("experiment.train", experiment["train"]), ("experiment.val", experiment["val"])]
    refs += [(f"experiment.evaluate.{i}", ref) for i, ref in enumerate(experiment["evaluate"])]
    for key, ref in refs:
        if ref["dataset"] not in datasets:
            raise ConfigError(
                f"config key '{key}.dataset': dataset {ref['dataset']!r} is not defined under "
                f"'datasets' (defined: {', '.join(sorted(datasets))})"
            )
        splits = dataset_splits(datasets[ref["dataset"]])
        if ref["split"] not in splits:
            raise ConfigError(
                f"config key '{key}.split': dataset {ref['dataset']!r} has no split "
                f"{ref['split']!r} (it has: {', '.join(splits)})"
            )
    similarity = config["similarity"]
    if similarity["selection_metric"] not in similarity["metrics"]:
        raise ConfigError(
            f"config key 'similarity.selection_metric': {similarity['selection_metric']!r} is "
            f"not one of similarity.metrics {similarity['metrics']}"
        )
    quantiles = {f"q{q:g}" for q in similarity["quantile_bins"]}
    for choice in config["align"]["layer_choices"]:
        if choice not in ("last", "best") and choice not in quantiles:
            raise ConfigError(
                f"config key 'align.layer_choices': {choice!r} needs its quantile in "
                f"similarity.quantile_bins (choices available: last, best, {sorted(quantiles)})"
            )
    train, val = experiment["train"], experiment["val"]
    if train == val:
        raise ConfigError(
            "config key 'experiment.val': the validation split must differ from the training split"
        )
    for i, ref in enumerate(experiment["evaluate"]):
        if (ref["dataset"], ref["split"]) in {
            (train["dataset"], train["split"]),
            (val["dataset"], val["split"]),
        }:
            raise ConfigError(
                f"config key 'experiment.evaluate.{i}': {ref['dataset']}/{ref['split']} is used "
                "for training or early stopping, so it cannot be a test set"
            )


def _check_components(config: dict[str, Any]) -> None:
    """Let each component check the spec it owns (paths exist, names resolve)."""
    from pipeline.align import build_aligner
    from pipeline.data import validate_spec
    from pipeline.encoders import validate_encoder_spec

    for name, spec in config["datasets"].items():
        try:
            validate_spec(name, spec)
        except ValueError as err:
            raise ConfigError(f"config key 'datasets.{name}': {err}") from err
    for name, spec in config["encoders"].items():
        try:
            validate_encoder_spec(name, spec)
        except ValueError as err:
            raise ConfigError(f"config key 'encoders.{name}': {err}") from err
    for name, spec in config["align"]["methods"].items():
        try:
            build_aligner(spec["method"], method_params(spec))
        except ValueError as err:
            raise ConfigError(f"config key 'align.methods.{name}': {err}") from err


def method_params(spec: dict[str, Any]) -> dict[str, Any]:
    """An align.methods entry without its ``method`` key: the aligner's hyper-parameters."""
    return {key: value for key, value in spec.items() if key != "method"}


def spec_hash(spec: Any) -> str:
    """A stable hash of a JSON-able spec (key order does not matter)."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()
