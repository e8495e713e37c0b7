"""The aggregate stage: one metrics table, its summary over seeds, the paired comparisons, and
the plots drawn from them.

Writes the job's ``metrics``, ``summary`` and ``comparisons`` tables (the intervals: a
t-interval over seeds and a bootstrap over the test images of the evaluate jobs' outcomes,
``statistics`` in the spec; the comparisons' baselines: ``baselines`` in the spec, plus the
linear head on the last layers and each method's last layers) and, into its ``plots`` folder,
metric-vs-n_pairs and improvement-over-baseline figures per task and metric with their
intervals, plus layer-pair
similarity against the downstream metric for every layer pair an encoder pair's runs used (one
figure per similarity metric, method and n_pairs with more than two points), and, per
segmentation task, a few predicted label maps of PAL and of the best global method
(``plots/segmentation/``).

With a layer sweep (the job's ``sweeps`` inputs) it also writes the ``sweep`` table (every sweep
row with its layer pair's similarity), the ``sweep_rho`` table (Spearman's rho per encoder pair,
similarity metric, task and metric) and the matching figures (``plots/layers/sweep__*.png``).

Every input table is read with its path: a bad one fails the job naming the file and row. The
job's outputs are staged (``layout.staged``); the ``publish`` stage copies them into
``results/tables`` and ``results/plots`` once the job has succeeded, so a failing aggregate
leaves the tables and plots last published (docs/architecture.md, "Rerun semantics").
"""

from __future__ import annotations

import logging
import multiprocessing
import re
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import polars as pl

from pipeline import layout
from pipeline.data import load_split, load_tasks, read_manifest
from pipeline.evaluate.intervals import Statistics
from pipeline.evaluate.tables import (
    SWEEP_RHO_KEY,
    SWEEP_RHO_SCHEMA,
    bootstrap_replicates,
    compare,
    concat_metrics,
    concat_outcomes,
    polars_schema,
    read_metrics,
    read_outcomes,
    read_table,
    similarity_metrics,
    summarise,
    sweep_with_similarity,
    validate,
    write_comparisons,
    write_metrics,
    write_summary,
    write_sweep,
    write_sweep_rho,
)
from pipeline.jobs import Job

log = logging.getLogger(__name__)


def run(job: Job) -> None:
    from pipeline.evaluate import plots  # matplotlib: imported only where figures are drawn

    metrics = concat_metrics(read_metrics(path) for path in job.input_list("evaluations"))
    statistics = Statistics(**job.spec["statistics"])
    outcomes = concat_outcomes(read_outcomes(path) for path in job.input_list("outcomes"))
    replicates = bootstrap_replicates(outcomes, metrics, statistics)
    summary = summarise(metrics, replicates, statistics)
    comparisons = compare(metrics, job.spec["baselines"], replicates, statistics)
    write_metrics(metrics, job.output("metrics"))
    write_summary(summary, job.output("summary"))
    write_comparisons(comparisons, job.output("comparisons"))
    plots_dir = Path(job.output("plots"))
    similarity = pl.concat(
        [read_table(path) for path in job.input_list("similarities")], how="diagonal"
    )
    sweep = None
    if "sweeps" in job.inputs:
        sweep = concat_metrics(read_metrics(path) for path in job.input_list("sweeps"))
        write_sweep(sweep_with_similarity(sweep, similarity), job.output("sweep"))
        write_sweep_rho(sweep_rho(plots, similarity, sweep), job.output("sweep_rho"))
    examples = pl.concat([read_table(path) for path in job.input_list("examples")])
    datasets = {
        read_manifest(Path(layout.dataset_of_manifest(m)))["name"]: layout.dataset_of_manifest(m)
        for m in job.input_list("datasets")
    }
    token_methods = set(job.spec.get("token_methods", ()))

    shutil.rmtree(plots_dir, ignore_errors=True)  # only figures of this run, none left over
    written = draw(
        [
            (plots.plot_all, (summary, plots_dir, comparisons)),
            (layer_figures, (similarity, metrics, sweep, plots_dir)),
            (segmentation_figures, (summary, examples, datasets, token_methods, plots_dir)),
        ],
        job.threads or 1,
    )
    log.info(
        "%d metric rows, %d summary rows, %d comparisons (%d with an image interval excluding "
        "zero), %d figures",
        len(metrics),
        len(summary),
        len(comparisons),
        comparisons["item_excludes_zero"].sum(),
        len(written),
    )


def draw(families: list[tuple[Callable[..., list[Path]], tuple]], workers: int) -> list[Path]:
    """The figures of each family (a function and its arguments, returning the paths it wrote),
    in that order; with more than one worker, the families are drawn in parallel processes
    (matplotlib draws on one core; spawned, not forked: polars' thread pool is running)."""
    if workers < 2:
        return [path for function, args in families for path in function(*args)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(families)), mp_context=context) as pool:
        futures = [pool.submit(function, *args) for function, args in families]
        return [path for future in futures for path in future.result()]


def layer_figures(
    similarity: pl.DataFrame, metrics: pl.DataFrame, sweep: pl.DataFrame | None, plots_dir: Path
) -> list[Path]:
    """The similarity-against-metric figures of the runs' layer pairs and of the sweep."""
    from pipeline.evaluate import plots

    written = similarity_plots(plots, similarity, metrics, plots_dir)
    if sweep is not None:
        written += sweep_plots(plots, similarity, sweep, plots_dir)
    return written


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


