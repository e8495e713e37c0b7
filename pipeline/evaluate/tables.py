"""The run's metrics table, its summary over seeds and the paired comparisons (docs/formats.md).

``metrics.parquet`` holds one row per number, keyed by the run (encoder pair, method, layer
choice and the layers it chose, n_pairs, seed) and the task and metric. ``summary.parquet``
aggregates over seeds for each (encoder pair, method, layer choice, n_pairs, task, metric):
mean, sample standard deviation (ddof=1; null when only one seed), count of seeds, the
relative improvement (mean - baseline mean) / baseline mean over the ``linear``/``last``
baseline of the same encoder pair, n_pairs, task and metric (null when that baseline is
absent or its mean is zero; 0.5 means +50%), and the intervals of ``pipeline.evaluate.
intervals``: over seeds and over test images. Layers are not a summary key: a layer choice
such as ``best`` may pick different layers for different seeds.

The outcomes table (one per evaluate job) keeps the per-item hits of every bootstrappable
metric, from which the aggregate draws the test-image bootstrap. ``comparisons.parquet``
holds the paired difference per seed of a method over its baselines (``comparison_pairs``)
with both intervals.

The layer sweep's tables (``pipeline.stages.sweep_layers``): ``sweep.parquet`` repeats every
sweep row (a metrics row) once per similarity metric of its encoder pair, with that layer
pair's similarity;
``sweep_rho.parquet`` holds Spearman's rho between the two over the swept layer pairs.

Every table is written with an explicit pyarrow schema and read back validated.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from pipeline.atomic import write_parquet
from pipeline.evaluate.intervals import (
    Hits,
    Statistics,
    excludes_zero,
    percentile_interval,
    replicates,
    resample_counts,
    resample_draws,
    seed_interval,
)

TASK_KINDS = ("classification", "retrieval", "segmentation")
BASELINE = ("linear", "last")
ENCODER_PAIR = ["vision_encoder", "text_encoder"]
LAYER_PAIR = ["vision_layer", "text_layer"]
DEFAULT_STATISTICS = Statistics()

METRICS_SCHEMA = pa.schema(
    [
        pa.field(name, dtype, nullable=False)
        for name, dtype in [
            ("vision_encoder", pa.string()),
            ("text_encoder", pa.string()),
            ("method", pa.string()),
            ("layer_choice", pa.string()),
            ("vision_layer", pa.int64()),
            ("text_layer", pa.int64()),
            ("n_pairs", pa.int64()),
            ("seed", pa.int64()),
            ("task", pa.string()),
            ("task_kind", pa.string()),
            ("metric", pa.string()),
            ("value", pa.float64()),
        ]
    ]
)
METRICS_KEY = METRICS_SCHEMA.names[:-1]

SUMMARY_KEY = [
    "vision_encoder",
    "text_encoder",
    "method",
    "layer_choice",
    "n_pairs",
    "task",
    "task_kind",
    "metric",
]
# The settings and the two intervals (over seeds, over test images) of a summary or comparison.
INTERVAL_FIELDS = [
    pa.field("level", pa.float64(), nullable=False),
    pa.field("seed_ci_low", pa.float64()),
    pa.field("seed_ci_high", pa.float64()),
    pa.field("bootstrap", pa.int64(), nullable=False),
    pa.field("bootstrap_seed", pa.int64(), nullable=False),
    pa.field("item_ci_low", pa.float64()),
    pa.field("item_ci_high", pa.float64()),
]
SUMMARY_SCHEMA = pa.schema(
    [METRICS_SCHEMA.field(name) for name in SUMMARY_KEY]
    + [
        pa.field("mean", pa.float64(), nullable=False),
        pa.field("std", pa.float64()),
        pa.field("count", pa.int64(), nullable=False),
        pa.field("relative_improvement", pa.float64()),
        *INTERVAL_FIELDS,
    ]
)
REPLICATE_KEY = [*SUMMARY_KEY, "seed"]  # one run's task and metric (layers follow from the run)

OUTCOMES_SCHEMA = pa.schema(
    [METRICS_SCHEMA.field(name) for name in METRICS_KEY]
    + [
        pa.field("unit", pa.list_(pa.int64()), nullable=False),
        pa.field("stratum", pa.list_(pa.int64())),
        pa.field("hit", pa.list_(pa.bool_()), nullable=False),
    ]
)

COMPARISON_SERIES = ["method", "layer_choice", "baseline_method", "baseline_choice"]
COMPARISON_KEY = [*ENCODER_PAIR, *COMPARISON_SERIES, "n_pairs", "task", "task_kind", "metric"]
COMPARISONS_SCHEMA = pa.schema(
    [pa.field(name, pa.string(), nullable=False) for name in [*ENCODER_PAIR, *COMPARISON_SERIES]]
    + [METRICS_SCHEMA.field(name) for name in ("n_pairs", "task", "task_kind", "metric")]
    + [
        pa.field("seeds", pa.int64(), nullable=False),
        pa.field("mean", pa.float64(), nullable=False),
        pa.field("baseline_mean", pa.float64(), nullable=False),
        pa.field("difference", pa.float64(), nullable=False),
        pa.field("relative", pa.float64()),
        *INTERVAL_FIELDS,
        pa.field("seed_excludes_zero", pa.bool_()),
        pa.field("item_excludes_zero", pa.bool_()),
    ]
)

SWEEP_SCHEMA = METRICS_SCHEMA.append(
    pa.field("similarity_metric", pa.string(), nullable=False)
).append(pa.field("similarity", pa.float64(), nullable=False))
SWEEP_KEY = [*METRICS_KEY, "similarity_metric"]
SWEEP_RHO_KEY = [
    "vision_encoder",
    "text_encoder",
    "method",
    "n_pairs",
    "seed",
    "similarity_metric",
    "task",
    "task_kind",
    "metric",
]
SWEEP_RHO_SCHEMA = pa.schema(
    [SWEEP_SCHEMA.field(name) for name in SWEEP_RHO_KEY]
    + [pa.field("rho", pa.float64()), pa.field("layer_pairs", pa.int64(), nullable=False)]
)


@dataclass(frozen=True)
class RunKey:
    """What identifies one aligner run: one artifact, evaluated on every task."""

    vision_encoder: str
    text_encoder: str
    method: str
    layer_choice: str
    vision_layer: int
    text_layer: int
    n_pairs: int
    seed: int


def metric_rows(
    run: RunKey, task: str, task_kind: str, metrics: Mapping[str, float]
) -> pl.DataFrame:
    """Rows of the metrics table for one run on one task, one row per metric."""
    if not metrics:
        raise ValueError(f"no metrics given for task {task!r}")
    n = len(metrics)
    columns = {name: [value] * n for name, value in asdict(run).items()}
    columns |= {"task": [task] * n, "task_kind": [task_kind] * n}
    columns |= {"metric": list(metrics), "value": [float(v) for v in metrics.values()]}
    return validate(pl.DataFrame(columns), METRICS_SCHEMA)


def concat_metrics(frames: Iterable[pl.DataFrame]) -> pl.DataFrame:
    """One validated metrics table from many frames, sorted by every key column."""
    frames = [validate(frame, METRICS_SCHEMA) for frame in frames]
    if not frames:
        raise ValueError("no metrics frames to concatenate")
    metrics = pl.concat(frames).sort(METRICS_KEY)
    duplicated = metrics.filter(pl.struct(METRICS_KEY).is_duplicated())
    if len(duplicated):
        raise ValueError(f"metrics table has duplicate rows for one key, e.g. {duplicated.row(0)}")
    return metrics


def outcome_rows(
    run: RunKey, task: str, task_kind: str, outcomes: Mapping[str, Hits]
) -> pl.DataFrame:
    """Rows of the outcomes table for one run on one task, one row per bootstrappable metric."""
    rows = [
        asdict(run)
        | {
            "task": task,
            "task_kind": task_kind,
            "metric": metric,
            "unit": np.asarray(hits.unit, np.int64).tolist(),
            "stratum": None if hits.stratum is None else np.asarray(hits.stratum).tolist(),
            "hit": np.asarray(hits.hit, bool).tolist(),
        }
        for metric, hits in outcomes.items()
    ]
    return validate(pl.DataFrame(rows, schema=polars_schema(OUTCOMES_SCHEMA)), OUTCOMES_SCHEMA)


def concat_outcomes(frames: Iterable[pl.DataFrame]) -> pl.DataFrame:
    """One validated outcomes table from many frames (possibly none), sorted by its key."""
    frames = [validate(frame, OUTCOMES_SCHEMA) for frame in frames]
    empty = pl.DataFrame(schema=polars_schema(OUTCOMES_SCHEMA))
    outcomes = pl.concat([empty, *frames]).sort(METRICS_KEY)
    duplicated = outcomes.filter(pl.struct(METRICS_KEY).is_duplicated())
    if len(duplicated):
        raise ValueError(f"outcomes table has two rows for one key, e.g. {duplicated.row(0)[:-3]}")
    return outcomes


def hits_of(row: Mapping[str, object]) -> Hits:
    """The ``Hits`` of one outcomes row."""
    stratum = row["stratum"]
    return Hits(
        np.asarray(row["hit"], bool),
        np.asarray(row["unit"], np.int64),
        None if stratum is None else np.asarray(stratum, np.int64),
    )


Replicates = dict[tuple, np.ndarray]  # REPLICATE_KEY values -> the metric on each replicate


def bootstrap_replicates(
    outcomes: pl.DataFrame, metrics: pl.DataFrame, statistics: Statistics
) -> Replicates:
    """The metric of every outcomes row on each of ``statistics.bootstrap`` resamples of its
    task's test images: one draw per task, shared by every run (paired). Each row's metric
    must equal its value in ``metrics``."""
    outcomes = validate(outcomes, OUTCOMES_SCHEMA)
    values = {
        row[: len(METRICS_KEY)]: row[-1] for row in validate(metrics, METRICS_SCHEMA).iter_rows()
    }
    result: Replicates = {}
    if statistics.bootstrap == 0:
        return result
    for (task,), rows in outcomes.group_by(["task"], maintain_order=True):
        units, counts = None, None
        for row in rows.iter_rows(named=True):
            hits = hits_of(row)
            run = tuple(row[k] for k in METRICS_KEY)
            if run not in values:
                raise ValueError(f"outcomes row {run} has no row in the metrics table")
            if not np.isclose(hits.value(), values[run], rtol=0, atol=1e-9):
                raise ValueError(
                    f"outcomes of {run} give {hits.value()}, the metrics table {values[run]}"
                )
            if units is None:
                units = np.unique(hits.unit)
                draws = resample_draws(len(units), statistics.bootstrap, statistics.seed)
                counts = resample_counts(draws)
            elif not np.array_equal(np.unique(hits.unit), units):
                raise ValueError(f"{task}: the outcomes of {run} cover other test images")
            result[tuple(row[k] for k in REPLICATE_KEY)] = replicates(hits, units, counts)
    return result


def summarise(
    metrics: pl.DataFrame,
    replicates: Replicates | None = None,
    statistics: Statistics = DEFAULT_STATISTICS,
    baseline: tuple[str, str] = BASELINE,
) -> pl.DataFrame:
    """Mean, std (ddof=1), count over seeds, relative improvement over the baseline, and the
    intervals of the mean: over seeds and (where ``replicates`` holds every seed's run) over
    test images."""
    metrics = validate(metrics, METRICS_SCHEMA).sort(METRICS_KEY)  # fixed summation order
    repeated = metrics.filter(pl.struct([*SUMMARY_KEY, "seed"]).is_duplicated())
    if len(repeated):
        raise ValueError(
            "a summary group has several rows for one seed (different layer pairs under one "
            f"layer_choice?), e.g. {repeated.select([*SUMMARY_KEY, 'seed']).row(0, named=True)}"
        )
    summary = metrics.group_by(SUMMARY_KEY).agg(
        mean=pl.col("value").mean(),
        std=pl.col("value").std(ddof=1),
        count=pl.len().cast(pl.Int64),
        seeds=pl.col("seed"),
        values=pl.col("value"),
    )
    baseline_method, baseline_choice = baseline
    pair_task = [k for k in SUMMARY_KEY if k not in ("method", "layer_choice")]
    baseline_mean = summary.filter(
        (pl.col("method") == baseline_method) & (pl.col("layer_choice") == baseline_choice)
    ).select([*pair_task, pl.col("mean").alias("baseline_mean")])
    summary = summary.join(baseline_mean, on=pair_task, how="left").with_columns(
        relative_improvement=pl.when(pl.col("baseline_mean") != 0).then(
            (pl.col("mean") - pl.col("baseline_mean")) / pl.col("baseline_mean")
        )
    )
    reps = replicates or {}
    intervals = []
    for row in summary.iter_rows(named=True):
        key = tuple(row[k] for k in SUMMARY_KEY)
        per_seed = [reps.get((*key, seed)) for seed in row["seeds"]]
        intervals.append(_intervals(np.asarray(row["values"]), per_seed, statistics)[0])
    summary = pl.concat([summary, _interval_frame(intervals)], how="horizontal")
    return validate(
        summary.drop("baseline_mean", "seeds", "values").sort(SUMMARY_KEY), SUMMARY_SCHEMA
    )


def comparison_pairs(
    series: Iterable[tuple[str, str]],
    method_baselines: Mapping[str, str],
    baseline: tuple[str, str] = BASELINE,
) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """(series, its baseline series) of every comparison the table makes, each once: every
    (method, layer choice) over ``baseline``; every layer choice but ``last`` over ``last`` of
    its method; a method over ``method_baselines[method]`` at the same layer choice."""
    present = set(series)
    pairs = set()
    for method, choice in present:
        candidates = [baseline, (method, "last"), (method_baselines.get(method), choice)]
        pairs |= {
            ((method, choice), other)
            for other in candidates
            if other in present and other != (method, choice)
        }
    return sorted(pairs)


def compare(
    metrics: pl.DataFrame,
    method_baselines: Mapping[str, str],
    replicates: Replicates | None = None,
    statistics: Statistics = DEFAULT_STATISTICS,
    baseline: tuple[str, str] = BASELINE,
) -> pl.DataFrame:
    """The comparisons table: per ``comparison_pairs`` pair and encoder pair, n_pairs, task and
    metric, the difference of the two series paired by seed (over the seeds both ran), its
    intervals (over seeds: of the per-seed differences; over test images: the same resampled
    images for both) and whether each excludes zero."""
    metrics = validate(metrics, METRICS_SCHEMA).sort(METRICS_KEY)
    matched = [*ENCODER_PAIR, "n_pairs", "task", "task_kind", "metric"]
    series = metrics.select("method", "layer_choice").unique().rows()
    reps = replicates or {}
    rows = []
    for (method, choice), (base_method, base_choice) in comparison_pairs(
        series, method_baselines, baseline
    ):
        runs = metrics.filter((pl.col("method") == method) & (pl.col("layer_choice") == choice))
        base = metrics.filter(
            (pl.col("method") == base_method) & (pl.col("layer_choice") == base_choice)
        ).select([*matched, "seed", pl.col("value").alias("baseline_value")])
        paired = runs.join(base, on=[*matched, "seed"], how="inner")
        for values, group in paired.group_by(matched, maintain_order=True):
            key = dict(zip(matched, values, strict=True))
            value, base_value = group["value"].to_numpy(), group["baseline_value"].to_numpy()
            per_seed = []
            for seed in group["seed"].to_list():
                a = _replicate_key(key, method, choice, seed)
                b = _replicate_key(key, base_method, base_choice, seed)
                per_seed.append(reps[a] - reps[b] if a in reps and b in reps else None)
            columns, seed_ci, item_ci = _intervals(value - base_value, per_seed, statistics)
            baseline_mean = float(base_value.mean())
            difference = float((value - base_value).mean())
            rows.append(
                key
                | {
                    "method": method,
                    "layer_choice": choice,
                    "baseline_method": base_method,
                    "baseline_choice": base_choice,
                    "seeds": len(group),
                    "mean": float(value.mean()),
                    "baseline_mean": baseline_mean,
                    "difference": difference,
                    "relative": difference / baseline_mean if baseline_mean != 0 else None,
                    **columns,
                    "seed_excludes_zero": excludes_zero(seed_ci),
                    "item_excludes_zero": excludes_zero(item_ci),
                }
            )
    frame = pl.DataFrame(rows, schema=polars_schema(COMPARISONS_SCHEMA))
    return validate(frame, COMPARISONS_SCHEMA).sort(COMPARISON_KEY)


Interval = tuple[float, float] | None


def _replicate_key(matched: Mapping[str, object], method: str, choice: str, seed: int) -> tuple:
    row = {**matched, "method": method, "layer_choice": choice}
    return (*(row[k] for k in SUMMARY_KEY), seed)


def _intervals(
    values: np.ndarray, per_seed: list[np.ndarray | None], statistics: Statistics
) -> tuple[dict[str, object], Interval, Interval]:
    """The ``INTERVAL_FIELDS`` of a mean over seeds of ``values``, whose runs have the
    bootstrap replicates ``per_seed`` (an image interval only when every seed has them), and
    both intervals."""
    seed_ci = seed_interval(values, statistics.level)
    item_ci = None
    if per_seed and all(reps is not None for reps in per_seed):
        item_ci = percentile_interval(np.mean(per_seed, axis=0), statistics.level)
    columns = {
        "level": statistics.level,
        "seed_ci_low": None if seed_ci is None else seed_ci[0],
        "seed_ci_high": None if seed_ci is None else seed_ci[1],
        "bootstrap": statistics.bootstrap,
        "bootstrap_seed": statistics.seed,
        "item_ci_low": None if item_ci is None else item_ci[0],
        "item_ci_high": None if item_ci is None else item_ci[1],
    }
    return columns, seed_ci, item_ci


def _interval_frame(rows: list[dict[str, object]]) -> pl.DataFrame:
    schema = polars_schema(pa.schema(INTERVAL_FIELDS))
    return pl.DataFrame(rows, schema=schema)


def layer_pair_similarity(
    similarity: pl.DataFrame, similarity_metric: str, vision: str, text: str
) -> pl.DataFrame:
    """``vision_layer, text_layer, similarity`` of one encoder pair and similarity metric: the
    score on the full scoring pool (the largest ``pool_size``; minibatch CKA's ``n_samples`` is
    its batch size, so two pools can share one), averaged over its sample seeds."""
    rows = similarity.filter(
        (pl.col("metric") == similarity_metric)
        & (pl.col("vision_encoder") == vision)
        & (pl.col("text_encoder") == text)
    )
    if rows.is_empty():
        raise ValueError(f"similarity table has no {similarity_metric!r} rows for {vision}+{text}")
    largest = rows.filter(pl.col("pool_size") == pl.col("pool_size").max())
    return largest.group_by(LAYER_PAIR).agg(similarity=pl.col("value").mean())


def similarity_metrics(similarity: pl.DataFrame, vision: str, text: str) -> list[str]:
    """The similarity metrics the table holds for one encoder pair, sorted."""
    pair = (pl.col("vision_encoder") == vision) & (pl.col("text_encoder") == text)
    return similarity.filter(pair)["metric"].unique().sort().to_list()


def sweep_with_similarity(sweep: pl.DataFrame, similarity: pl.DataFrame) -> pl.DataFrame:
    """The ``sweep.parquet`` table: every sweep row once per similarity metric of its encoder
    pair, with its layer pair's similarity (``layer_pair_similarity``)."""
    sweep = validate(sweep, METRICS_SCHEMA)
    frames = []
    for (vision, text), rows in sweep.group_by(ENCODER_PAIR, maintain_order=True):
        metrics = similarity_metrics(similarity, vision, text)
        if not metrics:
            raise ValueError(f"the similarity tables have no rows for {vision}+{text}")
        for metric in metrics:
            scores = layer_pair_similarity(similarity, metric, vision, text)
            joined = rows.join(scores, on=LAYER_PAIR, how="left")
            unscored = joined.filter(pl.col("similarity").is_null())
            if len(unscored):
                raise ValueError(
                    f"{vision}+{text}: layer pair {unscored.select(LAYER_PAIR).row(0)} of the "
                    f"sweep has no {metric!r} similarity"
                )
            frames.append(joined.with_columns(similarity_metric=pl.lit(metric)))
    if not frames:
        raise ValueError("no sweep rows to join")
    return validate(pl.concat(frames), SWEEP_SCHEMA).sort(SWEEP_KEY)


def validate(frame: pl.DataFrame, schema: pa.Schema) -> pl.DataFrame:
    """The frame with columns in schema order, or an error naming the offending column."""
    expected = polars_schema(schema)
    missing = [name for name in expected if name not in frame.columns]
    extra = [name for name in frame.columns if name not in expected]
    if missing or extra:
        raise ValueError(f"table columns differ from the schema: missing {missing}, extra {extra}")
    for name, dtype in expected.items():
        if frame.schema[name] != dtype:
            raise ValueError(f"column {name!r} has type {frame.schema[name]}, expected {dtype}")
    frame = frame.select(list(expected))
    for field in schema:
        if not field.nullable and frame[field.name].null_count():
            nulls = frame[field.name].is_null().to_numpy()
            raise ValueError(
                f"column {field.name!r} has {int(nulls.sum())} nulls, first {_row(frame, nulls)}"
            )
    if "task_kind" in frame.columns:
        bad = set(frame["task_kind"].unique().to_list()) - set(TASK_KINDS)
        if bad:
            raise ValueError(f"task_kind {sorted(bad)} is not one of {TASK_KINDS}")
    if "value" in frame.columns:
        bad = ~np.isfinite(frame["value"].to_numpy())
        if bad.any():
            raise ValueError(
                f"column 'value' has NaN or infinite values in {int(bad.sum())} rows, "
                f"first {_row(frame, bad)}"
            )
    return frame


def _row(frame: pl.DataFrame, flags: np.ndarray) -> str:
    """The first row where ``flags`` is set, by index and its scalar columns."""
    index = int(np.flatnonzero(flags)[0])
    row = frame.row(index, named=True)
    shown = ", ".join(f"{k}={v}" for k, v in row.items() if not isinstance(v, list | bytes))
    return f"row {index} ({shown})"


def write_metrics(metrics: pl.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write the metrics table atomically with ``METRICS_SCHEMA``."""
    _write(validate(metrics, METRICS_SCHEMA), METRICS_SCHEMA, path)


def write_summary(summary: pl.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write the summary table atomically with ``SUMMARY_SCHEMA``."""
    _write(validate(summary, SUMMARY_SCHEMA), SUMMARY_SCHEMA, path)


def write_outcomes(outcomes: pl.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write an outcomes table atomically with ``OUTCOMES_SCHEMA``."""
    _write(validate(outcomes, OUTCOMES_SCHEMA), OUTCOMES_SCHEMA, path)


def write_comparisons(comparisons: pl.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write the comparisons table atomically with ``COMPARISONS_SCHEMA``."""
    _write(validate(comparisons, COMPARISONS_SCHEMA), COMPARISONS_SCHEMA, path)


def write_sweep(sweep: pl.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write the sweep table (``sweep_with_similarity``) atomically with ``SWEEP_SCHEMA``."""
    _write(validate(sweep, SWEEP_SCHEMA), SWEEP_SCHEMA, path)


def write_sweep_rho(rho: pl.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write the sweep's rho table atomically with ``SWEEP_RHO_SCHEMA``."""
    _write(validate(rho, SWEEP_RHO_SCHEMA), SWEEP_RHO_SCHEMA, path)


def read_metrics(path: str | os.PathLike[str]) -> pl.DataFrame:
    """The metrics table at ``path``, validated against ``METRICS_SCHEMA``."""
    return read_table(path, METRICS_SCHEMA)


def read_summary(path: str | os.PathLike[str]) -> pl.DataFrame:
    """The summary table at ``path``, validated against ``SUMMARY_SCHEMA``."""
    return read_table(path, SUMMARY_SCHEMA)


def read_outcomes(path: str | os.PathLike[str]) -> pl.DataFrame:
    """An outcomes table at ``path``, validated against ``OUTCOMES_SCHEMA``."""
    return read_table(path, OUTCOMES_SCHEMA)


def read_comparisons(path: str | os.PathLike[str]) -> pl.DataFrame:
    """The comparisons table at ``path``, validated against ``COMPARISONS_SCHEMA``."""
    return read_table(path, COMPARISONS_SCHEMA)


def read_table(path: str | os.PathLike[str], schema: pa.Schema | None = None) -> pl.DataFrame:
    """The Parquet table at ``path`` (validated against ``schema`` when given); an error that
    names the file: unreadable, or which column and row break the schema."""
    try:
        frame = pl.read_parquet(path)
        return frame if schema is None else validate(frame, schema)
    except (OSError, ValueError, pl.exceptions.PolarsError) as error:
        raise ValueError(f"table {os.fspath(path)}: {error}") from error


def _write(frame: pl.DataFrame, schema: pa.Schema, path: str | os.PathLike[str]) -> None:
    write_parquet(frame.to_arrow().cast(schema), path)


def polars_schema(schema: pa.Schema) -> dict[str, pl.DataType]:
    empty = pl.from_arrow(schema.empty_table())
    return dict(empty.schema)
