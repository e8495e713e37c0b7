"""Metrics and summary tables (schema, sorting, aggregation) and the plots drawn from them."""

from __future__ import annotations

import math
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline.evaluate import plots
from pipeline.evaluate.plots import (
    layer_pair_points,
    plot_all,
    plot_metric_vs_pairs,
    plot_relative_improvement,
    plot_similarity_vs_metric,
    spearman_rho,
)
from pipeline.evaluate.tables import (
    METRICS_SCHEMA,
    SUMMARY_SCHEMA,
    SWEEP_RHO_SCHEMA,
    SWEEP_SCHEMA,
    RunKey,
    concat_metrics,
    metric_rows,
    read_metrics,
    read_summary,
    summarise,
    sweep_with_similarity,
    write_metrics,
    write_summary,
    write_sweep,
    write_sweep_rho,
)
from pipeline.stages.aggregate import sweep_plots, sweep_rho

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(method: str = "linear", choice: str = "last", n_pairs: int = 100, seed: int = 1, **kw):
    fields = dict(vision_encoder="vit", text_encoder="minilm", vision_layer=11, text_layer=6)
    fields |= kw
    return RunKey(method=method, layer_choice=choice, n_pairs=n_pairs, seed=seed, **fields)


def cls_rows(run_key: RunKey, top1: float) -> pl.DataFrame:
    return metric_rows(run_key, "shapes", "classification", {"top1": top1})


@pytest.fixture
def metrics() -> pl.DataFrame:
    """Two methods x two n_pairs x three seeds, classification and retrieval."""
    frames = []
    for method, choice, offset in [("linear", "last", 0.0), ("structure", "best", 0.1)]:
        for n_pairs in (100, 1000):
            for seed, noise in zip((1, 42, 55), (-0.05, 0.0, 0.05), strict=True):
                key = run(method, choice, n_pairs, seed)
                base = 0.3 + offset + (0.2 if n_pairs == 1000 else 0.0) + noise
                frames.append(cls_rows(key, base))
                frames.append(metric_rows(key, "captions", "retrieval", {"i2t_recall@1": base / 2}))
    return concat_metrics(frames)


# ---------------------------------------------------------------- metrics table


def test_metric_rows_have_the_schema_columns_and_types() -> None:
    rows = metric_rows(run(), "shapes", "classification", {"top1": 0.5, "top5": 0.75})
    assert rows.columns == METRICS_SCHEMA.names
    assert rows.schema["n_pairs"] == pl.Int64 and rows.schema["value"] == pl.Float64
    assert rows.select("metric", "value").rows() == [("top1", 0.5), ("top5", 0.75)]
    assert rows["vision_layer"].to_list() == [11, 11]


@pytest.mark.parametrize(
    ("frame_change", "message"),
    [
        (lambda f: f.with_columns(pl.col("seed").cast(pl.Int32)), "'seed' has type Int32"),
        (lambda f: f.with_columns(pl.col("n_pairs").cast(pl.String)), "'n_pairs' has type String"),
        (lambda f: f.with_columns(pl.col("value").cast(pl.Float32)), "'value' has type Float32"),
        (lambda f: f.drop("task_kind"), r"missing \['task_kind'\]"),
        (lambda f: f.with_columns(extra=pl.lit(1)), r"extra \['extra'\]"),
        (lambda f: f.with_columns(task_kind=pl.lit("ranking")), "task_kind \\['ranking'\\]"),
        (lambda f: f.with_columns(value=pl.lit(float("nan"))), "'value' has NaN"),
        (lambda f: f.with_columns(task=pl.lit(None, pl.String)), "'task' has 1 nulls"),
    ],
)
def test_concat_metrics_rejects_bad_columns(frame_change, message: str) -> None:
    good = cls_rows(run(), 0.5)
    with pytest.raises(ValueError, match=message):
        concat_metrics([good, frame_change(good)])


def test_metric_rows_reject_a_wrongly_typed_run_field() -> None:
    with pytest.raises(ValueError, match="'n_pairs' has type String, expected Int64"):
        cls_rows(run(n_pairs="1000"), 0.5)


def test_concat_metrics_rejects_duplicate_keys() -> None:
    with pytest.raises(ValueError, match="duplicate rows"):
        concat_metrics([cls_rows(run(), 0.5), cls_rows(run(), 0.6)])


def test_concat_metrics_sorts_deterministically(metrics: pl.DataFrame) -> None:
    frames = [metrics.slice(i, 1) for i in range(len(metrics))]
    order = np.random.default_rng(0).permutation(len(frames))
    shuffled = concat_metrics([frames[i] for i in order])
    assert shuffled.equals(metrics)
    assert metrics.equals(metrics.sort(METRICS_SCHEMA.names[:-1]))
    assert metrics["n_pairs"].to_list()[:2] == [100, 100]


