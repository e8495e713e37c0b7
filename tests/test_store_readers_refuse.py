"""Nothing silently wrong (issue 22, findings 1 and 6): a deleted, emptied or truncated chunk
of a feature store or shard of a token store is refused by every project reader, naming the
file, the store and the layer, never read as fill values; direct (xarray, dask, zarr) readers
of a token store read NaN where a shard is gone, not plausible zeros; ``verify`` names each
case. A damaged table under ``results/tables`` is named by ``verify`` and by the check the
report runs before embedding it, with the command that writes it again."""

import os
import subprocess
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import polars as pl
import pytest
import xarray as xr
import zarr

from pipeline import layout, verify
from pipeline.evaluate import tables
from pipeline.similarity.compute import StoreRows
from pipeline.stores import core
from pipeline.stores import tokens as token_layout
from pipeline.stores.features import FeatureStore, FeatureWriter
from pipeline.stores.inputs import TokenSet
from pipeline.stores.tokens import StoreTokens, TokenStore, TokenWriter, plan_blocks

ROOT = Path(__file__).resolve().parent.parent
N, DIMS, DIM = 50, [8, 12], 4  # feature store: blocks of 16 rows; token store: width 4
REQUEST, CONTENT = "request-1", "content-1"


def damage(file: Path, how: str) -> int:
    """Damage ``file`` as ``how`` says; returns its size before."""
    size = file.stat().st_size
    if how == "deleted":
        file.unlink()
    else:
        file.write_bytes(b"" if how == "emptied" else file.read_bytes()[: size // 2])
    return size


def refusal(file: Path, how: str, size: int) -> tuple[type[core.StoreIntegrityError], str]:
    """The error and the text a reader must raise for ``file`` damaged as ``how``."""
    if how == "deleted":
        return core.MissingChunkError, f"{file} is missing"
    now = 0 if how == "emptied" else size // 2
    return (
        core.CorruptChunkError,
        f"{file} is {now} bytes, {size} as written (emptied or truncated)",
    )


HOW = ["emptied", "deleted", "truncated"]


# ---- feature stores -----------------------------------------------------------------------------


def write_features(path: Path) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    values = [rng.standard_normal((N, d)).astype(np.float32) for d in DIMS]
    writer = FeatureWriter.create_or_resume(
        path,
        fingerprint="f1",
        sample_ids=[f"id-{i}" for i in range(N)],
        layer_names=["block.0", "block.1"],
        dims=DIMS,
        attrs={"encoder": {"name": "toy"}},
        chunk_bytes=8 * 4 * 16,
    )
    for block, start, stop in writer.pending_blocks():
        writer.write_block(block, [v[start:stop] for v in values])
    writer.finalize()
    return values


@pytest.mark.parametrize("how", HOW)
def test_feature_store_readers_refuse_a_damaged_chunk_naming_the_file(tmp_path, how):
    path = tmp_path / "vit.zarr"
    values = write_features(path)
    file = path / "layers" / "1" / "c" / "2" / "0"  # layer 1, rows 32-47
    error, text = refusal(file, how, damage(file, how))
    store = FeatureStore.open(path)
    for read in (
        lambda: store.read(1),
        lambda: store.read(1, np.array([40, 3])),
        lambda: store.layer(1)[30:34],
        lambda: store.layer(1).oindex[np.array([33]), :],
        lambda: StoreRows(store.layer(1), np.array([0, 35]))[0:2],  # the similarity stage's
    ):
        with pytest.raises(error) as raised:
            read()
        message = str(raised.value)
        assert text in message and f"feature store {path}, layer 1 (block.1)" in message
        assert "rows 32-47" in message and raised.value.rows == range(32, 48)
    np.testing.assert_array_equal(store.read(1, np.array([0, 49])), values[1][[0, 49]])
    np.testing.assert_array_equal(store.read(0), values[0])  # the other layer is intact


# ---- token stores -------------------------------------------------------------------------------


def write_tokens(path: Path, n: int = 40) -> list[np.ndarray]:
    """A finished token store of ``n`` ragged rows in several blocks, as extract_tokens leaves
    it for a reading job that asks for ``REQUEST`` of dataset content ``CONTENT``."""
    rng = np.random.default_rng(1)
    values = [rng.standard_normal((c, DIM)).astype(np.float32) for c in rng.integers(1, 12, n)]
    writer = TokenWriter.create_or_resume(
        path,
        fingerprint="t1",
        sample_ids=[f"id-{i}" for i in range(n)],
        plan=plan_blocks([len(v) for v in values], DIM, 2, 2 * DIM * 40, fixed=False),
        dim=DIM,
        dtype="float16",
        attrs={
            "encoder": {"name": "toy"},
            "layer": 2,
            "layer_name": "layer.1",
            "request": REQUEST,
            "dataset": {"content_hash": CONTENT},
        },
    )
    for row in writer.pending_rows():
        writer.add(int(row), values[row])
    writer.finalize()
    marker = Path(layout.store_marker(str(path.parent)))  # the token set's marker
    marker.write_text(f'{{"layers": {{"2": "{writer.group.attrs["fingerprint"]}"}}}}')
    return [v.astype(np.float16).astype(np.float32) for v in values]


@pytest.fixture
def token_store(tmp_path):
    path = tmp_path / "vit" / "layer_2.zarr"
    path.parent.mkdir()
    values = write_tokens(path)
    store = TokenStore.open(path)
    assert store.n_blocks >= 4
    return path, values, range(int(store.block_rows[1]), int(store.block_rows[2]))


@pytest.mark.parametrize("how", HOW)
def test_token_store_readers_refuse_a_damaged_shard_naming_the_file(token_store, how, monkeypatch):
    """The repro of issue 22: an emptied shard of a full block read as zeros, and evaluation
    went on with changed rows; now every reading path (the evaluate and align stages' token
    set, PAL's token source, sparse and whole-block reads) refuses it by name."""
    path, values, rows = token_store
    shard = path / "tokens" / "c" / "1" / "0"
    error, text = refusal(shard, how, damage(shard, how))
    marker = path.parent.parent / "vit.done"

    def through_token_set():
        return TokenSet(marker, REQUEST, CONTENT).layer(2).read(np.array([rows.start]))

    reads = {
        "token set": through_token_set,
        "read": lambda: TokenStore.open(path).read(np.array([rows.stop - 1, 0])),
        "source": lambda: StoreTokens(TokenStore.open(path), np.array([0, rows.start]))[[1]],
        "flat": lambda: TokenStore.open(path).flat(np.array(list(rows))),
        "sparse": lambda: (
            monkeypatch.setattr(token_layout, "CACHE_BYTES", 0),
            TokenStore.open(path).read(np.array([rows.start])),
        ),
    }
    for name, read in reads.items():
        with pytest.raises(error) as raised:
            read()
        message = str(raised.value)
        assert text in message, (name, message)
        assert f"token store {path} (layer 2), rows {rows.start}-{rows.stop - 1}" in message
        assert f"snakemake --force {marker}" in message  # the repair: its token set's job
    monkeypatch.undo()
    intact = TokenStore.open(path)
    batch, mask = intact.read(np.array([0, rows.stop]))  # rows of other blocks still read
    np.testing.assert_array_equal(batch[0][mask[0]], values[0])
    np.testing.assert_array_equal(batch[1][mask[1]], values[rows.stop])


@pytest.mark.parametrize("how", ["emptied", "deleted"])
def test_direct_readers_of_a_token_store_read_nan_where_a_shard_is_gone(token_store, how):
    """Zarr reads an absent or empty shard as the fill value: NaN, not plausible zeros."""
    path, values, rows = token_store
    damage(path / "tokens" / "c" / "1" / "0", how)
    store = TokenStore.open(path)
    start, count = int(store.token_start[rows.start]), int(store.token_count[rows.start])
    lost = slice(start, start + count)
    for direct in (
        xr.open_zarr(path).tokens[lost].values,
        da.from_zarr(str(path), component="tokens")[lost].compute(),
        zarr.open_group(path, mode="r")["tokens"][lost],
    ):
        assert np.isnan(direct).all()
    kept = xr.open_zarr(path).tokens[: len(values[0])].values  # block 0 is intact
    np.testing.assert_array_equal(kept, values[0])


def test_a_token_store_written_with_zeros_keeps_them(tmp_path):
    """Zero tokens are data, stored as such (the fill is NaN): an all-zero block is written,
    recorded and read back as zeros."""
    path = tmp_path / "layer_0.zarr"
    plan = plan_blocks([3, 3], DIM, 2, 2 * DIM * 3, fixed=True)
    writer = TokenWriter.create_or_resume(
        path,
        fingerprint="z",
        sample_ids=["a", "b"],
        plan=plan,
        dim=DIM,
        dtype="float16",
        attrs={"encoder": {}, "layer": 0},
    )
    writer.add(0, np.zeros((3, DIM), np.float32))
    writer.add(1, np.ones((3, DIM), np.float32))
    writer.finalize()
    store = TokenStore.open(path)
    assert store.integrity_problems() == []
    tokens, _ = store.read(np.array([0, 1]))
    assert not tokens[0].any() and (tokens[1] == 1).all()


# ---- verify -------------------------------------------------------------------------------------


@pytest.fixture
def results(tmp_path):
    """A results folder with a feature store and a token set (one layer)."""
    results = tmp_path / "results"
    features = results / "features" / "tiny" / "test" / "vit.zarr"
    write_features(features)
    tokens = results / "tokens" / "tiny" / "test" / "vit" / "layer_2.zarr"
    tokens.parent.mkdir(parents=True)
    write_tokens(tokens)
    assert verify.verify_results(results) == []
    return results, features, tokens


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("kind", ["feature chunk", "token shard"])
def test_verify_names_each_damaged_chunk_or_shard_and_its_repair(results, kind, how):
    results_dir, features, tokens = results
    if kind == "feature chunk":
        store, file = features, features / "layers" / "0" / "c" / "1" / "0"
        job = "results/features/tiny/test/vit.zarr.done"
    else:
        store, file = tokens, tokens / "tokens" / "c" / "2" / "0"
        job = "results/tokens/tiny/test/vit.done"
    _, text = refusal(file, how, damage(file, how))
    [problem] = verify.verify_results(results_dir)
    assert problem.where == str(store) and text in problem.what
    assert problem.repair == f"{verify.SNAKEMAKE} --force {job}"


def test_verify_names_a_block_whose_size_record_is_lost(results):
    """Without its record a block's files cannot be checked: that is damage too."""
    results_dir, _, tokens = results
    (tokens / "block_bytes" / "c" / "1" / "0").unlink()
    [problem] = verify.verify_results(results_dir)
    assert f"shard {tokens / 'tokens' / 'c' / '1' / '0'} has no recorded size" in problem.what
    (tokens / "block_bytes" / "c" / "2" / "0").write_bytes(b"")
    assert "the size record block_bytes/c/2/0 cannot be read" in str(
        verify.verify_results(results_dir)
    )


# ---- tables -------------------------------------------------------------------------------------


def publish_tables(results_dir: Path) -> None:
    """``write_tables`` as a finished aggregate leaves them: staged, and published."""
    write_tables(results_dir / "staging" / "tables")
    (results_dir / "staging" / "plots").mkdir()
    write_tables(results_dir / "tables")


def write_tables(folder: Path) -> None:
    """The aggregate's metrics, summary and comparisons tables of two seeds of two methods."""
    rows = []
    for method in ("linear", "csa"):
        for seed in (0, 1):
            run = tables.RunKey("vit", "minilm", method, "last", 2, 3, 24, seed)
            scores = {"top1": 0.5 + 0.1 * seed, "top5": 0.9 - 0.05 * seed}
            rows.append(tables.metric_rows(run, "tiny.shapes", "classification", scores))
    metrics = tables.concat_metrics(rows)
    folder.mkdir(parents=True, exist_ok=True)
    tables.write_metrics(metrics, folder / "metrics.parquet")
    tables.write_summary(tables.summarise(metrics), folder / "summary.parquet")
    tables.write_comparisons(tables.compare(metrics, {}), folder / "comparisons.parquet")


TABLE_DAMAGE = {
    "truncated": (
        lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
        "cannot be read",
    ),
    "emptied": (lambda f: f.write_bytes(b""), "cannot be read"),
    "a NaN value": (
        lambda f: pl.read_parquet(f).with_columns(value=pl.lit(float("nan"))).write_parquet(f),
        "does not hold its schema (column 'value' has NaN",
    ),
}


TABLE_CASES = [
    *[(table, how) for table in ("metrics", "summary", "comparisons") for how in HOW[::2]],
    ("metrics", "a NaN value"),  # only the metrics table has a value column
]


@pytest.mark.parametrize(("damaged", "how"), TABLE_CASES)
def test_verify_names_a_damaged_table_and_its_repair(tmp_path, damaged, how):
    results_dir = tmp_path / "results"
    publish_tables(results_dir)
    assert verify.verify_results(results_dir) == []
    apply, expected = TABLE_DAMAGE[how]
    table = results_dir / "tables" / f"{damaged}.parquet"
    apply(table)
    for check in (verify.verify_results, verify.verify_tables):
        [problem] = check(results_dir)
        assert problem.where == str(table) and f"table {damaged}.parquet {expected}" in problem.what
        assert problem.repair == f"{verify.SNAKEMAKE} --forcerun aggregate"


def test_the_report_check_refuses_a_truncated_table_by_name(tmp_path):
    """``python -m pipeline verify --tables``: what the ``report`` rule and the Makefile run
    before ``snakemake --report`` embeds the tables."""
    results_dir = tmp_path / "results"
    publish_tables(results_dir)
    command = [sys.executable, "-m", "pipeline", "verify", "--tables", "--results", results_dir]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert subprocess.run(command, env=env, capture_output=True).returncode == 0
    metrics = results_dir / "tables" / "metrics.parquet"
    metrics.write_bytes(metrics.read_bytes()[:-100])
    checked = subprocess.run(
        [*command, "--configfile", "workflow/configs/structure.yaml"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 1
    assert (
        f"PROBLEM {metrics}" in checked.stdout
        and "metrics.parquet cannot be read" in checked.stdout
    )
    assert "--configfile workflow/configs/structure.yaml --forcerun aggregate" in checked.stdout
    # the report rule runs it, and the Makefile before rendering the report
    rules = (ROOT / "workflow" / "rules" / "evaluate.smk").read_text()
    assert "python -m pipeline verify --tables" in rules.split("rule report:")[1]
    recipe = (ROOT / "Makefile").read_text().split("results/report.html:")[1].split("\n\n")[0]
    assert recipe.index("python -m pipeline verify --tables") < recipe.index("--report $@")
