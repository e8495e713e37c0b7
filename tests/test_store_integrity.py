"""Feature-store integrity: missing, corrupt and non-finite chunks are named errors, never data;
the writer refuses NaN; ``pipeline.verify`` reports every kind of damage with its repair."""

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from pipeline import provenance, verify
from pipeline.align.grid import fit_runs
from pipeline.pairs import grid_runs
from pipeline.stores import core
from pipeline.stores.features import FeatureStore, FeatureWriter

DIMS = [8, 12]
N = 50  # four blocks of 16 rows: 0-15, 16-31, 32-47, 48-49


def write_store(path, values=None, fingerprint="f1", finalize=True):
    writer = FeatureWriter.create_or_resume(
        path,
        fingerprint=fingerprint,
        sample_ids=[f"id-{i}" for i in range(N)],
        layer_names=["block.0", "block.1"],
        dims=DIMS,
        attrs={"encoder": {"name": "toy"}},
        chunk_bytes=8 * 4 * 16,
    )
    values = features() if values is None else values
    for block, start, stop in writer.pending_blocks():
        writer.write_block(block, [v[start:stop] for v in values])
    if finalize:
        writer.finalize()
    return writer


def features(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((N, d)).astype(np.float32) for d in DIMS]


def chunk(path, layer, block):
    return path / "layers" / str(layer) / "c" / str(block) / "0"


def names(error_text, path, layer, rows):
    """The message names the store, the layer and the rows."""
    return str(path) in error_text and f"layer {layer} " in error_text and rows in error_text


@pytest.fixture
def complete(tmp_path):
    path = tmp_path / "toy.zarr"
    values = features()
    write_store(path, values)
    return path, values


def test_codec_chain_ends_with_a_crc32c_of_the_stored_bytes(complete):
    path, _ = complete
    codecs = json.loads((path / "layers" / "0" / "zarr.json").read_text())["codecs"]
    assert [c["name"] for c in codecs] == ["bytes", "zstd", "crc32c"]
    assert FeatureStore(path).integrity_problems() == []


def test_a_missing_chunk_is_an_error_naming_store_layer_and_rows_never_fill_values(complete):
    path, values = complete
    chunk(path, 0, 1).unlink()
    opened = FeatureStore.open(path, "f1")
    for read in (
        lambda: opened.read(0),
        lambda: opened.read(0, np.array([40, 17])),
        lambda: opened.layer(0)[10:20],
        lambda: opened.layer(0).oindex[np.array([16]), :],
        lambda: np.asarray(opened.layer(0)),
    ):
        with pytest.raises(core.MissingChunkError, match="layers/0/c/1/0 is missing") as error:
            read()
        assert names(str(error.value), path, 0, "rows 16-31")
        assert error.value.rows == range(16, 32)
    # other chunks and the other layer still read, exactly
    np.testing.assert_array_equal(opened.read(0, np.array([3, 40])), values[0][[3, 40]])
    np.testing.assert_array_equal(opened.read(1), values[1])


