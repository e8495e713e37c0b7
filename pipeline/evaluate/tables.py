"""The run's metrics table and its summary over seeds (docs/formats.md).

``metrics.parquet`` holds one row per number, keyed by the run (encoder pair, method, layer
choice and the layers it chose, n_pairs, seed) and the task and metric. ``summary.parquet``
aggregates over seeds for each (encoder pair, method, layer choice, n_pairs, task, metric):
mean, sample standard deviation (ddof=1; null when only one seed), count of seeds, and the
relative improvement (mean - baseline mean) / baseline mean over the ``linear``/``last``
baseline of the same encoder pair, n_pairs, task and metric (null when that baseline is
absent or its mean is zero; 0.5 means +50%). Layers are not a summary key: a layer choice
such as ``best`` may pick different layers for different seeds.

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

TASK_KINDS = ("classification", "retrieval", "segmentation")
BASELINE = ("linear", "last")
ENCODER_PAIR = ["vision_encoder", "text_encoder"]
LAYER_PAIR = ["vision_layer", "text_layer"]

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
SUMMARY_SCHEMA = pa.schema(
    [METRICS_SCHEMA.field(name) for name in SUMMARY_KEY]
    + [
        pa.field("mean", pa.float64(), nullable=False),
        pa.field("std", pa.float64()),
        pa.field("count", pa.int64(), nullable=False),
        pa.field("relative_improvement", pa.float64()),
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


def summarise(metrics: pl.DataFrame, baseline: tuple[str, str] = BASELINE) -> pl.DataFrame:
    """Mean, std (ddof=1), count over seeds and relative improvement over the baseline."""
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
    return validate(summary.drop("baseline_mean").sort(SUMMARY_KEY), SUMMARY_SCHEMA)


def layer_pair_similarity(
    similarity: pl.DataFrame, similarity_metric: str, vision: str, text: str
) -> pl.DataFrame:
    """``vision_layer, text_layer, similarity`` of one encoder pair and similarity metric: the
    score at the table's largest ``n_samples``, averaged over its sample seeds."""
    rows = similarity.filter(
        (pl.col("metric") == similarity_metric)
        & (pl.col("vision_encoder") == vision)
        & (pl.col("text_encoder") == text)
    )
    if rows.is_empty():
        raise ValueError(f"similarity table has no {similarity_metric!r} rows for {vision}+{text}")
    largest = rows.filter(pl.col("n_samples") == pl.col("n_samples").max())
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
            raise ValueError(f"column {field.name!r} has {frame[field.name].null_count()} nulls")
    if "task_kind" in frame.columns:
        bad = set(frame["task_kind"].unique().to_list()) - set(TASK_KINDS)
        if bad:
            raise ValueError(f"task_kind {sorted(bad)} is not one of {TASK_KINDS}")
    if "value" in frame.columns and not np.isfinite(frame["value"].to_numpy()).all():
        raise ValueError("column 'value' has NaN or infinite values")
    return frame


def write_metrics(metrics: pl.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write the metrics table atomically with ``METRICS_SCHEMA``."""
    _write(validate(metrics, METRICS_SCHEMA), METRICS_SCHEMA, path)


def write_summary(summary: pl.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write the summary table atomically with ``SUMMARY_SCHEMA``."""
    _write(validate(summary, SUMMARY_SCHEMA), SUMMARY_SCHEMA, path)


def write_sweep(sweep: pl.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write the sweep table (``sweep_with_similarity``) atomically with ``SWEEP_SCHEMA``."""
    _write(validate(sweep, SWEEP_SCHEMA), SWEEP_SCHEMA, path)


def write_sweep_rho(rho: pl.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write the sweep's rho table atomically with ``SWEEP_RHO_SCHEMA``."""
    _write(validate(rho, SWEEP_RHO_SCHEMA), SWEEP_RHO_SCHEMA, path)


def read_metrics(path: str | os.PathLike[str]) -> pl.DataFrame:
    """The metrics table at ``path``, validated against ``METRICS_SCHEMA``."""
    return validate(pl.read_parquet(path), METRICS_SCHEMA)


def read_summary(path: str | os.PathLike[str]) -> pl.DataFrame:
    """The summary table at ``path``, validated against ``SUMMARY_SCHEMA``."""
    return validate(pl.read_parquet(path), SUMMARY_SCHEMA)


def _write(frame: pl.DataFrame, schema: pa.Schema, path: str | os.PathLike[str]) -> None:
    write_parquet(frame.to_arrow().cast(schema), path)


def polars_schema(schema: pa.Schema) -> dict[str, pl.DataType]:
    empty = pl.from_arrow(schema.empty_table())
    return dict(empty.schema)
