"""Configuration: validated once against the JSON schema, defaults filled in, cross-checked.

``validate_config`` runs when the Snakefile is parsed, so a wrong key, type or value fails
before any job starts, with a message that names the key.
"""

from __future__ import annotations

import copy
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from pipeline.align.kinds import aligner_params, uses_tokens
from pipeline.data import planned_counts, planned_tasks, validate_spec
from pipeline.encoders.registry import sources_of, validate_encoder_spec

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"


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
    datasets = _check_components(config)
    _check_references(config, datasets)
    _check_sizes(config, datasets)
    _check_sweep(config, datasets)
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


def _check_references(config: dict[str, Any], datasets: dict[str, dict[str, Any]]) -> None:
    """Names that point elsewhere in the config resolve; ``datasets``: normalised specs."""
    encoders = config["encoders"]
    experiment = config["experiment"]
    for i, pair in enumerate(experiment["pairs"]):
        for role in ("vision", "text"):
            sources = sources_of(role)
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
        splits = list(datasets[ref["dataset"]]["splits"])
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


def _check_sizes(config: dict[str, Any], datasets: dict[str, dict[str, Any]]) -> None:
    """Sizes and names that depend on the data, checked wherever the spec alone tells (the
    synthetic world); for other data the stage that first sees the data names the same key."""
    experiment, similarity = config["experiment"], config["similarity"]
    train = experiment["train"]
    counts = training_counts(train, datasets)
    if counts is not None:
        images, pairs = counts
        for n in config["align"]["n_pairs"]:
            if n != "full" and n > pairs:
                raise ConfigError(
                    f"config key 'align.n_pairs': {n} pairs asked for, but "
                    f"{train['dataset']}/{train['split']} has {pairs} ({images} images)"
                )
        pool = min(similarity["pool_size"], images)  # one caption per image
        k = similarity["knn_k"]
        if "mutual_knn" in similarity["metrics"] and isinstance(k, int) and k >= pool:
            raise ConfigError(
                f"config key 'similarity.knn_k': {k} neighbours need more than {k} scoring "
                f"pairs, the pool has {pool} (similarity.pool_size, one caption per image)"
            )
    k = similarity["knn_k"]
    if (
        "mutual_knn" in similarity["metrics"]
        and isinstance(k, int)
        and k >= similarity["pool_size"]
    ):
        raise ConfigError(
            f"config key 'similarity.knn_k': {k} must be below similarity.pool_size "
            f"({similarity['pool_size']})"
        )
    for i, ref in enumerate(experiment["evaluate"]):
        known = planned_tasks(datasets[ref["dataset"]], ref["split"])
        unknown = sorted(set(ref.get("tasks") or ()) - set(known or ()))
        if known is not None and unknown:
            raise ConfigError(
                f"config key 'experiment.evaluate.{i}.tasks': {ref['dataset']}/{ref['split']} "
                f"has no task {unknown} (it has {known})"
            )


def training_counts(
    train: dict[str, Any], datasets: dict[str, dict[str, Any]]
) -> tuple[int, int] | None:
    """(images, training pairs) of ``experiment.train`` when the spec alone says: one pair per
    image under ``captions: first``."""
    counts = planned_counts(datasets[train["dataset"]], train["split"])
    if counts is None or train["captions"] == "all":
        return counts
    return counts[0], counts[0]


def _check_sweep(config: dict[str, Any], datasets: dict[str, dict[str, Any]]) -> None:
    """The sweep's method exists and fits on pooled features; its run fits the training split
    (where the spec alone tells: the synthetic world)."""
    sweep = config.get("sweep")
    if sweep is None:
        return
    methods = config["align"]["methods"]
    method = sweep["method"]
    if method not in methods:
        raise ConfigError(
            f"config key 'sweep.method': method {method!r} is not defined under 'align.methods' "
            f"(defined: {', '.join(sorted(methods))})"
        )
    kind = methods[method]["aligner"]
    if uses_tokens(kind):
        raise ConfigError(
            f"config key 'sweep.method': method {method!r} is of kind {kind!r}, which trains on "
            "token sets, and tokens are cached only for the chosen layers, not for every layer "
            "pair the sweep fits; choose a method on pooled features (e.g. ridge or procrustes)"
        )
    train = config["experiment"]["train"]
    counts = training_counts(train, datasets)
    n_pairs = sweep["n_pairs"]
    if counts is not None and n_pairs != "full" and n_pairs > counts[1]:
        raise ConfigError(
            f"config key 'sweep.n_pairs': {n_pairs} pairs asked for, but "
            f"{train['dataset']}/{train['split']} has {counts[1]} ({counts[0]} images)"
        )


def _check_components(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Let each component check the spec it owns (paths exist, names resolve), without
    importing model code; returns the datasets' normalised specs."""
    datasets = {}
    for name, spec in config["datasets"].items():
        try:
            datasets[name] = validate_spec(name, spec)
        except ValueError as err:
            raise ConfigError(f"config key 'datasets.{name}': {err}") from err
    for name, spec in config["encoders"].items():
        if "pretrain" in spec:
            spec = _check_pretrain(name, spec, config["datasets"])
        try:
            validate_encoder_spec(name, spec)
        except ValueError as err:
            raise ConfigError(f"config key 'encoders.{name}': {err}") from err
    for name, spec in config["align"]["methods"].items():
        params = {key: value for key, value in spec.items() if key != "aligner"}
        try:
            aligner_params(spec["aligner"], params)
        except ValueError as err:
            raise ConfigError(f"config key 'align.methods.{name}': {err}") from err
    return datasets


def _check_pretrain(name: str, spec: dict[str, Any], datasets: dict[str, Any]) -> dict[str, Any]:
    """A ``pretrain`` block: a timm encoder without its own weights, a synthetic dataset of the
    config; returns the spec it trains from (``pretrain.initial_spec``)."""
    from pipeline import pretrain

    key = f"config key 'encoders.{name}.pretrain'"
    if spec["source"] != "timm":
        raise ConfigError(f"{key}: only timm encoders are pretrained here, not {spec['source']}")
    if "weights" in spec:
        raise ConfigError(f"{key}: the weights come from pretraining; drop 'weights'")
    try:
        settings = pretrain.parse_settings(name, spec["pretrain"])
    except ValueError as err:
        raise ConfigError(f"{key}: {err}") from err
    source = datasets.get(settings.dataset, {}).get("source")
    if source != "synthetic":
        raise ConfigError(
            f"{key}.dataset': {settings.dataset!r} is not a synthetic dataset of the config"
        )
    return pretrain.initial_spec(spec)
