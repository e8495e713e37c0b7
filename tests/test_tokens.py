"""Token caches: the block plan, the store's round trip (xarray, dask), verified reads, stale
and forced stores, extraction against the encoders' own forward pass, the layer union read
from layers.json, a SIGKILLed extraction that resumes to the uninterrupted store, and sharded
token sets (3 shards = 1, a killed shard resumes alone)."""

import json
import os
import sys

import dask.array as da
import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from pipeline import layout
from pipeline.data import load_split, prepare_dataset
from pipeline.encoders import build_encoder
from pipeline.extraction import Source, Tokens, chosen_layers, extract
from pipeline.jobs import Job
from pipeline.stages.extract_tokens import run as run_extract_tokens
from pipeline.stages.extract_tokens_shard import run as run_extract_tokens_shard
from pipeline.stores import core
from pipeline.stores import tokens as token_layout
from pipeline.stores.inputs import TokenSet
from pipeline.stores.tokens import TokenStore, TokenWriter, plan_blocks

VIT = {
    "source": "timm",
    "name": "vit_tiny_patch16_224",
    "pretrained": False,
    "init_seed": 1,
    "image_size": 32,
    "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 32, "num_heads": 2},
}
TEXT = {"source": "bundled", "name": "all-MiniLM-L6-v2", "pooling": "mean", "max_tokens": 16}
RUNTIME = {"device": "cpu", "precision": "float32", "batch_size": 4, "on_stale": "recompute"}
VISION_TOKENS = 17  # CLS + a 4 x 4 grid
SHARD_MB = 8 * VISION_TOKENS * 32 * 2 / 2**20  # eight images per block in float16


pytestmark = pytest.mark.usefixtures("one_thread")


def extract_tokens(
    *, encoder_name, encoder_spec, dataset_dir, split, layers, out_dir, runtime, shard_mb=64.0
):
    """The token stores of ``layers``, as an extract_tokens job makes them: layer -> store."""
    source = Source(encoder_name, encoder_spec, dataset_dir, split, {**runtime, "num_workers": 0})
    tokens = Tokens({"dtype": "float16", "shard_mb": shard_mb})
    return dict(zip(layers, extract(tokens, source, out_dir, layers), strict=True))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "tiny"
    spec = {
        "source": "synthetic",
        "seed": 5,
        "image_size": 32,
        "splits": {"train": 60, "test": 12},
        "captions_per_image": 2,
    }
    prepare_dataset("tiny", spec, out)
    return out


# ---- the block plan and the store ----


def test_plan_packs_whole_samples_into_blocks():
    rng = np.random.default_rng(0)
    counts = rng.integers(3, 30, size=500)
    plan = plan_blocks(counts, dim=64, itemsize=2, shard_bytes=64 * 2 * 256, fixed=False)
    assert plan.slots_per_block % plan.chunk_slots == 0 and plan.slots_per_block >= counts.max()
    assert plan.block_rows[0] == 0 and plan.block_rows[-1] == 500
    for block in range(plan.n_blocks):
        rows = range(plan.block_rows[block], plan.block_rows[block + 1])
        first, end = block * plan.slots_per_block, (block + 1) * plan.slots_per_block
        assert plan.token_start[rows.start] == first  # a block starts on its shard
        assert plan.token_start[rows.stop - 1] + counts[rows.stop - 1] <= end
        assert np.all(np.diff(plan.token_start[rows.start : rows.stop]) == counts[rows][:-1])
    used = counts.sum() / plan.n_slots
    assert used > 0.85, used  # the unfilled tails of blocks are never stored anyway
    fixed = plan_blocks([17] * 100, dim=32, itemsize=2, shard_bytes=1 << 14, fixed=True)
    assert fixed.slots_per_block % 17 == 0 and fixed.chunk_slots % 17 == 0
    assert fixed.n_slots - 17 * 100 < fixed.slots_per_block  # only the last block has a tail


def ragged(n, dim, seed=0):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 12, size=n)
    return [rng.standard_normal((c, dim)).astype(np.float32) for c in counts]


