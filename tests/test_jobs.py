"""Job derivation (pipeline.jobs) and the paths it uses (pipeline.layout): what every rule
and every by-hand stage invocation runs."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pipeline import jobs, layout
from pipeline.cli import STAGES, job_from_args, named_paths, parser
from pipeline.config import load_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def config() -> dict:
    return load_config(ROOT / "config.yaml")


def test_each_stage_has_a_job_whose_paths_come_from_the_layout(config):
    extract = jobs.extract_features(config, "shapes", "train", "vit_tiny")
    assert extract.output("marker") == layout.feature_marker("shapes", "train", "vit_tiny")
    assert layout.store_of_marker(extract.output("marker")).endswith("vit_tiny.zarr")
    assert extract.input("dataset") == layout.dataset_manifest("shapes")
    assert "num_workers" not in extract.spec["runtime"]  # threads, not a result
    align = jobs.fit_aligners(config, "vit_tiny", "minilm", "linear_structure", "best")
    assert align.spec["method"] == "linear_structure" and align.spec["aligner"] == "linear"
    assert "aligner" not in align.spec["params"]
    assert set(align.spec["stores"]) == {"vision_train", "text_train", "vision_val", "text_val"}
    cells = jobs.grid_cells(config)
    assert len(cells) == 8 * 2 and len(jobs.aggregate(config).input_list("evaluations")) == 16
    pal = jobs.fit_aligners(config, "vit_tiny", "minilm", "pal", "best")  # reads token sets
    assert pal.input("vision_train") == layout.tokens_marker("shapes", "train", "vit_tiny")
    assert set(pal.spec["tokens"]) == set(align.spec["stores"]) and "stores" not in pal.spec
    tokens = jobs.extract_tokens(config, "shapes", "prompts", "minilm")
    assert tokens.output("tokens") == layout.tokens_marker("shapes", "prompts", "minilm")
    assert tokens.input_list("layers") == [layout.layers_json("vit_tiny", "minilm")]
    assert tokens.spec["side"] == "text" and "num_workers" not in tokens.spec["runtime"]
    assert len(jobs.token_markers(config)) == 7  # both encoders on 3 splits, text on prompts
    evaluate = jobs.evaluate_aligners(config, "vit_tiny", "minilm", "csa", "last")
    assert evaluate.input("patches_0") == layout.tokens_marker("shapes", "test", "vit_tiny")
    assert set(STAGES) == {
        "prepare_dataset",
        "pretrain_encoder",
        "extract_features",
        "extract_features_shard",
        "extract_tokens",
        "extract_tokens_shard",
        "compare_layers",
        "sweep_layers",
        "fit_aligners",
        "evaluate_aligners",
        "aggregate",
        "publish",
    }


def test_aggregate_reads_every_outcomes_table_and_knows_the_statistics(config):
    evaluate = jobs.evaluate_aligners(config, "vit_tiny", "minilm", "csa", "last")
    assert evaluate.output("outcomes") == layout.outcomes("vit_tiny", "minilm", "csa", "last")
    aggregate = jobs.aggregate(config)
    assert aggregate.input_list("outcomes") == [
        layout.outcomes(*cell) for cell in jobs.grid_cells(config)
    ]
    assert aggregate.output("comparisons") == layout.staged(layout.COMPARISONS_TABLE)
    assert jobs.publish(config).output("comparisons") == layout.COMPARISONS_TABLE
    assert aggregate.spec["statistics"] == {"bootstrap": 1000, "level": 0.95, "seed": 0}
    assert aggregate.spec["baselines"] == {"linear_structure": "linear"}


def test_structure_baselines_pair_a_method_with_its_plain_twin():
    head = {"aligner": "mlp", "dim": 8}
    methods = {
        "mlp": head,
        "mlp_structure": {**head, "structure": {"lambda": 1.0}},
        "wide_structure": {**head, "dim": 16, "structure": {"lambda": 1.0}},  # no plain twin
        "csa": {"aligner": "csa"},
    }
    assert jobs.structure_baselines(methods) == {"mlp_structure": "mlp"}


def test_sharded_extraction_jobs(config):
    """runtime.extract_shards = 3: three shard jobs with the extraction spec write a store's
    (or a token set's) blocks, its own job only completes it (one thread); prompts are never
    sharded."""
    sharded = {**config, "runtime": {**config["runtime"], "extract_shards": 3}}
    whole = jobs.extract_features(config, "shapes", "train", "vit_tiny")
    finish = jobs.extract_features(sharded, "shapes", "train", "vit_tiny")
    assert finish.output("marker") == whole.output("marker") and finish.threads == 1
    markers = finish.input_list("shards")
    assert markers == [
        layout.feature_shard_marker("shapes", "train", "vit_tiny", f"{k}-of-3") for k in (1, 2, 3)
    ]
    shard = jobs.extract_features_shard(sharded, "shapes", "train", "vit_tiny", "2-of-3")
    assert shard.spec == {**whole.spec, "shard": 2, "shards": 3}
    assert shard.inputs == whole.inputs and shard.threads == whole.threads
    assert shard.output("shard") == markers[1]
    assert layout.store_of_shard_marker(markers[1]) == layout.store_of_marker(
        whole.output("marker")
    )
    assert jobs.extract_features(sharded, "shapes", "prompts", "minilm").spec == (
        jobs.extract_features(config, "shapes", "prompts", "minilm").spec
    )
    tokens = jobs.extract_tokens(config, "shapes", "train", "vit_tiny")
    finish = jobs.extract_tokens(sharded, "shapes", "train", "vit_tiny")
    assert finish.output("tokens") == tokens.output("tokens") and finish.threads == 1
    shard = jobs.extract_tokens_shard(sharded, "shapes", "train", "vit_tiny", "3-of-3")
    assert shard.spec == {**tokens.spec, "shard": 3, "shards": 3}
    assert shard.inputs == tokens.inputs
    assert finish.input_list("shards")[2] == shard.output("shard")
    assert layout.tokens_dir_of_shard_marker(shard.output("shard")) == (
        layout.tokens_dir_of_marker(tokens.output("tokens"))
    )
    for wrong in ("4-of-3", "1-of-2", "0-of-3", "x-of-3"):
        with pytest.raises(ValueError, match=r"runtime\.extract_shards"):
            jobs.extract_features_shard(sharded, "shapes", "train", "vit_tiny", wrong)


def test_the_sweep_job_reads_what_a_pooled_methods_align_and_evaluate_jobs_read(config):
    sweep = jobs.sweep_layers(config, "vit_tiny", "minilm")
    assert sweep.output("sweep") == "results/similarity/vit_tiny/minilm/sweep.parquet"
    assert sweep.output("sweep") == layout.sweep_table("vit_tiny", "minilm")
    fit = jobs.fit_aligners(config, "vit_tiny", "minilm", "ridge", "last")
    evaluate = jobs.evaluate_aligners(config, "vit_tiny", "minilm", "ridge", "last")
    # every store and manifest those jobs read, but no layer choice, aligner run or token set
    read = {**fit.inputs, **evaluate.inputs}
    unread = ("layers", "runs", "patches_0")
    assert sweep.inputs == {name: path for name, path in read.items() if name not in unread}
    assert sweep.spec["stores"] == {**fit.spec["stores"], **evaluate.spec["stores"]}
    assert (sweep.spec["method"], sweep.spec["aligner"]) == ("ridge", "ridge")
    assert sweep.spec["params"] == fit.spec["params"] == {"alpha": 1.0}
    assert sweep.spec["run"] == {"n_pairs": 1000, "seed": 0} and sweep.spec["stride"] == 1
    assert sweep.spec["splits"] == fit.spec["splits"]
    assert sweep.spec["evaluate"] == evaluate.spec["splits"]
    assert sweep.threads == config["align"]["threads"] and "threads" not in str(sweep.spec)
    aggregate = jobs.aggregate(config)
    assert aggregate.input_list("sweeps") == jobs.sweep_tables(config) == [sweep.output("sweep")]
    assert jobs.published(config)["sweep"] == layout.SWEEP_TABLE
    assert jobs.published(config)["sweep_rho"] == layout.SWEEP_RHO_TABLE
    assert aggregate.output("sweep_rho") == layout.staged(layout.SWEEP_RHO_TABLE)


def test_without_a_sweep_section_there_is_no_sweep(config, tmp_path):
    without = {key: value for key, value in config.items() if key != "sweep"}
    assert not jobs.has_sweep(without) and jobs.sweep_tables(without) == []
    aggregate = jobs.aggregate(without)
    assert "sweeps" not in aggregate.inputs and set(aggregate.outputs) == {
        "metrics",
        "summary",
        "comparisons",
        "plots",
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(without))
    args = parser().parse_args(["sweep", "--config", str(path), "--pair", "vit_tiny/minilm"])
    with pytest.raises(SystemExit, match="'sweep' is not defined"):
        job_from_args("sweep_layers", STAGES["sweep_layers"], args)


def test_the_sweep_by_hand_is_the_rules_job(config):
    args = parser().parse_args(
        ["sweep", "--config", str(ROOT / "config.yaml"), "--pair", "vit_tiny/minilm"]
    )
    assert job_from_args("sweep_layers", STAGES["sweep_layers"], args) == jobs.sweep_layers(
        config, "vit_tiny", "minilm"
    )


def test_named_paths_and_help_on_every_stage():
    assert named_paths(["a=x", "b=y", "b=z"]) == {"a": "x", "b": ["y", "z"]}
    with pytest.raises(SystemExit, match="NAME=PATH"):
        named_paths(["nameless"])
    subcommands = parser()._subparsers._group_actions[0].choices
    for name, sub in subcommands.items():
        assert sub.description or sub.format_help(), name
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings} has no help"


def write_image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


def test_a_datasets_source_files_are_its_jobs_inputs(config, tmp_path):
    root = tmp_path / "pets"
    write_image(root / "test" / "cat" / "a.png")
    write_image(root / "test" / "dog" / "b.png")
    config = {**config, "datasets": {**config["datasets"], "pets": {"source": "image_folder"}}}
    config["datasets"]["pets"] = {"source": "image_folder", "root": str(root), "splits": ["test"]}
    before = jobs.prepare_dataset(config, "pets").input_list("sources")
    assert [Path(p).name for p in before] == ["a.png", "b.png"]
    write_image(root / "test" / "dog" / "c.png")
    (root / "test" / "cat" / "a.png").unlink()
    write_image(root / "test" / "cat" / "d.png")
    after = jobs.prepare_dataset(config, "pets").input_list("sources")
    assert [Path(p).name for p in after] == ["d.png", "b.png", "c.png"]
    assert jobs.prepare_dataset(config, "shapes").input_list("sources") == []  # synthetic


def test_verify_command_on_empty_results(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "verify", "--results", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "no problems" in result.stdout