# ---------------------------------------------------------------- summary


def test_summary_means_stds_counts_against_manual_numbers() -> None:
    values = [0.2, 0.4, 0.9]
    frames = [cls_rows(run(seed=s), v) for s, v in zip((1, 42, 55), values, strict=True)]
    frames.append(cls_rows(run("csa", "best", seed=1), 0.7))
    summary = summarise(concat_metrics(frames))
    assert summary.columns == SUMMARY_SCHEMA.names
    linear = summary.filter(pl.col("method") == "linear").row(0, named=True)
    assert linear["mean"] == pytest.approx(0.5)
    assert linear["std"] == pytest.approx(math.sqrt((0.3**2 + 0.1**2 + 0.4**2) / 2))
    assert linear["count"] == 3
    assert linear["relative_improvement"] == 0.0
    csa = summary.filter(pl.col("method") == "csa").row(0, named=True)
    assert csa["count"] == 1 and csa["std"] is None  # one seed: no sample std
    assert csa["relative_improvement"] == pytest.approx((0.7 - 0.5) / 0.5)


def test_relative_improvement_needs_a_nonzero_baseline_at_the_same_key() -> None:
    frames = [
        cls_rows(run(n_pairs=100), 0.4),
        cls_rows(run("mlp", "last", n_pairs=100), 0.5),
        cls_rows(run("mlp", "last", n_pairs=1000), 0.6),  # no baseline at n_pairs=1000
        cls_rows(run(text_encoder="bert"), 0.0),  # baseline of another pair is zero
        cls_rows(run("mlp", "last", text_encoder="bert"), 0.3),
    ]
    summary = summarise(concat_metrics(frames)).filter(pl.col("method") == "mlp")
    improvement = {
        (row["text_encoder"], row["n_pairs"]): row["relative_improvement"]
        for row in summary.iter_rows(named=True)
    }
    assert improvement == {
        ("bert", 100): None,
        ("minilm", 100): pytest.approx(0.25),
        ("minilm", 1000): None,
    }


def test_summary_of_fixture(metrics: pl.DataFrame) -> None:
    summary = summarise(metrics)
    assert len(summary) == 2 * 2 * 2
    structure = summary.filter(
        (pl.col("method") == "structure")
        & (pl.col("task") == "shapes")
        & (pl.col("n_pairs") == 100)
    ).row(0, named=True)
    assert structure["mean"] == pytest.approx(0.4)
    assert structure["std"] == pytest.approx(0.05)
    assert structure["relative_improvement"] == pytest.approx(0.1 / 0.3)
    assert summary.equals(summarise(metrics.reverse()))


def test_summary_rejects_two_rows_for_one_seed_in_a_group() -> None:
    frames = [cls_rows(run("linear", "grid", vision_layer=v), 0.5) for v in (3, 4)]
    with pytest.raises(ValueError, match="several rows for one seed"):
        summarise(concat_metrics(frames))


def test_tables_round_trip_through_polars_pyarrow_and_duckdb(
    metrics: pl.DataFrame, tmp_path: Path
) -> None:
    metrics_path, summary_path = tmp_path / "metrics.parquet", tmp_path / "summary.parquet"
    write_metrics(metrics, metrics_path)
    summary = summarise(metrics)
    write_summary(summary, summary_path)

    assert read_metrics(metrics_path).equals(metrics)
    assert read_summary(summary_path).equals(summary)
    assert pq.read_schema(metrics_path).equals(METRICS_SCHEMA)
    assert pq.read_schema(summary_path).equals(SUMMARY_SCHEMA)
    assert pq.read_table(metrics_path).num_rows == len(metrics)

    grouped = duckdb.sql(
        f"""SELECT method, n_pairs, task, metric, avg(value), stddev_samp(value), count(*)
            FROM read_parquet('{metrics_path}')
            GROUP BY ALL ORDER BY ALL"""
    ).fetchall()
    expected = summary.sort("method", "n_pairs", "task", "metric")
    assert [row[:4] for row in grouped] == expected.select(
        "method", "n_pairs", "task", "metric"
    ).rows()
    np.testing.assert_allclose(
        [row[4:] for row in grouped], expected.select("mean", "std", "count")
    )
    assert duckdb.sql(f"SELECT count(*) FROM '{summary_path}'").fetchall() == [(len(summary),)]