def write_store(path, values, fingerprint="f1", shard_bytes=2 * 4 * 40, **kwargs):
    plan = plan_blocks([len(v) for v in values], 4, 2, shard_bytes, fixed=False)
    writer = TokenWriter.create_or_resume(
        path,
        fingerprint=fingerprint,
        sample_ids=[f"id-{i}" for i in range(len(values))],
        plan=plan,
        dim=4,
        dtype="float16",
        attrs={"encoder": {"name": "toy"}, "layer": 2, "layer_name": "layer.1"},
        **kwargs,
    )
    return writer


def fill(writer, values, stop=None):
    for row in writer.pending_rows()[:stop]:
        writer.add(int(row), values[row])


def test_round_trip_opens_with_xarray_and_dask(tmp_path, monkeypatch):
    path = tmp_path / "layer_2.zarr"
    values = ragged(50, 4)
    writer = write_store(path, values)
    assert writer.n_blocks > 3
    fill(writer, values)
    writer.finalize()
    reader = TokenStore.open(path, "f1")
    half = [v.astype(np.float16).astype(np.float32) for v in values]
    rows = np.array([7, 3, 49, 3, 0])
    batch, mask = reader.read(rows)
    assert batch.shape == (5, max(len(half[r]) for r in rows), 4)
    for i, row in enumerate(rows):
        assert mask[i].sum() == len(half[row])
        np.testing.assert_array_equal(batch[i][mask[i]], half[row])
        assert not batch[i][~mask[i]].any()
    assert reader.sample_ids()[:2].tolist() == ["id-0", "id-1"]

    assert reader.fits_cache and reader._cache  # a small store: whole blocks, kept
    monkeypatch.setattr(token_layout, "CACHE_BYTES", 0)
    sparse = TokenStore.open(path)  # one row per block: only its inner chunks
    pick = np.array([30, 1, 30])
    np.testing.assert_array_equal(sparse.read(pick)[0], reader.read(pick)[0])
    assert not sparse.fits_cache and not sparse._cache

    ds = xr.open_zarr(path)
    assert ds["sample"].values.tolist() == [f"id-{i}" for i in range(50)]  # the coordinate
    start = int(ds.token_start.sel(sample="id-7"))
    count = int(ds.token_count.sel(sample="id-7"))
    np.testing.assert_array_equal(ds.tokens.isel(token=slice(start, start + count)).values, half[7])
    lazy = da.from_zarr(str(path), component="tokens")
    assert lazy.shape == (reader.n_blocks * reader.slots_per_block, 4)
    np.testing.assert_array_equal(lazy[start : start + count].compute(), half[7])


def test_an_empty_split_gives_an_empty_store(tmp_path):
    writer = write_store(tmp_path / "empty.zarr", [])
    writer.finalize()
    reader = TokenStore.open(tmp_path / "empty.zarr")
    assert len(reader) == 0 and reader.read(np.zeros(0, np.int64))[0].shape == (0, 0, 4)


def test_float16_overflow_is_refused_naming_layer_and_sample(tmp_path):
    values = ragged(10, 4)
    values[6][0, 2] = 1e6  # above float16's 65504
    writer = write_store(tmp_path / "big.zarr", values)
    with pytest.raises(core.NonFiniteValuesError, match=r"layer layer\.1.*id-6.*float32"):
        fill(writer, values)