SWEEP_GROUP = [key for key in SWEEP_RHO_KEY if key != "similarity_metric"]


def sweep_groups(
    similarity: pl.DataFrame, sweep: pl.DataFrame
) -> Iterator[tuple[dict[str, Any], pl.DataFrame, str]]:
    """(key, rows, similarity metric) per encoder pair, method, run, task, metric of the sweep
    and similarity metric of that encoder pair; ``key`` maps ``SWEEP_GROUP`` to its values."""
    for values, rows in sweep.sort(SWEEP_GROUP).group_by(SWEEP_GROUP, maintain_order=True):
        key = dict(zip(SWEEP_GROUP, values, strict=True))
        for similarity_metric in similarity_metrics(
            similarity, key["vision_encoder"], key["text_encoder"]
        ):
            yield key, rows, similarity_metric


def sweep_rho(plots: ModuleType, similarity: pl.DataFrame, sweep: pl.DataFrame) -> pl.DataFrame:
    """Spearman's rho between layer-pair similarity and the metric over the swept layer pairs
    (``plots.layer_pair_points``), one row per ``SWEEP_RHO_KEY``; null where either is constant."""
    rows = []
    for key, runs, similarity_metric in sweep_groups(similarity, sweep):
        points = plots.layer_pair_points(
            similarity, runs, similarity_metric, key["task"], key["metric"]
        )
        rho = plots.spearman_rho(points["similarity"].to_numpy(), points["value"].to_numpy())
        rows.append(
            {
                **key,
                "similarity_metric": similarity_metric,
                "rho": rho if np.isfinite(rho) else None,
                "layer_pairs": len(points),
            }
        )
    frame = pl.DataFrame(rows, schema=polars_schema(SWEEP_RHO_SCHEMA))
    return validate(frame, SWEEP_RHO_SCHEMA).sort(SWEEP_RHO_KEY)


def sweep_plots(
    plots: ModuleType, similarity: pl.DataFrame, sweep: pl.DataFrame, plots_dir: Path
) -> list[Path]:
    """Layer-pair similarity against each metric of the sweep, one figure per encoder pair,
    similarity metric, task and metric (Spearman's rho in the title)."""
    written = []
    for key, runs, similarity_metric in sweep_groups(similarity, sweep):
        name = re.sub(
            r"[^A-Za-z0-9_.-]+",
            "_",
            f"sweep__{key['vision_encoder']}__{key['text_encoder']}__{key['task']}__"
            f"{key['metric']}__vs_{similarity_metric}",
        )
        written.append(
            plots.plot_similarity_vs_metric(
                similarity,
                runs,
                similarity_metric,
                key["task"],
                key["metric"],
                plots_dir / "layers" / f"{name}.png",
            )
        )
    return written


def segmentation_figures(
    summary: pl.DataFrame,
    examples: pl.DataFrame,
    datasets: dict[str, str],
    token_methods: set[str],
    plots_dir: Path,
) -> list[Path]:
    """Per encoder pair and segmentation task: a few test images, their true masks, and the
    label maps of the best token method (PAL) and of the best pooled method (patch baseline),
    each at the largest n_pairs (mean mIoU over seeds; the example run is its smallest seed)."""
    from pipeline.evaluate import plots

    written = []
    if examples.is_empty():
        return written
    keys = ["vision_encoder", "text_encoder", "task"]
    for (vision, text, task), rows in examples.group_by(keys, maintain_order=True):
        n_pairs = rows["n_pairs"].max()
        scores = summary.filter(
            (pl.col("vision_encoder") == vision)
            & (pl.col("text_encoder") == text)
            & (pl.col("task") == task)
            & (pl.col("metric") == "miou")
            & (pl.col("n_pairs") == n_pairs)
        )
        columns = {}
        for label, pick in (("PAL", True), ("best global method", False)):
            candidates = scores.filter(pl.col("method").is_in(sorted(token_methods)) == pick)
            if candidates.is_empty():
                continue
            best = candidates.sort(
                ["mean", "method", "layer_choice"], descending=[True, False, False]
            ).row(0, named=True)
            maps = rows.filter(
                (pl.col("method") == best["method"])
                & (pl.col("layer_choice") == best["layer_choice"])
            ).sort("image_row")
            title = f"{label}: {best['method']} ({best['layer_choice']}), mIoU {best['mean']:.3f}"
            columns[title] = maps
        if not columns:
            continue
        dataset, task_name = task.split(".", 1)
        if dataset not in datasets:
            continue
        [definition] = [t for t in load_tasks(Path(datasets[dataset])) if t.name == task_name]
        data = load_split(Path(datasets[dataset]), definition.split)
        shown = next(iter(columns.values()))
        images = [np.asarray(data.open_image(r)) for r in shown["image_row"].to_list()]
        truths = [data.open_mask(r, definition.label_column) for r in shown["image_row"].to_list()]
        predictions = {
            title: [
                np.frombuffer(row["labels"], dtype=np.uint8).reshape(row["height"], row["width"])
                for row in maps.iter_rows(named=True)
            ]
            for title, maps in columns.items()
        }
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{task}__{vision}__{text}")
        written.append(
            plots.plot_segmentation_maps(
                images,
                truths,
                predictions,
                list(definition.classnames),
                f"{task}, {vision} + {text}, n_pairs = {n_pairs}: PAL against the best global "
                "method (patch baseline)",
                plots_dir / "segmentation" / f"{name}.png",
            )
        )
    return written
