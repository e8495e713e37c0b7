"""A bad evaluation table fails the aggregate naming the file and row, and the tables and plots
users read are published copies of the aggregate's staged outputs, which Snakemake may delete
(issue 22, finding 5). The Snakemake-level check (a failed aggregate leaves every published
table and plot) is ``test_workflow.py::test_a_bad_evaluation_table_keeps_the_published_tables``.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from pipeline import jobs, layout
from pipeline.config import load_config
from pipeline.evaluate.tables import (
    RunKey,
    concat_metrics,
    metric_rows,
    read_metrics,
    write_metrics,
)
from pipeline.stages import aggregate, publish
from pipeline.verify import aggregate_problems

ROOT = Path(__file__).resolve().parent.parent


def evaluation_table(path: Path, method: str) -> pl.DataFrame:
    """An evaluation table of two runs and two metrics, written to ``path``."""
    frames = [
        metric_rows(
            RunKey("vit", "minilm", method, "last", 2, 5, 24, seed),
            "tiny.shape",
            "classification",
            {"top1": 0.5 + seed / 10, "top5": 0.9},
        )
        for seed in (0, 1)
    ]
    metrics = concat_metrics(frames)
    write_metrics(metrics, path)
    return metrics


def with_nan(path: Path, row: int) -> None:
    frame = pl.read_parquet(path)
    nan = pl.when(pl.int_range(pl.len()) == row).then(float("nan")).otherwise(pl.col("value"))
    frame.with_columns(value=nan).write_parquet(path)


def test_a_nan_in_an_evaluation_table_names_the_file_and_the_row(tmp_path: Path) -> None:
    table = tmp_path / "csa" / "last.parquet"
    table.parent.mkdir()
    evaluation_table(table, "csa")
    with_nan(table, 2)
    with pytest.raises(ValueError) as bad:
        read_metrics(table)
    message = str(bad.value)
    assert message.startswith(f"table {table}: column 'value' has NaN or infinite values")
    assert "in 1 rows, first row 2 (" in message and "method=csa" in message
    assert "seed=1" in message and "metric=top1" in message and "value=nan" in message


def test_the_aggregate_stage_names_the_bad_table_among_its_inputs(tmp_path: Path) -> None:
    good, bad = tmp_path / "linear.parquet", tmp_path / "csa.parquet"
    evaluation_table(good, "linear")
    evaluation_table(bad, "csa")
    with_nan(bad, 0)
    job = jobs.Job(
        "aggregate",
        {"statistics": {"bootstrap": 0, "level": 0.95, "seed": 0}, "baselines": {}},
        inputs={"evaluations": [str(good), str(bad)]},
        outputs={"metrics": str(tmp_path / "out.parquet")},
    )
    with pytest.raises(ValueError, match=f"table {bad}: column 'value' has NaN .* first row 0"):
        aggregate.run(job)
    assert not (tmp_path / "out.parquet").exists()


def test_a_truncated_evaluation_table_is_named(tmp_path: Path) -> None:
    table = tmp_path / "last.parquet"
    evaluation_table(table, "csa")
    table.write_bytes(table.read_bytes()[:-40])
    with pytest.raises(ValueError, match=f"^table {table}: "):
        read_metrics(table)


def test_the_aggregate_writes_staged_copies_that_publish_puts_in_place() -> None:
    config = load_config(ROOT / "config.yaml")
    staged, published = jobs.aggregate(config).outputs, jobs.published(config)
    assert set(staged) == set(published) >= {"metrics", "summary", "comparisons", "plots"}
    assert all(path.startswith(f"{layout.STAGING}/") for path in staged.values())
    assert published["metrics"] == layout.METRICS_TABLE
    assert published["plots"] == layout.PLOTS_DIR
    job = jobs.publish(config)
    assert job.inputs == staged and job.outputs == published


def test_publish_replaces_every_file_and_drops_what_staging_lacks(tmp_path: Path) -> None:
    staging, results = tmp_path / "staging", tmp_path / "results"
    for path, text in {
        staging / "tables/metrics.parquet": "new metrics",
        staging / "plots/a.png": "new a",
        staging / "plots/layers/b.png": "new b",
        results / "tables/metrics.parquet": "old metrics",
        results / "plots/layers/b.png": "old b",
        results / "plots/gone/c.png": "old c",  # a figure the new aggregate no longer draws
    }.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    names = {"metrics": "tables/metrics.parquet", "plots": "plots"}
    publish.run(
        jobs.Job(
            "publish",
            {},
            inputs={name: str(staging / path) for name, path in names.items()},
            outputs={name: str(results / path) for name, path in names.items()},
        )
    )
    found = {str(p.relative_to(results)): p.read_text() for p in results.rglob("*") if p.is_file()}
    assert found == {
        "tables/metrics.parquet": "new metrics",
        "plots/a.png": "new a",
        "plots/layers/b.png": "new b",
    }
    assert not (results / "plots/gone").exists()
    assert (staging / "plots/a.png").read_text() == "new a"  # staging stays: the job's output


def test_verify_names_a_bad_evaluation_table_and_an_aggregate_that_did_not_finish(
    tmp_path: Path,
) -> None:
    results = tmp_path / "results"
    table = results / "evaluation/vit/minilm/csa/last.parquet"
    table.parent.mkdir(parents=True)
    evaluation_table(table, "csa")
    (results / "tables").mkdir()
    for path in (layout.METRICS_TABLE, layout.SUMMARY_TABLE, layout.COMPARISONS_TABLE):
        staged = tmp_path / layout.staged(path)
        staged.parent.mkdir(parents=True, exist_ok=True)
        staged.touch()
    (tmp_path / layout.staged(layout.PLOTS_DIR)).mkdir()
    assert aggregate_problems(results, "snakemake") == []
    with_nan(table, 1)
    (tmp_path / layout.staged(layout.METRICS_TABLE)).unlink()  # a failed aggregate's
    bad, unfinished = aggregate_problems(results, "snakemake")
    assert bad.where == str(table) and "first row 1 (" in bad.what
    assert bad.repair == "snakemake --force results/evaluation/vit/minilm/csa/last.parquet"
    assert "the last aggregate did not finish" in unfinished.what
    assert layout.staged(layout.METRICS_TABLE) in unfinished.what
    assert unfinished.repair == "snakemake"


def test_figure_families_drawn_in_parallel_come_back_in_their_order() -> None:
    families = [(sorted, ([3, 1, 2],)), (list, ("ab",)), (sorted, ([9, 8],))]
    assert aggregate.draw(families, 2) == aggregate.draw(families, 1) == [1, 2, 3, "a", "b", 8, 9]