def test_damaged_shards_are_named_on_read_and_rewritten_on_resume(tmp_path):
    path = tmp_path / "layer_2.zarr"
    values = ragged(50, 4)
    writer = write_store(path, values)
    fill(writer, values)
    writer.finalize()
    shard = path / "tokens" / "c" / "1" / "0"
    shard.write_bytes(shard.read_bytes()[:-7])
    reader = TokenStore.open(path)
    rows = range(reader.block_rows[1], reader.block_rows[2])
    with pytest.raises(core.StoreIntegrityError, match=rf"layer 2\).*rows {rows.start}-"):
        reader.read(np.array([rows.start]))
    assert len(reader.integrity_problems()) == 1
    shard.unlink()
    with pytest.raises(core.MissingChunkError, match="is missing"):
        TokenStore.open(path).read(np.array([rows.start]))
    # a killed run (marker gone, store unfinished) resumes and rewrites the damaged block only
    core.marker_path(path).unlink()
    zarr.open_group(path, mode="r+").attrs["complete"] = False
    again = write_store(path, values)
    assert again.missing_blocks() == [1]
    fill(again, values)
    again.finalize()
    assert TokenStore.open(path).integrity_problems() == []


def test_stale_stores_are_recomputed_or_refused_and_finished_ones_made_again(tmp_path):
    path = tmp_path / "layer_2.zarr"
    values = ragged(20, 4)
    writer = write_store(path, values)
    fill(writer, values)
    writer.finalize()
    with pytest.raises(core.StaleStoreError, match="another configuration"):
        write_store(path, values, fingerprint="f2", on_stale="error")
    assert write_store(path, values).missing_blocks() == list(range(writer.n_blocks))  # finished
    half = write_store(path, values)
    fill(half, values, stop=int(half.block_rows[2]))
    assert write_store(path, values).missing_blocks() == list(range(2, writer.n_blocks))
    assert len(write_store(path, values, fresh=True).missing_blocks()) == writer.n_blocks
    assert len(write_store(path, values, fingerprint="f2").missing_blocks()) == writer.n_blocks


def test_a_layer_missing_from_a_token_set_is_an_error(tmp_path):
    marker = tmp_path / "vit.done"
    marker.write_text(json.dumps({"layers": {"0": "f"}}))
    token_set = TokenSet(str(marker), "request", "content")
    with pytest.raises(core.StaleStoreError, match=r"holds layers \[0\], not 2"):
        token_set.layer(2)


# ---- extraction ----


