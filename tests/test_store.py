"""The feature store: round trip, block resume, completion marker, stale fingerprints, and
forced runs (a store finished before is recomputed from scratch, a killed one resumed)."""

import dask.array as da
import numpy as np
import pytest
import xarray as xr

from pipeline.stores import core
from pipeline.stores.features import FeatureStore, FeatureWriter, rows_per_chunk

DIMS = [8, 12]


def make_writer(path, n=50, fingerprint="f1", **kwargs):
    return FeatureWriter.create_or_resume(
        path,
        fingerprint=fingerprint,
        sample_ids=[f"id-{i}" for i in range(n)],
        layer_names=["block.0", "block.1"],
        dims=DIMS,
        attrs={"encoder": {"name": "toy"}},
        chunk_bytes=8 * 4 * 16,  # 16 rows of the narrowest layer per chunk
        **kwargs,
    )


def features(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, d)).astype(np.float32) for d in DIMS]


def write_all(writer, values):
    for block, start, stop in writer.pending_blocks():
        writer.write_block(block, [v[start:stop] for v in values])


def test_round_trip_opens_with_xarray_and_dask(tmp_path):
    path = tmp_path / "toy.zarr"
    values = features(50)
    writer = make_writer(path)
    blocks = [(start, stop) for _, start, stop in writer.pending_blocks()]
    assert blocks == [(0, 16), (16, 32), (32, 48), (48, 50)]
    write_all(writer, values)
    writer.finalize()

    opened = FeatureStore.open(path, "f1")
    assert opened.num_layers == 2 and opened.dims == DIMS and opened.n_samples == 50
    np.testing.assert_array_equal(opened.read(1), values[1])
    rows = np.array([7, 3, 49, 3])
    np.testing.assert_array_equal(opened.read(0, rows), values[0][rows])
    np.testing.assert_array_equal(opened.read(-1), values[1])
    assert opened.sample_ids()[:2].tolist() == ["id-0", "id-1"]
    assert opened.attrs["encoder"] == {"name": "toy"} and opened.attrs["complete"]

    dataset = xr.open_zarr(path, group="layers")
    assert dataset["0"].dims == ("sample", "dim_0")  # widths differ, so one name per layer
    assert dataset["sample"].values.tolist() == [f"id-{i}" for i in range(50)]  # coordinate
    assert dataset["1"].sel(sample="id-3").values.tolist() == values[1][3].tolist()
    np.testing.assert_array_equal(dataset["1"].values, values[1])
    lazy = da.from_zarr(str(path), component="layers/0")
    assert lazy.chunks[0][0] == 16
    np.testing.assert_array_equal(lazy.compute(), values[0])
    with pytest.raises(IndexError, match="layer 2 does not exist"):
        opened.layer(2)


def test_chunks_hold_at_least_a_megabyte_by_default():
    assert rows_per_chunk(100_000, [192, 384]) * 192 * 4 >= 2**20
    assert rows_per_chunk(10, [192]) == 10


def test_resume_writes_only_missing_blocks_and_gives_the_same_store(tmp_path):
    values = features(50)
    full = make_writer(tmp_path / "full.zarr")
    write_all(full, values)
    full.finalize()

    path = tmp_path / "resumed.zarr"
    first = make_writer(path)
    block, start, stop = first.pending_blocks()[1]
    first.write_block(block, [v[start:stop] for v in values])
    with pytest.raises(core.IncompleteStoreError):
        first.finalize()
    with pytest.raises(core.IncompleteStoreError, match="incomplete"):
        FeatureStore.open(path)

    again = make_writer(path)  # same fingerprint: resume
    assert [b for b, _, _ in again.pending_blocks()] == [0, 2, 3]
    write_all(again, values)
    again.finalize()
    for layer in range(2):
        np.testing.assert_array_equal(
            FeatureStore.open(path).read(layer),
            FeatureStore.open(tmp_path / "full.zarr").read(layer),
        )


def test_stale_store_is_recomputed_or_refused_never_reused(tmp_path):
    path = tmp_path / "toy.zarr"
    writer = make_writer(path)
    write_all(writer, features(50))
    writer.finalize()

    with pytest.raises(core.StaleStoreError, match="stale"):
        FeatureStore.open(path, "another")
    with pytest.raises(core.StaleStoreError, match="another configuration"):
        make_writer(path, fingerprint="f2", on_stale="error")

    fresh = make_writer(path, fingerprint="f2")
    assert not core.marker_path(path).exists()  # reopening for writing withdraws the marker
    assert len(fresh.pending_blocks()) == 4  # nothing of the old store survives
    assert np.isnan(fresh.layers[0][0, 0])


def test_a_finished_store_made_again_is_recomputed_from_scratch(tmp_path):
    """Snakemake deletes a forced job's marker; the store says it was finished: start over."""
    path = tmp_path / "toy.zarr"
    first = make_writer(path)
    write_all(first, features(50))
    first.finalize()
    chunk = path / "layers" / "0" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:20])  # damage that per-block flags cannot see
    core.marker_path(path).unlink()

    again = make_writer(path)
    assert len(again.pending_blocks()) == 4  # nothing is trusted, nothing resumed
    assert not chunk.exists()
    values = features(50)
    write_all(again, values)
    again.finalize()
    np.testing.assert_array_equal(FeatureStore.open(path).read(0), values[0])


def test_fresh_discards_a_killed_runs_blocks(tmp_path):
    path = tmp_path / "toy.zarr"
    killed = make_writer(path)
    block, start, stop = killed.pending_blocks()[0]
    killed.write_block(block, [v[start:stop] for v in features(50)])
    assert len(make_writer(path).pending_blocks()) == 3  # default: resume
    assert len(make_writer(path, fresh=True).pending_blocks()) == 4


def test_resume_rewrites_a_finished_block_that_no_longer_verifies(tmp_path):
    path = tmp_path / "toy.zarr"
    values = features(50)
    killed = make_writer(path)
    for block, start, stop in killed.pending_blocks()[:2]:
        killed.write_block(block, [v[start:stop] for v in values])
    (path / "layers" / "1" / "c" / "0" / "0").unlink()

    resumed = make_writer(path)
    assert [b for b, _, _ in resumed.pending_blocks()] == [0, 2, 3]
    write_all(resumed, values)
    resumed.finalize()
    np.testing.assert_array_equal(FeatureStore.open(path).read(1), values[1])


def test_a_killed_store_whose_flags_do_not_read_starts_over(tmp_path):
    path = tmp_path / "toy.zarr"
    killed = make_writer(path)
    block, start, stop = killed.pending_blocks()[0]
    killed.write_block(block, [v[start:stop] for v in features(50)])
    (path / "block_complete" / "c" / "0").write_bytes(b"not a chunk")
    assert len(make_writer(path).pending_blocks()) == 4