@pytest.mark.parametrize("damage", ["truncate", "flip a bit", "empty"])
def test_a_corrupt_chunk_is_an_error_naming_store_layer_and_rows(complete, damage):
    path, _ = complete
    target = chunk(path, 1, 2)
    data = bytearray(target.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip a bit":
        data[len(data) // 3] ^= 0x10
    else:
        data = bytearray()
    size = len(target.read_bytes())
    target.write_bytes(bytes(data))
    opened = FeatureStore.open(path)
    expected = (  # a size other than the recorded one is refused before decoding
        "cannot be decoded"
        if damage == "flip a bit"
        else rf"is {len(data)} bytes, {size} as written \(emptied or truncated\)"
    )
    with pytest.raises(core.CorruptChunkError, match=f"layers/1/c/2/0 {expected}") as error:
        opened.read(1)
    assert names(str(error.value), path, 1, "rows 32-47")
    with pytest.raises(core.CorruptChunkError):
        opened.read(1, np.array([33]))
    opened.read(1, np.array([0, 49]))  # chunks that are intact still read
    # the checksum is in the codec chain: xarray and dask readers refuse the chunk too
    with pytest.raises(Exception, match=r"checksum|[Dd]ecompress"):
        xr.open_zarr(path, group="layers")["1"].values  # noqa: B018


def test_nan_or_inf_in_a_store_is_an_error_naming_the_first_rows(complete):
    path, _ = complete
    raw = zarr.open_array(path / "layers" / "0", mode="r+")  # bypasses the writer's check
    block = raw[16:32]
    block[5, 2], block[9, 0] = np.nan, np.inf
    raw[16:32] = block
    opened = FeatureStore.open(path)
    with pytest.raises(core.NonFiniteValuesError, match="NaN or infinite") as error:
        opened.read(0)
    text = str(error.value)
    assert names(text, path, 0, "rows 21, 25") and "sample ids id-21, id-25" in text
    with pytest.raises(core.NonFiniteValuesError):
        opened.layer(0).oindex[np.array([21]), :]
    opened.read(0, np.array([0, 16, 40]))  # finite rows of the same chunk read


def test_the_writer_refuses_nan_naming_encoder_layer_and_sample_ids(tmp_path):
    path = tmp_path / "toy.zarr"
    values = features()
    values[1][19, 4] = np.nan
    with pytest.raises(core.NonFiniteValuesError) as error:
        write_store(path, values)
    text = str(error.value)
    assert "encoder 'toy'" in text and "layer 1 (block.1)" in text and "id-19" in text
    flags = zarr.open_array(path / "block_complete")[:]
    assert flags.tolist() == [True, False, False, False]  # block 1 neither written nor flagged
    assert not chunk(path, 0, 1).exists() and not core.marker_path(path).exists()


def test_an_all_zero_block_is_written_and_verifies_also_when_resumed(tmp_path):
    path = tmp_path / "toy.zarr"
    values = [np.zeros((N, d), np.float32) for d in DIMS]
    writer = write_store(path, values, finalize=False)
    writer.flags[3] = False  # as if killed before the last block: resume writes it
    resumed = FeatureWriter.create_or_resume(
        path,
        fingerprint="f1",
        sample_ids=[f"id-{i}" for i in range(N)],
        layer_names=["block.0", "block.1"],
        dims=DIMS,
        attrs={},
        chunk_bytes=8 * 4 * 16,
    )
    assert [b for b, _, _ in resumed.pending_blocks()] == [3]
    resumed.write_block(3, [v[48:] for v in values])
    resumed.finalize()
    assert all(chunk(path, layer, block).is_file() for layer in (0, 1) for block in range(4))
    opened = FeatureStore.open(path)
    assert not opened.read(0).any() and opened.integrity_problems() == []


def test_layer_reads_like_a_zarr_array(complete):
    path, values = complete
    layer = FeatureStore.open(path).layer(1)
    assert layer.shape == (N, 12) and layer.chunks == (16, 12) and len(layer) == N
    assert layer.dtype == np.float32 and layer.ndim == 2
    np.testing.assert_array_equal(layer[3], values[1][3])
    np.testing.assert_array_equal(layer[-1, 2:5], values[1][-1, 2:5])
    np.testing.assert_array_equal(layer[2:40:7], values[1][2:40:7])
    np.testing.assert_array_equal(layer.oindex[np.array([2, 35]), :], values[1][[2, 35]])
    mask = np.zeros(N, bool)
    mask[[1, 48]] = True
    np.testing.assert_array_equal(layer.oindex[mask, :], values[1][mask])
    np.testing.assert_array_equal(layer.vindex[[4, 20], [0, 1]], values[1][[4, 20], [0, 1]])
    np.testing.assert_array_equal(np.asarray(layer), values[1])
    with pytest.raises(IndexError):
        layer.oindex[np.array([N]), :]  # out of range stays Zarr's IndexError


def test_the_similarity_stages_row_source_is_verified_too(complete):
    from pipeline.similarity.compute import StoreRows, open_layers

    path, values = complete
    rows = np.array([1, 5, 20, 40, 49])
    layers, _ = open_layers(path, rows)
    np.testing.assert_array_equal(layers[1][0:5], values[1][rows])
    chunk(path, 0, 2).unlink()
    source = StoreRows(FeatureStore.open(path).layer(0), rows)
    np.testing.assert_array_equal(source[0:2], values[0][rows[:2]])
    with pytest.raises(core.MissingChunkError, match="rows 32-47"):
        source[0:5]


def test_finalize_reads_back_and_unflags_damaged_blocks_so_a_rerun_rewrites_them(tmp_path):
    path = tmp_path / "toy.zarr"
    values = features()
    writer = write_store(path, values, finalize=False)
    chunk(path, 0, 2).write_bytes(b"garbage")
    with pytest.raises(core.StoreIntegrityError, match=r"blocks \[2\]"):
        writer.finalize()
    assert not core.marker_path(path).exists()
    write_store(path, values)  # the next run resumes and rewrites block 2 only
    np.testing.assert_array_equal(FeatureStore.open(path).read(0), values[0])


def test_open_store_refuses_a_marker_of_another_store(complete):
    path, _ = complete
    marker = core.marker_path(path)
    marker.write_text(json.dumps({"fingerprint": "other"}))
    with pytest.raises(core.StoreIntegrityError, match="disagree on the fingerprint"):
        FeatureStore.open(path)


# ---------------------------------------------------------------- pipeline.verify


@pytest.fixture
def results(tmp_path):
    """A results folder with one feature store and one aligner run fitted on it."""
    results = tmp_path / "results"
    path = results / "features" / "tiny" / "train" / "vit.zarr"
    values = features()
    write_store(path, values)
    rng = np.random.default_rng(1)
    meta = {"feature_fingerprints": {"vision_train": "f1", "text_train": "f1"}}
    out = results / "aligners" / "vit" / "minilm" / "procrustes" / "last"
    x, y = values[0], values[0] @ rng.standard_normal((8, 6))
    [run] = fit_runs("procrustes", {}, (x, y, None, None), grid_runs([20], [1], len(x)), out, meta)
    (out / "runs.json").write_text(json.dumps({"runs": [run.name]}))
    return results, path, run


def test_verify_finds_nothing_in_intact_results(results):
    results_dir, _, _ = results
    assert verify.verify_results(results_dir) == []
    report = io.StringIO()
    assert verify.print_report([], report) == 0 and "no problems" in report.getvalue()


def drop_fingerprint(path):
    metadata = json.loads((path / "zarr.json").read_text())
    del metadata["attributes"]["fingerprint"]
    (path / "zarr.json").write_text(json.dumps(metadata))


STORE_DAMAGE = {
    "missing chunk": (lambda p: chunk(p, 1, 3).unlink(), "layers/1/c/3/0 is missing"),
    "truncated chunk": (
        lambda p: chunk(p, 0, 0).write_bytes(chunk(p, 0, 0).read_bytes()[:50]),
        "layers/0/c/0/0 is 50 bytes",
    ),
    "nan values": (
        lambda p: zarr.open_array(p / "layers" / "1", mode="r+").__setitem__((7, 3), np.nan),
        "NaN or infinite values in rows 7",
    ),
    "marker removed": (
        lambda p: core.marker_path(p).unlink(),
        "no completion marker vit.zarr.done though the store was finished",
    ),
    "no fingerprint": (drop_fingerprint, "no fingerprint attribute"),
    "missing sample ids": (lambda p: (p / "sample_id" / "c" / "0").unlink(), "sample_id"),
}


@pytest.mark.parametrize("damage", STORE_DAMAGE)
def test_verify_names_each_kind_of_store_damage_with_its_repair(results, damage):
    results_dir, path, _ = results
    apply, expected = STORE_DAMAGE[damage]
    apply(path)
    problems = verify.verify_results(results_dir)
    mine = [p for p in problems if p.where == str(path) and expected in p.what]
    assert mine, problems
    assert mine[0].repair.endswith("--force results/features/tiny/train/vit.zarr.done")
    report = io.StringIO()
    assert verify.print_report(problems, report) == 1
    assert expected in report.getvalue() and mine[0].repair in report.getvalue()


def test_repairs_name_the_config_the_results_were_made_with(results):
    """Under any config but the default, a repair without it would build another workflow."""
    results_dir, path, _ = results
    chunk(path, 1, 3).unlink()
    [problem] = verify.verify_results(results_dir, [Path("workflow/configs/structure.yaml")])
    assert problem.repair == (
        f"{verify.SNAKEMAKE} --configfile workflow/configs/structure.yaml --force "
        "results/features/tiny/train/vit.zarr.done"
    )


def test_verify_names_a_job_made_with_another_spec(tmp_path):
    """A config edit that no Snakemake run has acted on yet: the job's outputs were made with
    another spec than the one its rule last asked for."""
    results_dir = tmp_path / "results"
    record = results_dir / "specs" / "fit_aligners" / "vit" / "minilm" / "asif" / "best.json"
    provenance.request(record, {"params": {"k": 16}})
    provenance.record_made(record, {"params": {"k": 16}})
    assert verify.verify_results(results_dir) == []
    provenance.request(record, {"params": {"k": 3}})
    [problem] = verify.verify_results(results_dir)
    assert "stale" in problem.what
    assert problem.where == "specs/fit_aligners/vit/minilm/asif/best.json"
    assert problem.repair == verify.SNAKEMAKE


def test_verify_reports_an_unfinished_store_as_resumable(tmp_path):
    results_dir = tmp_path / "results"
    path = results_dir / "features" / "tiny" / "val" / "vit.zarr"
    writer = write_store(path, finalize=False)
    assert writer is not None
    [problem] = verify.verify_results(results_dir)
    assert "unfinished" in problem.what and "--force" not in problem.repair
    assert problem.repair.endswith(" results/features/tiny/val/vit.zarr.done")


def corrupt_weights(run):
    (run / "weights.safetensors").write_bytes((run / "weights.safetensors").read_bytes()[:40])


def resealed(damage):
    """``damage``, then the run's record rewritten to match its files: what the record alone
    cannot tell (a run written so, or the record rewritten too) is still found."""

    def apply(run):
        damage(run)
        done = json.loads((run / "done.json").read_text())
        for name in done["files"]:
            done["files"][name] = hashlib.sha256((run / name).read_bytes()).hexdigest()
        (run / "done.json").write_text(json.dumps(done))

    return apply


def edit_params(old, new):
    return lambda run: (run / "params.json").write_text(
        (run / "params.json").read_text().replace(old, new)
    )


RUN_DAMAGE = {
    "no done.json": (lambda run: (run / "done.json").unlink(), "unfinished run"),
    "corrupt weights": (corrupt_weights, "weights.safetensors of run"),
    "corrupt weights, record rewritten": (
        resealed(corrupt_weights),
        "weights.safetensors cannot be loaded",
    ),
    "bad fingerprint": (
        lambda run: (run / "done.json").write_text(json.dumps({"aligner": "procrustes"})),
        "no valid fingerprint",
    ),
    "edited params": (
        edit_params('"n_pairs": 20', '"n_pairs": 30'),
        "params.json of run",  # ... does not match its record
    ),
    "other run's params": (
        resealed(edit_params('"n_pairs": 20', '"n_pairs": 30')),
        "params.json is of n_pairs 30",
    ),
    "stale features": (
        resealed(edit_params('"vision_train": "f1"', '"vision_train": "f0"')),
        "no longer in results/features (vision_train)",
    ),
    "curve missing": (lambda run: (run / "curve.parquet").unlink(), "curve.parquet of run"),
    "curve unreadable": (
        resealed(lambda run: (run / "curve.parquet").write_bytes(b"PAR1")),
        "curve.parquet cannot be read",
    ),
}


@pytest.mark.parametrize("damage", RUN_DAMAGE)
def test_verify_names_each_kind_of_run_damage_with_its_repair(results, damage):
    results_dir, _, run = results
    apply, expected = RUN_DAMAGE[damage]
    apply(run)
    [problem] = verify.verify_results(results_dir)
    assert problem.where == str(run) and expected in problem.what
    prefix = "results/aligners/vit/minilm/procrustes/last"
    assert problem.repair.startswith("snakemake")
    assert problem.repair.endswith(f"--forcerun {prefix}/runs.json")
