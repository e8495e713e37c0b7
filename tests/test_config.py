"""Config validation: the default is valid; a wrong key, type or value fails naming the key."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_config, load_schema, validate_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def default() -> dict:
    return yaml.safe_load((ROOT / "config.yaml").read_text())


def test_default_config_is_valid_and_gets_defaults(default):
    config = load_config(ROOT / "config.yaml")
    assert config["runtime"]["device"] == "auto"
    assert config["encoders"]["minilm"]["max_tokens"] == 64
    assert config["datasets"]["shapes"]["image_size"] == 64
    without_runtime = {k: v for k, v in default.items() if k != "runtime"}
    assert validate_config(without_runtime)["runtime"]["batch_size"] == 128
    assert config["statistics"] == {"bootstrap": 1000, "level": 0.95, "seed": 0}


def test_the_sweep_is_optional_and_gets_defaults(default):
    without = validate_config({k: v for k, v in default.items() if k != "sweep"})
    assert "sweep" not in without
    config = validate_config({**default, "sweep": {"method": "procrustes"}})
    assert config["sweep"] == {"method": "procrustes", "n_pairs": "full", "seed": 0, "stride": 1}


def broken(default, edit):
    config = copy.deepcopy(default)
    edit(config)
    return config


CASES = [
    (
        "more pairs than the training split has",
        lambda c: c["align"].update(n_pairs=[100, 5000]),
        "align.n_pairs",
        "4500",
    ),
    (
        "a scoring pool too small",
        lambda c: c["similarity"].update(pool_size=1),
        "similarity.pool_size",
        "minimum of 4",
    ),
    (
        "more neighbours than the pool",
        lambda c: c["similarity"].update(pool_size=50, knn_k=60),
        "similarity.knn_k",
        "60",
    ),
    (
        "more neighbours than training images",
        lambda c: c["similarity"].update(knn_k=1600),
        "similarity.knn_k",
        "1500",
    ),
    (
        "an evaluation task the dataset lacks",
        lambda c: c["experiment"]["evaluate"][0].update(tasks=["shape", "texture"]),
        "experiment.evaluate.0.tasks",
        "texture",
    ),
    ("unknown top-level key", lambda c: c.update(extra=1), "<top level>", "extra"),
    (
        "a confidence level of 1",
        lambda c: c.update(statistics={"level": 1.0}),
        "statistics.level",
        "1.0",
    ),
    (
        "negative bootstrap replicates",
        lambda c: c.update(statistics={"bootstrap": -1}),
        "statistics.bootstrap",
        "-1",
    ),
    (
        "unknown encoder source",
        lambda c: c["encoders"]["vit_tiny"].update(source="keras"),
        "encoders.vit_tiny.source",
        "keras",
    ),
    (
        "negative split size",
        lambda c: c["datasets"]["shapes"]["splits"].update(train=-5),
        "datasets.shapes.splits.train",
        "-5",
    ),
    (
        "wrong type",
        lambda c: c["runtime"].update(batch_size="many"),
        "runtime.batch_size",
        "many",
    ),
    (
        "unknown dataset source",
        lambda c: c["datasets"]["shapes"].update(source="imagenet21k"),
        "datasets.shapes.source",
        "imagenet21k",
    ),
    (
        "unknown pooling",
        lambda c: c["encoders"]["minilm"].update(pooling="max"),
        "encoders.minilm.pooling",
        "max",
    ),
    (
        "misspelt encoder key",
        lambda c: c["encoders"]["vit_tiny"].update(pretrained_weights="x"),
        "encoders.vit_tiny",
        "pretrained_weights",
    ),
    (
        "undefined dataset",
        lambda c: c["experiment"]["train"].update(dataset="coco"),
        "experiment.train.dataset",
        "coco",
    ),
    (
        "unknown split",
        lambda c: c["experiment"]["evaluate"][0].update(split="holdout"),
        "experiment.evaluate.0.split",
        "holdout",
    ),
    (
        "undefined encoder in a pair",
        lambda c: c["experiment"]["pairs"][0].update(text="bert"),
        "experiment.pairs.0.text",
        "bert",
    ),
    (
        "text encoder used as vision",
        lambda c: c["experiment"]["pairs"][0].update(vision="minilm"),
        "experiment.pairs.0.vision",
        "not a vision encoder",
    ),
    (
        "test split used for early stopping",
        lambda c: c["experiment"]["val"].update(split="test"),
        "experiment.evaluate.0",
        "cannot be a test set",
    ),
    (
        "a sweep method not under align.methods",
        lambda c: c["sweep"].update(method="svd"),
        "sweep.method",
        "'svd' is not defined under 'align.methods'",
    ),
    (
        "a sweep of a token method",
        lambda c: c["sweep"].update(method="pal"),
        "sweep.method",
        "trains on token sets",
    ),
    (
        "a sweep run larger than the training split",
        lambda c: c["sweep"].update(n_pairs=5000),
        "sweep.n_pairs",
        "4500",
    ),
    ("a sweep stride of zero", lambda c: c["sweep"].update(stride=0), "sweep.stride", "minimum"),
    ("a sweep without a method", lambda c: c["sweep"].pop("method"), "sweep", "'method'"),
    ("a misspelt sweep key", lambda c: c["sweep"].update(seeds=[1]), "sweep", "seeds"),
    (
        "name unusable in paths",
        lambda c: c["encoders"].update({"vit/tiny": c["encoders"]["vit_tiny"]}),
        "encoders",
        "vit/tiny",
    ),
]


@pytest.mark.parametrize(("case", "edit", "key", "mentions"), CASES, ids=[c[0] for c in CASES])
def test_invalid_config_names_the_key(default, case, edit, key, mentions):
    with pytest.raises(ConfigError) as error:
        validate_config(broken(default, edit))
    message = str(error.value)
    assert f"config key '{key}" in message, message
    assert mentions in message, message


def test_missing_weights_file_is_reported_before_any_work(default, tmp_path):
    config = broken(
        default,
        lambda c: c["encoders"]["vit_random"].update(weights=str(tmp_path / "missing.safetensors")),
    )
    with pytest.raises(ConfigError, match=r"'encoders\.vit_random'.*missing\.safetensors"):
        validate_config(config)


def test_unreadable_config_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("datasets: [unclosed")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(path)


@pytest.mark.parametrize("name", ["structure.yaml", "pal.yaml"])
def test_reproduction_configs_are_valid_until_their_data_paths_are_filled_in(name):
    # The schema and cross-references pass; only the data files a user supplies are missing.
    with pytest.raises(ConfigError, match=r"'datasets\.coco'.*karpathy_json.*no existing file"):
        load_config(ROOT / "workflow" / "configs" / name)


def test_schema_enums_match_the_registries():
    """The schema's lists of names are the registries' keys: adding an aligner, encoder source,
    dataset source or metric to one without the other fails here."""
    from pipeline.align.kinds import KINDS
    from pipeline.data import SOURCES as DATASET_SOURCES
    from pipeline.encoders.base import POOLINGS
    from pipeline.encoders.registry import SOURCES as ENCODER_SOURCES
    from pipeline.similarity.compute import METRICS
    from pipeline.similarity.selection import SCORING_MODES

    schema = load_schema()["properties"]
    methods = schema["align"]["properties"]["methods"]["additionalProperties"]
    assert methods["properties"]["aligner"]["enum"] == list(KINDS)
    encoders = schema["encoders"]["additionalProperties"]["properties"]
    assert encoders["source"]["enum"] == list(ENCODER_SOURCES)
    datasets = schema["datasets"]["additionalProperties"]["properties"]
    assert datasets["source"]["enum"] == list(DATASET_SOURCES)
    similarity = schema["similarity"]["properties"]
    assert similarity["metrics"]["items"]["enum"] == list(METRICS)
    assert similarity["selection_metric"]["enum"] == list(METRICS)
    assert similarity["scope"]["enum"] == list(SCORING_MODES)
    for definition in load_schema()["$defs"].values():
        if "pooling" in definition.get("properties", {}):
            assert set(definition["properties"]["pooling"]["enum"]) == set(POOLINGS)


def test_reading_the_config_imports_no_model_code():
    """``snakemake -n`` validates the config and builds every job (token sets and PAL's jobs
    included): that must not import torch or a model library."""
    code = (
        "import sys; from pipeline.config import load_config; c = load_config('config.yaml');"
        "import pipeline.jobs as j, pipeline.layout;"
        "assert j.token_sets(c); [j.extract_tokens(c, *t) for t in j.token_sets(c)];"
        "[(j.fit_aligners(c, *x), j.evaluate_aligners(c, *x)) for x in j.grid_cells(c)];"
        "j.aggregate(c);"
        "print(sorted(m for m in ('torch', 'timm', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_preflight_names_an_unknown_timm_model_and_an_absent_device(default):
    from pipeline.preflight import check_device, preflight

    config = load_config(ROOT / "config.yaml")
    preflight(config, local=True)  # the default: a real model name, device auto
    typo = copy.deepcopy(config)
    typo["encoders"]["vit_tiny"]["name"] = "vit_tiny_patch16_22"
    with pytest.raises(ConfigError, match=r"'encoders\.vit_tiny\.name'.*vit_tiny_patch16_224"):
        preflight(typo, local=True)
    with pytest.raises(ConfigError, match=r"'runtime\.device': 'cuda:99'"):
        check_device("cuda:99")  # no machine has a hundredth GPU
    absent = {**config, "runtime": {**config["runtime"], "device": "cuda:99"}}
    preflight(absent, local=False)  # a cluster's nodes are checked there, not here


@pytest.mark.parametrize(
    ("edit", "key", "mentions"),
    [
        ({"model_kwargs": {}}, "image_size", "fixed input size of 224 px"),
        (
            {
                "model_kwargs": {
                    "img_size": 64,
                    "patch_size": 8,
                    "class_token": False,
                    "global_pool": "avg",
                }
            },
            "pooling",
            "no class token",
        ),
        ({"model_kwargs": {"img_size": 64, "no_such_argument": 1}}, "model_kwargs", "cannot"),
    ],
    ids=["fixed input size", "cls without a class token", "bad model_kwargs"],
)
def test_preflight_names_what_a_vision_model_cannot_do(edit, key, mentions):
    from pipeline.preflight import preflight

    config = load_config(ROOT / "config.yaml")
    config["encoders"]["vit_tiny"].update(edit)
    with pytest.raises(ConfigError, match=rf"'encoders\.vit_tiny\.{key}'.*{mentions}"):
        preflight(config, local=False)


def test_preflight_names_too_many_text_tokens():
    from pipeline.preflight import preflight

    config = load_config(ROOT / "config.yaml")
    config["encoders"]["minilm"]["max_tokens"] = 1000
    with pytest.raises(ConfigError, match=r"'encoders\.minilm\.max_tokens'.*512 positions"):
        preflight(config, local=False)
