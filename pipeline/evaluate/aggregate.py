"""The aggregate stage: one metrics table, its summary over seeds, and the plots drawn from them.

Writes the job's ``metrics`` and ``summary`` tables and, into its ``plots`` folder,
metric-vs-n_pairs and improvement-over-baseline figures per task and metric, plus layer-pair
similarity against the downstream metric for every layer pair an encoder pair's runs used (one
figure per similarity metric, method and n_pairs with more than two points).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import polars as pl

from pipeline.evaluate.tables import concat_metrics, summarise, write_metrics, write_summary
from pipeline.jobs import Job

log = logging.getLogger(__name__)


def run_aggregate(job: Job) -> None:
    from pipeline.evaluate import plots  # matplotlib: imported only where figures are drawn

    metrics = concat_metrics(pl.read_parquet(path) for path in job.input_list("evaluations"))
    summary = summarise(metrics)
    write_metrics(metrics, job.output("metrics"))
    write_summary(summary, job.output("summary"))
    plots_dir = Path(job.output("plots"))
    similarities = job.input_list("similarities")

    shutil.rmtree(plots_dir, ignore_errors=True)  # only figures of this run, none left over
    written = plots.plot_all(summary, plots_dir)
    similarity = pl.concat([pl.read_parquet(path) for path in similarities], how="diagonal")
    written += similarity_plots(plots, similarity, metrics, plots_dir)
    log.info(
        "%d metric rows, %d summary rows, %d figures", len(metrics), len(summary), len(written)
    )


def similarity_plots(
    plots, similarity: pl.DataFrame, metrics: pl.DataFrame, plots_dir: Path
) -> list[Path]:
    """Layer-pair similarity against the downstream metric where layer pairs vary enough."""
    written = []
    group = ["vision_encoder", "text_encoder", "method", "n_pairs", "task", "metric"]
    largest = metrics.filter(pl.col("n_pairs") == pl.col("n_pairs").max().over(group[:3]))
    varied = (
        largest.group_by(group)
        .agg(pl.struct("vision_layer", "text_layer").n_unique().alias("layer_pairs"))
        .filter(pl.col("layer_pairs") > 2)
        .sort(group)
    )
    for similarity_metric in similarity["metric"].unique().sort():
        for row in varied.iter_rows(named=True):
            runs = largest.filter(*(pl.col(column) == row[column] for column in group))
            name = (
                f"{row['task']}__{row['metric']}__{row['method']}__vs_{similarity_metric}".replace(
                    "@", "_"
                )
            )
            written.append(
                plots.plot_similarity_vs_metric(
                    similarity,
                    runs,
                    similarity_metric,
                    row["task"],
                    row["metric"],
                    plots_dir / "layers" / f"{name}.png",
                )
            )
    return written
