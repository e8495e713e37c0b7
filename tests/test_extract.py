"""The extract stage: stored rows equal the encoder's output, SIGKILL resume, stale stores."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr

from pipeline import store
from pipeline.data import load_prompts, load_split, prepare_dataset
from pipeline.encoders import build_encoder
from pipeline.extract import extract

VIT = {
    "source": "timm",
    "name": "vit_tiny_patch16_224",
    "pretrained": False,
    "init_seed": 1,
    "image_size": 32,
    "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 32, "num_heads": 2},
}
ROWS_PER_BLOCK = 8
RUNTIME = {"device": "cpu", "batch_size": 4, "chunk_mb": ROWS_PER_BLOCK * 32 * 4 / 2**20}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "tiny"
    spec = {
        "source": "synthetic",
        "seed": 5,
        "image_size": 32,
        "splits": {"train": 200, "test": 12},
        "captions_per_image": 2,
    }
    prepare_dataset("tiny", spec, out)
    return out


def run_extract(dataset, out, encoder=VIT, split="train", **runtime):
    return extract(
        encoder_name="vit",
        encoder_spec=encoder,
        dataset_dir=dataset,
        split=split,
        out=out,
        runtime={**RUNTIME, **runtime},
    )


def test_store_rows_equal_the_encoders_pooled_layers(dataset, tmp_path):
    path = run_extract(dataset, tmp_path / "vit.zarr", split="test")
    features = store.open_store(path)
    data = load_split(dataset, "test")
    assert features.sample_ids().tolist() == data.images["image_id"].to_list()
    encoder = build_encoder("vit", VIT)
    with torch.inference_mode():
        expected = encoder.pooled_layers(encoder.collate([data.open_image(i) for i in range(12)]))
    assert features.num_layers == 3
    for layer, values in enumerate(expected):
        np.testing.assert_allclose(features.read(layer), values.numpy(), rtol=1e-5, atol=1e-6)
    attrs = features.attrs
    assert attrs["encoder"]["pretrained"] is False and attrs["encoder"]["init_seed"] == 1
    assert (
        attrs["dataset"]["content_hash"]
        == json.loads((dataset / "manifest.json").read_text())["content_hash"]
    )
    assert attrs["precision"] == "float32" and "torch" in attrs["versions"]


def test_prompts_pseudo_split_holds_every_prompt(dataset, tmp_path):
    text = {"source": "bundled", "name": "all-MiniLM-L6-v2", "max_tokens": 16}
    path = extract(
        encoder_name="minilm",
        encoder_spec=text,
        dataset_dir=dataset,
        split="prompts",
        out=tmp_path / "minilm.zarr",
        runtime=RUNTIME,
    )
    features = store.open_store(path)
    assert features.sample_ids().tolist() == load_prompts(dataset)["prompt_id"].to_list()
    assert features.dims == [384] * 7


def test_sigkill_at_any_moment_then_resume_gives_the_uninterrupted_store(dataset, tmp_path):
    reference = store.open_store(run_extract(dataset, tmp_path / "reference.zarr"))
    killed = tmp_path / "killed.zarr"
    spec = {
        "encoder_name": "vit",
        "encoder": VIT,
        "split": "train",
        "runtime": {**RUNTIME, "batch_size": 1},
    }
    command = [
        *(sys.executable, "-m", "pipeline", "extract_features", "--spec", json.dumps(spec)),
        *("--in", f"dataset={dataset}/manifest.json", "--out", f"marker={killed}.done"),
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    done = 0
    while done < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
        try:
            done = int(zarr.open_group(killed, mode="r")["block_complete"][:].sum())
        except (FileNotFoundError, KeyError, ValueError):
            continue
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not store.marker_path(killed).exists()
    flags = zarr.open_group(killed, mode="r")["block_complete"][:]
    assert 3 <= flags.sum() < len(flags), "the kill must land mid-run"

    run_extract(dataset, killed)
    resumed = store.open_store(killed, reference.fingerprint)
    for layer in range(reference.num_layers):
        np.testing.assert_array_equal(resumed.read(layer), reference.read(layer))


def test_a_store_from_another_config_is_recomputed_or_refused(dataset, tmp_path):
    path = run_extract(dataset, tmp_path / "vit.zarr", split="test")
    old = store.open_store(path).fingerprint
    other_seed = {**VIT, "init_seed": 2}
    with pytest.raises(store.StaleStoreError, match="another configuration"):
        run_extract(dataset, path, encoder=other_seed, split="test", on_stale="error")
    run_extract(dataset, path, encoder=other_seed, split="test")
    second = store.open_store(path)
    assert second.fingerprint != old
    assert second.attrs["encoder"]["init_seed"] == 2
    with pytest.raises(store.StaleStoreError):
        store.open_store(path, old)
