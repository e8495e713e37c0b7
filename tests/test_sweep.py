"""The sweep_layers stage (pipeline.stages.sweep_layers) on a tiny prepared world with
synthetic features: its layer grid, its training run, and its rows against fitting and
scoring one layer pair by hand with the zero-shot and retrieval functions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline import jobs, layout
from pipeline.align.kinds import build_aligner
from pipeline.config import validate_config
from pipeline.data import load_prompts, load_split, load_tasks, prepare_dataset, read_manifest
from pipeline.evaluate.retrieval import retrieval_metrics, retrieval_scores
from pipeline.evaluate.tables import read_metrics
from pipeline.evaluate.zeroshot import zero_shot_classification
from pipeline.pairs import nested_subset, pair_rows
from pipeline.stages.sweep_layers import SWEEP_CHOICE, sweep_grid, training_run
from pipeline.stages.sweep_layers import run as run_sweep
from pipeline.stores.features import FeatureStore, FeatureWriter

DIMS = {"vit": [8, 8, 8], "minilm": [6, 6, 6, 6]}  # layers per encoder of the fake stores
CONFIG = {
    "datasets": {
        "tiny": {
            "source": "synthetic",
            "seed": 3,
            "image_size": 32,
            "splits": {"train": 20, "val": 8, "test": 12},
            "captions_per_image": 2,
        }
    },
    "encoders": {
        "vit": {
            "source": "timm",
            "name": "vit_tiny_patch16_224",
            "pretrained": False,
            "init_seed": 0,
        },
        "minilm": {"source": "bundled", "name": "all-MiniLM-L6-v2"},
    },
    "experiment": {
        "pairs": [{"vision": "vit", "text": "minilm"}],
        "train": {"dataset": "tiny", "split": "train"},
        "val": {"dataset": "tiny", "split": "val"},
        "evaluate": [{"dataset": "tiny", "split": "test"}],
    },
    "similarity": {"pool_size": 10},
    "align": {"methods": {"ridge": {"aligner": "ridge", "alpha": 0.5}}},
    "sweep": {"method": "ridge", "n_pairs": 24, "seed": 7, "stride": 2},
}


def test_sweep_grid_takes_every_stride_th_layer_and_the_last():
    assert sweep_grid(4, 1) == [0, 1, 2, 3]
    assert sweep_grid(12, 5) == [0, 5, 10, 11]
    assert sweep_grid(3, 2) == [0, 2]
    assert sweep_grid(1, 3) == [0]
    with pytest.raises(ValueError, match="stride >= 1"):
        sweep_grid(4, 0)


def test_training_run_is_the_grids_run_of_that_size_and_seed():
    assert training_run({"n_pairs": "full", "seed": 2}, 40).name == "n40_s2"
    run = training_run({"n_pairs": 10, "seed": 2}, 40)
    assert np.array_equal(run.rows(40), nested_subset(40, 10, 2))
    with pytest.raises(ValueError, match=r"config key 'sweep\.n_pairs'.*outside 2\.\.40"):
        training_run({"n_pairs": 41, "seed": 0}, 40)


def rooted(job: jobs.Job, root: Path) -> jobs.Job:
    """The job with its layout paths under ``root`` instead of the working directory."""

    def under(paths):
        return {
            k: [str(root / p) for p in v] if isinstance(v, list) else str(root / v)
            for k, v in paths.items()
        }

    return dataclasses.replace(job, inputs=under(job.inputs), outputs=under(job.outputs))


def write_features(job: jobs.Job, config: dict, root: Path, seed: int = 0) -> None:
    """A complete fake feature store behind every feature marker the job reads: random float32
    rows with the dataset's sample ids, the request and content hash the job checks."""
    rng = np.random.default_rng(seed)
    for name, marker in job.inputs.items():
        if not marker.endswith(".zarr.done"):
            continue
        path = Path(layout.store_of_marker(marker))
        dataset, split, encoder = path.parent.parent.name, path.parent.name, path.stem
        dataset_dir = root / layout.dataset_dir(dataset)
        if split == jobs.PROMPTS_SPLIT:
            ids = load_prompts(dataset_dir)["prompt_id"].to_list()
        else:
            data = load_split(dataset_dir, split)
            table, column = (
                (data.images, "image_id")
                if name.startswith("vision")
                else (data.captions, "caption_id")
            )
            ids = table[column].to_list()
        dims = DIMS[encoder]
        writer = FeatureWriter.create_or_resume(
            path,
            fingerprint=f"{encoder}-{split}",
            sample_ids=ids,
            layer_names=[f"layer.{i}" for i in range(len(dims))],
            dims=dims,
            attrs={
                "encoder": {"name": encoder},
                "dataset": {"content_hash": read_manifest(dataset_dir)["content_hash"]},
                "request": jobs.store_request(config, dataset, split, encoder),
            },
        )
        layers = [rng.standard_normal((len(ids), d)).astype(np.float32) for d in dims]
        for block, start, stop in writer.pending_blocks():
            writer.write_block(block, [values[start:stop] for values in layers])
        writer.finalize()


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> tuple[jobs.Job, pl.DataFrame]:
    root = tmp_path_factory.mktemp("sweep")
    config = validate_config(CONFIG)
    job = rooted(jobs.sweep_layers(config, "vit", "minilm"), root)
    prepare_dataset("tiny", config["datasets"]["tiny"], root / layout.dataset_dir("tiny"))
    write_features(job, config, root)
    run_sweep(job)
    return job, read_metrics(job.output("sweep"))


