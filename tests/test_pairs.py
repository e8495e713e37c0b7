"""Pairs of a split under a captions policy, and the fitting jobs' train/validation pairs."""

import copy
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline import jobs
from pipeline.config import ConfigError, load_config, validate_config
from pipeline.pairs import split_pairs

ROOT = Path(__file__).resolve().parent.parent


def shuffled_split(n_images: int, per_image: int, seed: int = 0):
    """A split whose caption rows list the images in a shuffled order."""
    rng = np.random.default_rng(seed)
    ids = [f"img{i}" for i in range(n_images)]
    images = pl.DataFrame({"image_id": ids})
    captions = pl.DataFrame(
        {"image_id": np.repeat(ids, per_image)[rng.permutation(n_images * per_image)].tolist()}
    )
    return images, captions


def test_first_keeps_each_images_first_caption_and_all_keeps_every_caption():
    images, captions = shuffled_split(50, 5)
    every = split_pairs(images, captions, "all")
    assert len(every) == 250 and np.array_equal(every.caption_rows, np.arange(250))
    first = split_pairs(images, captions, "first")
    assert len(first) == 50 and len(np.unique(first.image_rows)) == 50
    image_of = captions["image_id"].to_list()
    for row in first.caption_rows:  # no earlier caption row belongs to the same image
        assert image_of.index(image_of[row]) == row
    assert np.all(np.diff(first.caption_rows) > 0)  # caption order kept
    with pytest.raises(ValueError, match="captions policy"):
        split_pairs(images, captions, "random")


@pytest.fixture(scope="module")
def config() -> dict:
    return load_config(ROOT / "config.yaml")


def first_captions(config: dict) -> dict:
    edited = copy.deepcopy(config)
    edited["experiment"]["train"]["captions"] = "first"
    return edited


def test_the_captions_policy_reaches_every_job_that_reads_training_pairs(config):
    assert config["experiment"]["train"]["captions"] == "all"  # the default
    first = first_captions(config)
    for build in (
        lambda c: jobs.fit_aligners(c, "vit_tiny", "minilm", "linear", "best"),
        lambda c: jobs.compare_layers(c, "vit_tiny", "minilm"),
        lambda c: jobs.sweep_layers(c, "vit_tiny", "minilm"),
    ):
        before, after = build(config), build(first)
        assert before.spec != after.spec  # a changed policy reruns the job
    assert jobs.fit_aligners(first, "vit_tiny", "minilm", "pal", "best").spec["splits"] == {
        "train": "train",
        "train_captions": "first",
        "val": "val",
    }


def test_grid_sizes_are_checked_against_the_pairs_the_policy_keeps(config):
    raw = first_captions(config)
    images = raw["datasets"]["shapes"]["splits"]["train"]
    raw["align"]["n_pairs"] = [images + 1]
    with pytest.raises(ConfigError, match=rf"align.n_pairs'.*has {images} \({images} images"):
        validate_config(raw)
    raw["experiment"]["train"]["captions"] = "all"
    validate_config(raw)  # three captions per image: enough pairs
    raw["experiment"]["train"]["captions"] = "some"
    with pytest.raises(ConfigError, match=r"experiment\.train\.captions"):
        validate_config(raw)
