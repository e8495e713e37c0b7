"""The extract stage: stored rows equal the encoder's output, SIGKILL resume, forced runs
recompute, stale stores, NaN refused, the expected fingerprint; sharded extraction gives the
same store, a killed shard resumes alone."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.data import load_prompts, load_split, prepare_dataset
from pipeline.encoders import build_encoder
from pipeline.extraction import Features, Source
from pipeline.extraction import extract as extract_stores
from pipeline.jobs import Job
from pipeline.stages.extract_features import run as run_extract_job
from pipeline.stages.extract_features_shard import run as run_extract_shard
from pipeline.stores import core, keys
from pipeline.stores.features import FeatureStore, FeatureWriter

VIT = {
    "source": "timm",
    "name": "vit_tiny_patch16_224",
    "pretrained": False,
    "init_seed": 1,
    "image_size": 32,
    "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 32, "num_heads": 2},
}
ROWS_PER_BLOCK = 8
RUNTIME = {
    "device": "cpu",
    "precision": "float32",
    "batch_size": 4,
    "chunk_mb": ROWS_PER_BLOCK * 32 * 4 / 2**20,
    "on_stale": "recompute",
}


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


def extract(*, encoder_name, encoder_spec, dataset_dir, split, out, runtime, fresh=False):
    """The feature store of one encoder over one split, as an extract_features job makes it."""
    source = Source(encoder_name, encoder_spec, dataset_dir, split, {**runtime, "num_workers": 0})
    [path] = extract_stores(Features(), source, out, fresh=fresh)
    return path


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
    features = FeatureStore.open(path)
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
    features = FeatureStore.open(path)
    assert features.sample_ids().tolist() == load_prompts(dataset)["prompt_id"].to_list()
    assert features.dims == [384] * 7


def test_sigkill_at_any_moment_then_resume_gives_the_uninterrupted_store(
    dataset, tmp_path, sigkill_once_written
):
    reference = FeatureStore.open(run_extract(dataset, tmp_path / "reference.zarr"))
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
    sigkill_once_written(command, killed, at_least=3)
    assert not core.marker_path(killed).exists()
    flags = zarr.open_group(killed, mode="r")["block_complete"][:]
    assert 3 <= flags.sum() < len(flags), "the kill must land mid-run"
    finished = chunk_stamps(killed, np.flatnonzero(flags))

    run_extract(dataset, killed)
    resumed = FeatureStore.open(killed, reference.fingerprint)
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
    reference = [FeatureStore.open(path).read(layer) for layer in range(3)]
    before = chunk_stamps(path, range(3))
    chunk = path / "layers" / "1" / "c" / "1" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-9])
    with pytest.raises(core.CorruptChunkError, match=r"layer 1 .*rows 8-15"):
        FeatureStore.open(path).read(1)
    core.marker_path(path).unlink()

    run_extract(dataset, path)
    after = chunk_stamps(path, range(3))
    assert all(after[key] != before[key] for key in before)  # every chunk written again
    rerun = FeatureStore.open(path)
    assert rerun.integrity_problems() == []
    for layer in range(3):
        np.testing.assert_array_equal(rerun.read(layer), reference[layer])


def test_fresh_recomputes_even_a_killed_runs_blocks(dataset, tmp_path):
    path = run_extract(dataset, tmp_path / "vit.zarr", split="test")
    before = chunk_stamps(path, range(2))
    zarr.open_group(path, mode="r+").attrs["complete"] = False  # as if killed at the end
    core.marker_path(path).unlink()
    run_extract(dataset, path, split="test")
    assert chunk_stamps(path, range(2)) == before  # killed: resumed
    core.marker_path(path).unlink()
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
    assemble = FeatureWriter.block_values

    def with_nan(writer, rows):
        pooled = assemble(writer, rows)
        if writer._block == 1:  # rows 8-15
            pooled[2][1, 5] = np.inf
        return pooled

    monkeypatch.setattr(FeatureWriter, "block_values", with_nan)
    path = tmp_path / "vit.zarr"
    with pytest.raises(core.NonFiniteValuesError) as error:
        run_extract(dataset, path, split="test")
    image_id = load_split(dataset, "test").images["image_id"].to_list()[9]
    text = str(error.value)
    assert "encoder 'vit'" in text and "layer 2" in text and image_id in text
    assert not core.marker_path(path).exists()


def test_expected_fingerprint_is_the_one_extraction_records(dataset, tmp_path):
    path = run_extract(dataset, tmp_path / "vit.zarr", split="test")

    def expected_fingerprint(encoder_spec, split="test"):
        source = Source("vit", encoder_spec, dataset, split, RUNTIME)
        return source.fingerprint(keys.FEATURES)

    expected = expected_fingerprint(VIT)
    assert FeatureStore.open(path, fingerprint=expected).fingerprint == expected
    other = expected_fingerprint({**VIT, "init_seed": 2})
    with pytest.raises(core.StaleStoreError, match="stale"):
        FeatureStore.open(path, fingerprint=other)
    assert expected_fingerprint(VIT, split="train") != expected


def test_a_store_from_another_config_is_recomputed_or_refused(dataset, tmp_path):
    path = run_extract(dataset, tmp_path / "vit.zarr", split="test")
    old = FeatureStore.open(path).fingerprint
    other_seed = {**VIT, "init_seed": 2}
    with pytest.raises(core.StaleStoreError, match="another configuration"):
        run_extract(dataset, path, encoder=other_seed, split="test", on_stale="error")
    run_extract(dataset, path, encoder=other_seed, split="test")
    second = FeatureStore.open(path)
    assert second.fingerprint != old
    assert second.attrs["encoder"]["init_seed"] == 2
    with pytest.raises(core.StaleStoreError):
        FeatureStore.open(path, old)


def shard_job(dataset, store_path, shard, shards, **runtime):
    spec = {
        "encoder_name": "vit",
        "encoder": VIT,
        "split": "train",
        "runtime": {**RUNTIME, **runtime},
        "shard": shard,
        "shards": shards,
    }
    marker = f"{store_path}.shard-{shard}-of-{shards}.done"
    return Job(
        "extract_features_shard", spec, {"dataset": f"{dataset}/manifest.json"}, {"shard": marker}
    )


def finish_job(store_path, shards):
    markers = [f"{store_path}.shard-{k}-of-{shards}.done" for k in range(1, shards + 1)]
    return Job(
        "extract_features",
        {"shards": shards},
        {"shards": markers},
        {"marker": f"{store_path}.done"},
    )


def assert_same_store(path, reference_path):
    """Same values, ids, chunking and attributes (but the time of completion)."""
    made, reference = FeatureStore.open(path), FeatureStore.open(reference_path)
    assert made.sample_ids().tolist() == reference.sample_ids().tolist()
    for layer in range(reference.num_layers):
        assert made.layer(layer).chunks == reference.layer(layer).chunks
        np.testing.assert_array_equal(made.read(layer), reference.read(layer))
    ignore = {"completed_at", "versions"}
    attrs = {k: v for k, v in made.attrs.items() if k not in ignore}
    assert attrs == {k: v for k, v in reference.attrs.items() if k not in ignore}
    assert made.integrity_problems() == []


def test_three_shards_give_the_store_of_one(dataset, tmp_path):
    reference = run_extract(dataset, tmp_path / "one.zarr")
    sharded = tmp_path / "three.zarr"
    for shard in (2, 3, 1):  # any shard may come first and create the store
        run_extract_shard(shard_job(dataset, sharded, shard, 3))
        assert not core.marker_path(sharded).exists()
    run_extract_job(finish_job(sharded, 3))
    assert_same_store(sharded, reference)
    assert json.loads(core.marker_path(sharded).read_text())["shards"] == 3
    assert not core.lock_path(sharded).exists()


def test_shards_split_the_blocks_into_disjoint_runs():
    for n_blocks in (0, 1, 2, 7, 25):
        for shards in (1, 2, 3, 8):
            runs = [core.shard_blocks(n_blocks, k, shards) for k in range(1, shards + 1)]
            assert [b for run in runs for b in run] == list(range(n_blocks))
    with pytest.raises(ValueError, match="shard 4 of 3"):
        core.shard_blocks(10, 4, 3)


def test_a_killed_shard_resumes_alone(dataset, tmp_path, sigkill_once_written):
    reference = run_extract(dataset, tmp_path / "one.zarr")
    path = tmp_path / "sharded.zarr"
    for shard in (1, 3):
        run_extract_shard(shard_job(dataset, path, shard, 3))
    n_blocks = zarr.open_group(path, mode="r")["block_complete"].shape[0]
    own = core.shard_blocks(n_blocks, 2, 3)
    others = [b for b in range(n_blocks) if b not in own]
    before_others = chunk_stamps(path, others)

    job = shard_job(dataset, path, 2, 3, batch_size=1)
    command = [
        *(sys.executable, "-m", "pipeline", "extract_features_shard"),
        *("--spec", json.dumps(job.spec), "--in", f"dataset={dataset}/manifest.json"),
        *("--out", f"shard={job.output('shard')}"),
    ]
    sigkill_once_written(command, path, at_least=2, blocks=own)
    flags = zarr.open_group(path, mode="r")["block_complete"][:]
    assert 2 <= flags[own.start : own.stop].sum() < len(own), "the kill must land mid-shard"
    assert not Path(job.output("shard")).exists()
    finished = chunk_stamps(path, [b for b in own if flags[b]])

    run_extract_shard(job)  # its .running file says it was killed: resume
    assert chunk_stamps(path, [b for b in own if flags[b]]) == finished  # kept, not redone
    assert chunk_stamps(path, others) == before_others  # the other shards untouched
    run_extract_job(finish_job(path, 3))
    assert_same_store(path, reference)


def test_finishing_names_a_shard_whose_blocks_are_missing_and_drops_its_marker(dataset, tmp_path):
    path = tmp_path / "sharded.zarr"
    for shard in (1, 2):
        run_extract_shard(shard_job(dataset, path, shard, 2))
    zarr.open_group(path, mode="r+")["block_complete"][-1] = False  # lost after shard 2 ran
    with pytest.raises(
        core.IncompleteStoreError, match=r"shard-2-of-2\.done: blocks \[24\] missing"
    ):
        run_extract_job(finish_job(path, 2))
    assert not Path(f"{path}.shard-2-of-2.done").exists()  # Snakemake runs it again
    assert Path(f"{path}.shard-1-of-2.done").exists()
    assert not core.marker_path(path).exists()
    run_extract_shard(shard_job(dataset, path, 2, 2))
    run_extract_job(finish_job(path, 2))
    assert FeatureStore.open(path).integrity_problems() == []


def test_a_rerun_shard_of_a_finished_store_recomputes_only_its_blocks(dataset, tmp_path):
    path = tmp_path / "sharded.zarr"
    for shard in (1, 2):
        run_extract_shard(shard_job(dataset, path, shard, 2))
    run_extract_job(finish_job(path, 2))
    n_blocks = zarr.open_group(path, mode="r")["block_complete"].shape[0]
    first, second = core.shard_blocks(n_blocks, 1, 2), core.shard_blocks(n_blocks, 2, 2)
    before = chunk_stamps(path, range(n_blocks))
    run_extract_shard(shard_job(dataset, path, 2, 2))  # forced: not killed, so redone
    assert not core.marker_path(path).exists()  # the store is being changed
    after = chunk_stamps(path, range(n_blocks))
    assert all(after[k] == before[k] for k in before if k[1] in first)
    assert all(after[k] != before[k] for k in before if k[1] in second)
    run_extract_job(finish_job(path, 2))
    assert FeatureStore.open(path).integrity_problems() == []