def test_the_sweep_covers_the_layer_grid_on_classification_and_retrieval(swept):
    _, rows = swept
    pairs = rows.select("vision_layer", "text_layer").unique().sort(pl.all()).rows()
    assert pairs == [(v, t) for v in (0, 2) for t in (0, 2, 3)]  # stride 2, last layers kept
    assert set(rows["task_kind"]) == {"classification", "retrieval"}  # segmentation left out
    assert rows.select("method", "layer_choice", "n_pairs", "seed").unique().rows() == [
        ("ridge", SWEEP_CHOICE, 24, 7)
    ]
    per_pair = rows.group_by("vision_layer", "text_layer").len()["len"].unique().to_list()
    assert len(per_pair) == 1  # every layer pair scored on the same tasks and metrics


def test_a_layer_pair_fitted_and_scored_by_hand_gives_the_sweeps_rows(swept):
    job, rows = swept
    vision_layer, text_layer = 2, 3

    def open_input(name: str):
        return FeatureStore.open(layout.store_of_marker(job.input(name)))

    train_dir = Path(layout.dataset_of_manifest(job.input("train")))
    train = load_split(train_dir, "train")
    pairs = pair_rows(train.images, train.captions)
    chosen = pairs.take(nested_subset(len(pairs), 24, 7))
    val_data = load_split(train_dir, "val")
    val = pair_rows(val_data.images, val_data.captions)
    aligner = build_aligner("ridge", {"alpha": 0.5})
    aligner.fit(
        open_input("vision_train").read(vision_layer, chosen.image_rows),
        open_input("text_train").read(text_layer, chosen.caption_rows),
        open_input("vision_val").read(vision_layer, val.image_rows),
        open_input("text_val").read(text_layer, val.caption_rows),
        7,
    )

    test = load_split(train_dir, "test")
    images = open_input("vision_0").read(vision_layer)
    captions = open_input("text_0").read(text_layer)
    prompt_features = open_input("prompts_0").read(text_layer)
    prompts = load_prompts(train_dir).with_row_index("row")
    expected = {}
    for task in load_tasks(train_dir):
        if task.split != "test" or task.kind == "segmentation":
            continue
        if task.kind == "retrieval":
            caption_image = pair_rows(test.images, test.captions).image_rows
            scores = retrieval_scores(aligner, images, captions)
            metrics = retrieval_metrics(scores, caption_image)
        else:
            labels = test.images[task.label_column].to_numpy()
            member = labels >= 0
            own = prompts.filter(pl.col("task") == task.name)
            metrics = zero_shot_classification(
                aligner,
                images[member],
                labels[member],
                prompt_features[own["row"].to_numpy()],
                own["class_index"].to_numpy(),
                len(task.classnames),
            )
        expected |= {(f"tiny.{task.name}", metric): value for metric, value in metrics.items()}

    pair = rows.filter(
        (pl.col("vision_layer") == vision_layer) & (pl.col("text_layer") == text_layer)
    )
    got = {(row["task"], row["metric"]): row["value"] for row in pair.iter_rows(named=True)}
    assert got.keys() == expected.keys()
    assert {"tiny.retrieval", "tiny.shape"} <= {task for task, _ in expected}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
