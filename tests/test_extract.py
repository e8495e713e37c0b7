"""The extract stage: stored rows equal the encoder's output, SIGKILL resume, forced runs
recompute, stale stores, NaN refused, the expected fingerprint."""

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

from pipeline import extract as extract_module
from pipeline import store
from pipeline.data import load_prompts, load_split, prepare_dataset
from pipeline.encoders import build_encoder
from pipeline.extract import expected_fingerprint, extract

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
    finished = chunk_stamps(killed, np.flatnonzero(flags))

    run_extract(dataset, killed)
    resumed = store.open_store(killed, reference.fingerprint)
    for layer in range(reference.num_layers):
        np.testing.assert_array_equal(resumed.read(layer), reference.read(layer))
    assert chunk_stamps(killed, np.flatnonzero(flags)) == finished  # resumed, not recomputed


def stamp(stat):
    return stat.st_ino, stat.st_mtime_ns


def chunk_stamps(path, blocks):
    """(inode, mtime) of every layer's chunk file of ``blocks``: a rewrite changes them."""
    layers = sorted(p for p in (path / "layers").iterdir() if p.is_dir() and p.name.isdigit())
    return {
        (layer.name, int(b)): stamp((layer / "c" / str(b) / "0").stat())
        for layer in layers
        for b in blocks
    }


def test_a_forced_rerun_recomputes_from_scratch_and_repairs_a_corrupt_chunk(dataset, tmp_path):
    """Snakemake deletes a forced job's marker first; the finished store is not trusted."""
    path = run_extract(dataset, tmp_path / "vit.zarr")
    reference = [store.open_store(path).read(layer) for layer in range(3)]
    before = chunk_stamps(path, range(3))
    chunk = path / "layers" / "1" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-9])
    with pytest.raises(store.CorruptChunkError, match=r"layer 1 .*rows 8-15"):
        store.open_store(path).read(1)
    store.marker_path(path).unlink()

    run_extract(dataset, path)
    after = chunk_stamps(path, range(3))
    assert all(after[key] != before[key] for key in before)  # every chunk written again
    rerun = store.open_store(path)
    assert rerun.integrity_problems() == []
    for layer in range(3):
        np.testing.assert_array_equal(rerun.read(layer), reference[layer])


def test_fresh_recomputes_even_a_killed_runs_blocks(dataset, tmp_path):
    path = run_extract(dataset, tmp_path / "vit.zarr", split="test")
    before = chunk_stamps(path, range(2))
    zarr.open_group(path, mode="r+").attrs["complete"] = False  # as if killed at the end
    store.marker_path(path).unlink()
    run_extract(dataset, path, split="test")
    assert chunk_stamps(path, range(2)) == before  # killed: resumed
    store.marker_path(path).unlink()
    zarr.open_group(path, mode="r+").attrs["complete"] = False
    extract(
        encoder_name="vit",
        encoder_spec=VIT,
        dataset_dir=dataset,
        split="test",
        out=path,
        runtime=RUNTIME,
        fresh=True,
    )
    after = chunk_stamps(path, range(2))
    assert all(after[key] != before[key] for key in before)


def test_nan_features_are_refused_naming_encoder_layer_and_sample_ids(
    dataset, tmp_path, monkeypatch
):
    encode = extract_module._encode_rows

    def with_nan(encoder, rows, *args):
        pooled = encode(encoder, rows, *args)
        if rows.start == 8:
            pooled[2][1, 5] = np.inf
        return pooled

    monkeypatch.setattr(extract_module, "_encode_rows", with_nan)
    path = tmp_path / "vit.zarr"
    with pytest.raises(store.NonFiniteValuesError) as error:
        run_extract(dataset, path, split="test")
    image_id = load_split(dataset, "test").images["image_id"].to_list()[9]
    text = str(error.value)
    assert "encoder 'vit'" in text and "layer 2" in text and image_id in text
    assert not store.marker_path(path).exists()


def test_expected_fingerprint_is_the_one_extraction_records(dataset, tmp_path):
    path = run_extract(dataset, tmp_path / "vit.zarr", split="test")
    inputs = {"encoder_name": "vit", "dataset_dir": dataset, "split": "test", "runtime": RUNTIME}
    expected = expected_fingerprint(encoder_spec=VIT, **inputs)
    assert store.open_store(path, fingerprint=expected).fingerprint == expected
    other = expected_fingerprint(encoder_spec={**VIT, "init_seed": 2}, **inputs)
    with pytest.raises(store.StaleStoreError, match="stale"):
        store.open_store(path, fingerprint=other)
    assert expected_fingerprint(encoder_spec=VIT, **{**inputs, "split": "train"}) != expected


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