def test_writers_reject_invalid_tables(metrics: pl.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'seed' has type Float64"):
        write_metrics(metrics.with_columns(pl.col("seed").cast(pl.Float64)), tmp_path / "m.pq")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- plots


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000


def test_plots_of_the_summary_are_png_files(metrics: pl.DataFrame, tmp_path: Path) -> None:
    summary = summarise(metrics)
    curve = plot_metric_vs_pairs(summary, "shapes", "top1", tmp_path / "curve.png")
    bars = plot_relative_improvement(summary, "shapes", "top1", tmp_path / "bars.png")
    assert curve == tmp_path / "curve.png" and bars == tmp_path / "bars.png"
    assert_png(curve)
    assert_png(bars)


def test_plot_all_writes_every_task_and_metric(metrics: pl.DataFrame, tmp_path: Path) -> None:
    two_pairs = pl.concat([metrics, metrics.with_columns(text_encoder=pl.lit("bert"))])
    paths = plot_all(summarise(two_pairs), tmp_path / "plots")
    assert sorted(p.name for p in paths) == [
        "captions__i2t_recall_1__improvement.png",
        "captions__i2t_recall_1__vs_n_pairs.png",
        "shapes__top1__improvement.png",
        "shapes__top1__vs_n_pairs.png",
    ]
    for path in paths:
        assert_png(path)


def test_plots_name_a_missing_task(metrics: pl.DataFrame, tmp_path: Path) -> None:
    summary = summarise(metrics)
    with pytest.raises(ValueError, match="no rows for task 'birds'"):
        plot_metric_vs_pairs(summary, "birds", "top1", tmp_path / "x.png")
    baseline_only = summary.filter(pl.col("method") == "linear")
    with pytest.raises(ValueError, match="no method other than the baseline"):
        plot_relative_improvement(baseline_only, "shapes", "top1", tmp_path / "x.png")


SIMILARITY_COLUMNS = [
    "vision_encoder",
    "text_encoder",
    "vision_layer",
    "text_layer",
    "metric",
    "value",
    "n_samples",
    "sample_seed",
    "pool_size",
]


def layer_sweep() -> tuple[pl.DataFrame, pl.DataFrame]:
    """Similarity and metrics on a 3 x 2 layer grid; the metric grows with CKA."""
    sim_rows, frames = [], []
    for v in (2, 5, 8):
        for t in (3, 6):
            cka = 0.1 * v + 0.01 * t
            # the full pool counts (mean over its seeds: cka + 0.01), not the pool of 50 nor
            # the pool of 1000 whose minibatch score has the full pool's n_samples
            for n_samples, sample_seed, pool, shift in [
                (500, 0, 2000, 0.0),
                (500, 1, 2000, 0.02),
                (500, 0, 1000, 0.5),
                (50, 0, 50, -1.0),
            ]:
                sim_rows.append(
                    ("vit", "minilm", v, t, "cka", cka + shift, n_samples, sample_seed, pool)
                )
            sim_rows.append(("vit", "minilm", v, t, "mutual_knn", -cka, 500, 0, 2000))
            for seed in (1, 2):
                key = run("linear", f"v{v}_t{t}", vision_layer=v, text_layer=t, seed=seed)
                frames.append(cls_rows(key, cka**2 + 0.001 * seed))
    return pl.DataFrame(sim_rows, schema=SIMILARITY_COLUMNS, orient="row"), concat_metrics(frames)


def test_layer_pair_points_average_seeds_at_the_largest_sample() -> None:
    similarity, metrics = layer_sweep()
    points = layer_pair_points(similarity, metrics, "cka", "shapes", "top1")
    assert points.select("vision_layer", "text_layer").rows() == [
        (v, t) for v in (2, 5, 8) for t in (3, 6)
    ]
    cka = np.array([0.1 * v + 0.01 * t for v in (2, 5, 8) for t in (3, 6)])
    np.testing.assert_allclose(points["similarity"], cka + 0.01)
    np.testing.assert_allclose(points["value"], cka**2 + 0.0015)
    assert points.select("method", "n_pairs").unique().rows() == [("linear", 100)]
    assert spearman_rho(points["similarity"].to_numpy(), points["value"].to_numpy()) == 1.0
    knn = layer_pair_points(similarity, metrics, "mutual_knn", "shapes", "top1")
    assert spearman_rho(knn["similarity"].to_numpy(), knn["value"].to_numpy()) == -1.0


def test_similarity_plot(tmp_path: Path) -> None:
    similarity, metrics = layer_sweep()
    path = plot_similarity_vs_metric(
        similarity, metrics, "cka", "shapes", "top1", tmp_path / "s.png"
    )
    assert_png(path)
    two_methods = pl.concat([metrics, metrics.with_columns(method=pl.lit("mlp"))])
    with pytest.raises(ValueError, match="one encoder pair, method and n_pairs"):
        plot_similarity_vs_metric(similarity, two_methods, "cka", "shapes", "top1", path)
    with pytest.raises(ValueError, match=r"no 'svcca' rows for vit\+minilm"):
        plot_similarity_vs_metric(similarity, metrics, "svcca", "shapes", "top1", path)


def test_spearman_rho_known_values() -> None:
    x = np.array([0.1, 0.4, 0.2, 0.9])
    assert spearman_rho(x, x**3) == pytest.approx(1.0)
    assert spearman_rho(x, -x) == pytest.approx(-1.0)
    # ranks (1, 3, 2, 4) vs (2, 1, 4, 3): 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 10 / 60
    assert spearman_rho(x, np.array([2.0, 1.0, 4.0, 3.0])) == pytest.approx(0.0)
    assert math.isnan(spearman_rho(x, np.ones(4)))


def planted_sweep() -> tuple[pl.DataFrame, pl.DataFrame]:
    """A 3 x 3 layer sweep whose top-1 grows with CKA (and falls with the kNN score), and whose
    top-5 is constant; CKA has a second, smaller sample that must not count."""
    sim_rows, frames = [], []
    for v in (0, 3, 6):
        for t in (0, 2, 4):
            cka = 0.05 * v + 0.01 * t
            sim_rows.append(("vit", "minilm", v, t, "cka", cka, 500, 0, 500))
            sim_rows.append(("vit", "minilm", v, t, "cka", 1.0 - cka, 50, 0, 50))
            sim_rows.append(("vit", "minilm", v, t, "mutual_knn", -(cka**3), 500, 0, 500))
            key = run("ridge", "sweep", n_pairs=1000, seed=0, vision_layer=v, text_layer=t)
            frames.append(
                metric_rows(key, "shapes", "classification", {"top1": 0.2 + cka, "top5": 0.9})
            )
    similarity = pl.DataFrame(sim_rows, schema=SIMILARITY_COLUMNS, orient="row")
    return similarity, concat_metrics(frames)


def test_sweep_rho_is_one_where_similarity_and_accuracy_are_monotone(tmp_path: Path) -> None:
    similarity, sweep = planted_sweep()
    rho = sweep_rho(plots, similarity, sweep)
    assert rho.columns == SWEEP_RHO_SCHEMA.names
    by_key = {(r["similarity_metric"], r["metric"]): r for r in rho.iter_rows(named=True)}
    assert set(by_key) == {(s, m) for s in ("cka", "mutual_knn") for m in ("top1", "top5")}
    assert by_key["cka", "top1"]["rho"] == pytest.approx(1.0, abs=1e-12)
    assert by_key["mutual_knn", "top1"]["rho"] == pytest.approx(-1.0, abs=1e-12)
    assert by_key["cka", "top5"]["rho"] is None  # constant accuracy: rho undefined
    assert {r["layer_pairs"] for r in by_key.values()} == {9}
    assert rho.select("method", "n_pairs", "seed", "task_kind").unique().rows() == [
        ("ridge", 1000, 0, "classification")
    ]
    write_sweep_rho(rho, tmp_path / "rho.parquet")
    assert pq.read_schema(tmp_path / "rho.parquet").equals(SWEEP_RHO_SCHEMA)


def test_sweep_table_joins_each_rows_similarity_once_per_metric(tmp_path: Path) -> None:
    similarity, sweep = planted_sweep()
    table = sweep_with_similarity(sweep, similarity)
    assert table.columns == SWEEP_SCHEMA.names and len(table) == 2 * len(sweep)
    cka = table.filter((pl.col("similarity_metric") == "cka") & (pl.col("metric") == "top1"))
    np.testing.assert_allclose(cka["similarity"], cka["value"] - 0.2)  # the largest sample
    assert (
        table.drop("similarity_metric", "similarity")
        .unique()
        .sort(pl.all())
        .equals(sweep.sort(pl.all()))
    )
    write_sweep(table, tmp_path / "sweep.parquet")
    assert pq.read_schema(tmp_path / "sweep.parquet").equals(SWEEP_SCHEMA)
    missing = similarity.filter(~((pl.col("vision_layer") == 6) & (pl.col("text_layer") == 4)))
    with pytest.raises(ValueError, match=r"layer pair \(6, 4\) of the sweep has no 'cka'"):
        sweep_with_similarity(sweep, missing)


def test_sweep_plots_one_per_similarity_metric_task_and_metric(tmp_path: Path) -> None:
    similarity, sweep = planted_sweep()
    paths = sweep_plots(plots, similarity, sweep, tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in paths) == [
        f"layers/sweep__vit__minilm__shapes__{metric}__vs_{sim}.png"
        for metric in ("top1", "top5")
        for sim in ("cka", "mutual_knn")
    ]
    for path in paths:
        assert_png(path)
