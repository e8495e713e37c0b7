"""End to end: the Snakemake DAG on a tiny config, run as a user would run it."""

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from pipeline.store import open_store

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "runtime": {"device": "cpu", "batch_size": 32},
    "datasets": {
        "tiny": {
            "source": "synthetic",
            "seed": 3,
            "image_size": 32,
            "splits": {"train": 48, "val": 16, "test": 24},
            "captions_per_image": 2,
        }
    },
    "encoders": {
        "vit": {
            "source": "timm",
            "name": "vit_tiny_patch16_224",
            "pretrained": False,
            "init_seed": 0,
            "image_size": 32,
            "model_kwargs": {
                "img_size": 32,
                "patch_size": 8,
                "depth": 3,
                "embed_dim": 32,
                "num_heads": 2,
            },
        },
        "minilm": {"source": "bundled", "name": "all-MiniLM-L6-v2", "max_tokens": 32},
    },
    "experiment": {
        "pairs": [{"vision": "vit", "text": "minilm"}],
        "train": {"dataset": "tiny", "split": "train"},
        "val": {"dataset": "tiny", "split": "val"},
        "evaluate": [{"dataset": "tiny", "split": "test"}],
    },
}


def snakemake(workdir: Path, *targets: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "--snakefile",
            str(ROOT / "Snakefile"),
            "--directory",
            str(workdir),
            "--configfile",
            str(workdir / "config.yaml"),
            "--cores",
            "2",
            *targets,
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny")
    (workdir / "config.yaml").write_text(yaml.safe_dump(TINY))
    result = snakemake(workdir, "extract")
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


@pytest.mark.slow
def test_extract_target_builds_every_store(tiny_run):
    data = tiny_run / "results" / "datasets" / "tiny"
    for split in ("train", "val", "test"):
        images = pl.read_parquet(data / split / "images.parquet")
        captions = pl.read_parquet(data / split / "captions.parquet")
        vision = open_store(tiny_run / f"results/features/tiny/{split}/vit.zarr")
        text = open_store(tiny_run / f"results/features/tiny/{split}/minilm.zarr")
        assert vision.sample_ids().tolist() == images["image_id"].to_list()
        assert text.sample_ids().tolist() == captions["caption_id"].to_list()
        assert vision.num_layers == 3 and text.num_layers == 7
        assert vision.attrs["encoder"]["pretrained"] is False
        assert vision.attrs["encoder"]["init_seed"] == 0
    prompts = open_store(tiny_run / "results/features/tiny/prompts/minilm.zarr")
    assert prompts.n_samples == len(pl.read_parquet(data / "prompts.parquet"))
    assert (tiny_run / "results/logs/extract/tiny/train/vit.log").exists()
    assert (tiny_run / "results/benchmarks/extract/tiny/train/vit.tsv").exists()


@pytest.mark.slow
def test_second_run_does_nothing(tiny_run):
    result = snakemake(tiny_run, "extract")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Nothing to be done" in result.stdout + result.stderr


@pytest.mark.slow
def test_invalid_config_fails_before_any_job(tmp_path):
    broken = {**TINY, "runtime": {"device": "cpu", "batch_size": -1}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(broken))
    result = snakemake(tmp_path, "extract")
    assert result.returncode != 0
    assert "config key 'runtime.batch_size'" in result.stderr
    assert not (tmp_path / "results").exists()