def test_stored_tokens_are_the_encoders_own(dataset, tmp_path):
    paths = extract_tokens(
        encoder_name="vit",
        encoder_spec=VIT,
        dataset_dir=dataset,
        split="test",
        layers=[0, 2],
        out_dir=tmp_path / "vit",
        runtime=RUNTIME,
        shard_mb=SHARD_MB,
    )
    encoder = build_encoder("vit", VIT)
    data = load_split(dataset, "test")
    with torch.inference_mode():
        batch = encoder.collate([data.open_image(i) for i in range(12)])
        expected = encoder.token_layers(batch, [0, 2])
        pooled = encoder.pooled_layers(batch)
    for layer, (values, _) in zip((0, 2), expected, strict=True):
        reader = TokenStore.open(paths[layer])
        stored, mask = reader.read(np.arange(12))
        assert stored.shape == (12, VISION_TOKENS, 32) and mask.all()
        np.testing.assert_allclose(stored, values.numpy(), rtol=1e-3, atol=1e-3)  # float16
        np.testing.assert_allclose(stored[:, 0], pooled[layer].numpy(), rtol=1e-3, atol=1e-3)
        view = {"resize": 35, "crop": [32, 32]}  # 32 / crop_pct 0.9, then the centre crop
        assert reader.attrs["layout"] == {"prefix_tokens": 1, "grid": [4, 4], "view": view}
        assert reader.sample_ids().tolist() == data.images["image_id"].to_list()
        assert reader.attrs["encoder"]["name"] == "vit" and reader.layer == layer

    text_paths = extract_tokens(
        encoder_name="minilm",
        encoder_spec=TEXT,
        dataset_dir=dataset,
        split="test",
        layers=[6],
        out_dir=tmp_path / "minilm",
        runtime=RUNTIME,
    )
    reader = TokenStore.open(text_paths[6])
    text = build_encoder("minilm", TEXT)
    captions = data.captions["text"].to_list()
    assert reader.token_count.tolist() == text.token_counts(captions)
    stored, mask = reader.read(np.arange(len(captions)))
    with torch.inference_mode():
        pooled = text.pooled_layers(text.collate(captions))[6].numpy()
    mean = (stored * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    np.testing.assert_allclose(mean, pooled, rtol=1e-3, atol=2e-3)  # the pooled store's mean


def layer_choice(path, choices, runs=None):
    body = {"metric": "mutual_knn", "choices": choices}
    if runs is not None:
        body |= {"scope": "run", "runs": {name: {"choices": c} for name, c in runs.items()}}
    path.write_text(json.dumps(body))
    return path


def test_chosen_layers_are_the_union_over_pairs_choices_and_runs(tmp_path):
    first = layer_choice(
        tmp_path / "a.json",
        {
            "last": {"vision_layer": 2, "text_layer": 6},
            "best": {"vision_layer": 0, "text_layer": 6},
        },
    )
    second = layer_choice(
        tmp_path / "b.json",
        {
            "last": {"vision_layer": 2, "text_layer": 3},
            "best": {"vision_layer": 2, "text_layer": 3},
        },
        runs={
            "n10_s0": {
                "last": {"vision_layer": 2, "text_layer": 3},
                "best": {"vision_layer": 1, "text_layer": 3},
            }
        },
    )
    assert chosen_layers([first], "vision", ["last", "best"]) == [0, 2]
    assert chosen_layers([first, second], "vision", ["last", "best"]) == [0, 1, 2]
    assert chosen_layers([first, second], "text", ["last"]) == [3, 6]
    with pytest.raises(ValueError, match=r"layer choice 'q0\.5' is not in it"):
        chosen_layers([first], "vision", ["q0.5"])


def token_job(dataset, tmp_path, layers_json, **runtime):
    spec = {
        "encoder_name": "vit",
        "encoder": VIT,
        "split": "train",
        "side": "vision",
        "layer_choices": ["last", "best"],
        "runtime": {**RUNTIME, **runtime},
        "tokens": {"dtype": "float16", "shard_mb": SHARD_MB},
    }
    marker = tmp_path / "tokens" / "vit.done"
    inputs = {"dataset": f"{dataset}/manifest.json", "layers": [str(layers_json)]}
    return Job("extract_tokens", spec, inputs, {"tokens": str(marker)}, threads=1), marker


def shard_stamps(path):
    return {
        p.relative_to(path / "tokens" / "c"): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in (path / "tokens" / "c").rglob("*")
        if p.is_file()
    }


def test_a_job_reruns_from_scratch_and_drops_layers_no_longer_chosen(dataset, tmp_path):
    choice = {"vision_layer": 2, "text_layer": 6}
    layers_json = layer_choice(tmp_path / "layers.json", {"last": choice, "best": choice})
    job, marker = token_job(dataset, tmp_path, layers_json)
    run_extract_tokens(job)
    assert json.loads(marker.read_text())["layers"].keys() == {"2"}
    directory = layout.tokens_dir_of_marker(str(marker))
    before = shard_stamps(tmp_path / "tokens" / "vit" / "layer_2.zarr")
    assert not (tmp_path / "tokens" / "vit" / ".in_progress").exists()

    layer_choice(tmp_path / "layers.json", {"last": choice, "best": {"vision_layer": 0}})
    marker.unlink()  # what Snakemake does before the job runs again
    run_extract_tokens(job)
    assert json.loads(marker.read_text())["layers"].keys() == {"0", "2"}
    after = shard_stamps(tmp_path / "tokens" / "vit" / "layer_2.zarr")
    assert all(after[key] != before[key] for key in before)  # asked again: recomputed

    layer_choice(
        tmp_path / "layers.json", {"last": {"vision_layer": 0}, "best": {"vision_layer": 0}}
    )
    run_extract_tokens(job)
    assert sorted(p.name for p in (tmp_path / "tokens" / "vit").iterdir()) == [
        "layer_0.zarr",
        "layer_0.zarr.done",
    ]
    assert directory == str(tmp_path / "tokens" / "vit")


def test_sigkill_then_resume_gives_the_uninterrupted_store(dataset, tmp_path, sigkill_once_written):
    choice = {"vision_layer": 2, "text_layer": 6}
    layers_json = layer_choice(
        tmp_path / "layers.json", {"last": choice, "best": {"vision_layer": 0}}
    )
    reference, _ = token_job(dataset, tmp_path / "reference", layers_json)
    run_extract_tokens(reference)

    job, marker = token_job(dataset, tmp_path / "killed", layers_json, batch_size=1)
    command = [
        *(sys.executable, "-m", "pipeline", "extract_tokens", "--spec", json.dumps(job.spec)),
        *("--in", f"dataset={job.inputs['dataset']}", f"layers={layers_json}"),
        *("--out", f"tokens={marker}", "--threads", "1"),
    ]
    killed = tmp_path / "killed" / "tokens" / "vit" / "layer_2.zarr"
    sigkill_once_written(command, killed, at_least=2)
    flags = zarr.open_group(killed, mode="r")["block_complete"][:]
    assert 2 <= flags.sum() < len(flags), "the kill must land mid-run"
    assert not marker.exists() and (killed.parent / ".in_progress").exists()
    finished = {
        key: stamp
        for key, stamp in shard_stamps(killed).items()
        if int(key.parts[0]) in set(np.flatnonzero(flags).tolist())
    }

    run_extract_tokens(job)
    for layer in (0, 2):
        ref = TokenStore.open(tmp_path / "reference" / "tokens" / "vit" / f"layer_{layer}.zarr")
        got = TokenStore.open(killed.parent / f"layer_{layer}.zarr", ref.fingerprint)
        rows = np.arange(ref.n_samples)
        np.testing.assert_array_equal(got.read(rows)[0], ref.read(rows)[0])
        np.testing.assert_array_equal(got.token_start, ref.token_start)
    after = shard_stamps(killed)
    assert all(after[key] == stamp for key, stamp in finished.items())  # resumed, not recomputed
    assert json.loads(marker.read_text())["layers"].keys() == {"0", "2"}


def token_shard_jobs(dataset, tmp_path, layers_json, shards, **runtime):
    """The shard jobs of the vision token set and the job that completes it."""
    job, marker = token_job(dataset, tmp_path, layers_json, **runtime)
    folder = str(marker).removesuffix(".done")
    markers = [f"{folder}.shard-{k}-of-{shards}.done" for k in range(1, shards + 1)]
    parts = [
        Job(
            "extract_tokens_shard",
            {**job.spec, "shard": k, "shards": shards},
            job.inputs,
            {"shard": markers[k - 1]},
            threads=1,
        )
        for k in range(1, shards + 1)
    ]
    finish = {"encoder_name": "vit", "split": "train", "shards": shards}
    return parts, Job("extract_tokens", finish, {"shards": markers}, job.outputs), marker


def assert_same_token_set(marker, reference_marker):
    made, ref = json.loads(marker.read_text()), json.loads(reference_marker.read_text())
    assert made["layers"] == ref["layers"]  # the same layers, the same fingerprints
    for layer in made["layers"]:
        path = marker.parent / marker.name.removesuffix(".done") / f"layer_{layer}.zarr"
        got = TokenStore.open(path)
        want = TokenStore.open(
            reference_marker.parent / reference_marker.name.removesuffix(".done") / path.name
        )
        rows = np.arange(want.n_samples)
        np.testing.assert_array_equal(got.read(rows)[0], want.read(rows)[0])
        np.testing.assert_array_equal(got.token_start, want.token_start)
        np.testing.assert_array_equal(got.block_rows, want.block_rows)
        assert got.integrity_problems() == []


def test_three_token_shards_give_the_token_set_of_one(dataset, tmp_path):
    choice = {"vision_layer": 2, "text_layer": 6}
    layers_json = layer_choice(
        tmp_path / "layers.json", {"last": choice, "best": {"vision_layer": 0}}
    )
    reference, reference_marker = token_job(dataset, tmp_path / "one", layers_json)
    run_extract_tokens(reference)
    parts, finish, marker = token_shard_jobs(dataset, tmp_path / "three", layers_json, 3)
    for part in (parts[1], parts[2], parts[0]):  # any shard may come first
        run_extract_tokens_shard(part)
    assert not marker.exists()
    run_extract_tokens(finish)
    assert_same_token_set(marker, reference_marker)
    folder = marker.parent / "vit"
    store = TokenStore.open(folder / "layer_2.zarr")  # tokens.shard_mb holds in shard jobs too
    assert store.n_blocks == -(-store.n_samples // 8) > 1  # eight images per block
    assert sorted(p.name for p in folder.iterdir()) == [
        "layer_0.zarr",
        "layer_0.zarr.done",
        "layer_2.zarr",
        "layer_2.zarr.done",
    ]  # no lock files left


def test_a_killed_token_shard_resumes_alone(dataset, tmp_path, sigkill_once_written):
    choice = {"vision_layer": 2, "text_layer": 6}
    layers_json = layer_choice(tmp_path / "layers.json", {"last": choice, "best": choice})
    reference, reference_marker = token_job(dataset, tmp_path / "one", layers_json)
    run_extract_tokens(reference)
    parts, finish, marker = token_shard_jobs(
        dataset, tmp_path / "three", layers_json, 3, batch_size=1
    )
    for part in (parts[0], parts[2]):
        run_extract_tokens_shard(part)
    path = marker.parent / "vit" / "layer_2.zarr"
    n_blocks = zarr.open_group(path, mode="r")["block_complete"].shape[0]
    own = core.shard_blocks(n_blocks, 2, 3)
    others = {k: v for k, v in shard_stamps(path).items() if int(k.parts[0]) not in own}

    job = parts[1]
    command = [
        *(sys.executable, "-m", "pipeline", "extract_tokens_shard"),
        *("--spec", json.dumps(job.spec), "--in", f"dataset={job.inputs['dataset']}"),
        *(f"layers={layers_json}", "--out", f"shard={job.output('shard')}", "--threads", "1"),
    ]
    sigkill_once_written(command, path, at_least=1, blocks=own)
    flags = zarr.open_group(path, mode="r")["block_complete"][:]
    assert 1 <= flags[own.start : own.stop].sum() < len(own), "the kill must land mid-shard"
    assert not os.path.exists(job.output("shard"))
    finished = {k: v for k, v in shard_stamps(path).items() if flags[int(k.parts[0])]}

    run_extract_tokens_shard(job)  # its .running file says it was killed: resume
    after = shard_stamps(path)
    assert all(after[k] == v for k, v in finished.items())  # its finished blocks kept
    assert all(after[k] == v for k, v in others.items())  # the other shards' untouched
    run_extract_tokens(finish)
    assert_same_token_set(marker, reference_marker)


def test_finishing_a_token_set_names_a_shard_with_missing_blocks(dataset, tmp_path):
    choice = {"vision_layer": 2, "text_layer": 6}
    layers_json = layer_choice(tmp_path / "layers.json", {"last": choice, "best": choice})
    parts, finish, marker = token_shard_jobs(dataset, tmp_path, layers_json, 2)
    for part in parts:
        run_extract_tokens_shard(part)
    path = marker.parent / "vit" / "layer_2.zarr"
    zarr.open_group(path, mode="r+")["block_complete"][0] = False  # lost after shard 1 ran
    with pytest.raises(
        core.IncompleteStoreError,
        match=r"vit\.shard-1-of-2\.done: layer_2\.zarr blocks \[0\] missing",
    ):
        run_extract_tokens(finish)
    assert not os.path.exists(parts[0].output("shard"))  # Snakemake runs it again
    assert os.path.exists(parts[1].output("shard")) and not marker.exists()
    run_extract_tokens_shard(parts[0])
    run_extract_tokens(finish)
    assert TokenStore.open(path).integrity_problems() == []
