"""Figures made from the metrics, summary and similarity tables (and segmentation maps).

Each function draws one PNG (matplotlib's Agg canvas through ``Figure``, no pyplot state),
writes it atomically and returns its path. A figure has one panel per encoder pair.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import polars as pl
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from scipy.stats import spearmanr

from pipeline.atomic import atomic_path
from pipeline.evaluate.tables import BASELINE, ENCODER_PAIR, LAYER_PAIR, layer_pair_similarity

SERIES = ["method", "layer_choice"]
RUN_GROUP = [*ENCODER_PAIR, "method", "n_pairs"]
PANEL_SIZE = (5.5, 4.0)
DPI = 120


def plot_metric_vs_pairs(
    summary: pl.DataFrame, task: str, metric: str, path: str | os.PathLike[str]
) -> Path:
    """Metric against n_pairs (log x) per method and layer choice: the mean over seeds, its
    t-interval over seeds as a band (clipped to [0, 1]: every metric is a fraction) and its
    bootstrap interval over test images as error bars (where the summary has them)."""
    rows = _select(summary, task, metric, "summary")
    colours = _series_colours(rows)
    fig, panels = _panels(rows)
    for ax, ((vision, text), panel) in zip(
        panels, rows.group_by(ENCODER_PAIR, maintain_order=True), strict=True
    ):
        for (method, choice), series in panel.sort([*SERIES, "n_pairs"]).group_by(
            SERIES, maintain_order=True
        ):
            n_pairs = series["n_pairs"].to_numpy()
            mean = series["mean"].to_numpy()
            colour = colours[(method, choice)]
            ax.errorbar(
                n_pairs,
                mean,
                yerr=_error_bars(mean, *_columns(series, "item_ci")),
                marker="o",
                ms=3,
                capsize=2,
                color=colour,
                ls=_line_style(choice),
                label=f"{method} ({choice})",
            )
            low, high = np.clip(_columns(series, "seed_ci"), 0.0, 1.0)
            ax.fill_between(n_pairs, low, high, color=colour, alpha=0.15, lw=0)
        ax.set_xscale("log")
        _n_pairs_ticks(ax, panel["n_pairs"].unique().sort().to_list())
        ax.set(title=f"{vision} + {text}", xlabel="paired training samples (n_pairs)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(
            fontsize="small", title="method (layers)", loc="upper left", bbox_to_anchor=(1.02, 1.0)
        )
    level = _level(rows)
    fig.suptitle(
        f"{task}: {metric} vs. paired data\n(mean over seeds; band: {level} t-interval over "
        f"seeds;\nbars: {level} bootstrap interval over test images)"
    )
    return _save(fig, path)


def plot_relative_improvement(
    summary: pl.DataFrame,
    task: str,
    metric: str,
    path: str | os.PathLike[str],
    baseline: tuple[str, str] = BASELINE,
    comparisons: pl.DataFrame | None = None,
) -> Path:
    """Grouped bars per n_pairs: relative improvement (%) of each method over the baseline, with
    the intervals of its paired difference from ``comparisons`` (divided by the baseline's mean,
    held fixed): over test images as thick black bars, over seeds as thin grey caps."""
    rows = _select(summary, task, metric, "summary").filter(~_is_baseline(baseline))
    if rows.is_empty():
        raise ValueError(f"no method other than the baseline {baseline} for {task}/{metric}")
    colours = _series_colours(rows)
    fig, panels = _panels(rows)
    for ax, ((vision, text), panel) in zip(
        panels, rows.group_by(ENCODER_PAIR, maintain_order=True), strict=True
    ):
        n_pairs = panel["n_pairs"].unique().sort().to_list()
        series = panel.select(SERIES).unique().sort(SERIES).rows()
        width = 0.8 / len(series)
        for i, (method, choice) in enumerate(series):
            improvement = (
                pl.DataFrame({"n_pairs": n_pairs})
                .join(
                    panel.filter((pl.col("method") == method) & (pl.col("layer_choice") == choice)),
                    on="n_pairs",
                    how="left",
                )["relative_improvement"]
                .fill_null(np.nan)
                .to_numpy()
            )
            offsets = np.arange(len(n_pairs)) + (i - (len(series) - 1) / 2) * width
            if comparisons is not None:
                intervals = _relative_intervals(
                    comparisons, (vision, text, method, choice), baseline, task, metric, n_pairs
                )
                for prefix, style in (
                    ("seed_ci", {"color": "grey", "lw": 0.8, "capsize": 3}),
                    ("item_ci", {"color": "black", "lw": 2.0, "capsize": 0}),
                ):
                    low, high = 100 * _columns(intervals, prefix)
                    ax.errorbar(
                        offsets,
                        (low + high) / 2,
                        yerr=(high - low) / 2,
                        fmt="none",
                        zorder=3,
                        **style,
                    )
            ax.bar(
                offsets,
                100 * improvement,
                width,
                color=colours[(method, choice)],
                hatch="//" if choice == "last" else None,
                edgecolor="white",
                label=f"{method} ({choice})",
            )
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xticks(np.arange(len(n_pairs)), labels=[str(n) for n in n_pairs])
        ax.set(title=f"{vision} + {text}", xlabel="paired training samples (n_pairs)")
        ax.set_ylabel(f"relative improvement in {metric} (%)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(
            fontsize="small", title="method (layers)", loc="upper left", bbox_to_anchor=(1.02, 1.0)
        )
    title = f"{task}: improvement over {baseline[0]} ({baseline[1]} layers)"
    if comparisons is not None:
        title += (
            f"\n({_level(rows)} intervals of the paired difference, black: bootstrap over test "
            "images,\ngrey: t-interval over seeds)"
        )
    fig.suptitle(title)
    return _save(fig, path)


def layer_pair_points(
    similarity: pl.DataFrame,
    metrics: pl.DataFrame,
    similarity_metric: str,
    task: str,
    metric: str,
) -> pl.DataFrame:
    """Per layer pair: its similarity and the downstream metric averaged over seeds.

    ``metrics`` holds runs of one encoder pair, method and n_pairs whose layer pairs vary.
    The similarity of a layer pair is taken at the largest ``n_samples`` of the table for
    that encoder pair, averaged over its sample seeds. Columns: the metrics' encoder pair,
    method and n_pairs, then ``vision_layer, text_layer, similarity, value``.
    """
    runs = _select(metrics, task, metric, "metrics")
    groups = runs.select(RUN_GROUP).unique().sort(pl.all())
    if len(groups) != 1:
        raise ValueError(
            f"metrics for {task}/{metric} must be one encoder pair, method and n_pairs; "
            f"got {groups.rows()}"
        )
    vision, text, _, _ = groups.row(0)
    points = (
        runs.group_by([*RUN_GROUP, *LAYER_PAIR])
        .agg(pl.col("value").mean())
        .join(layer_pair_similarity(similarity, similarity_metric, vision, text), on=LAYER_PAIR)
        .select([*RUN_GROUP, *LAYER_PAIR, "similarity", "value"])
        .sort(LAYER_PAIR)
    )
    if points.is_empty():
        raise ValueError(f"no layer pair of the {task}/{metric} runs has a {similarity_metric!r}")
    return points


def plot_similarity_vs_metric(
    similarity: pl.DataFrame,
    metrics: pl.DataFrame,
    similarity_metric: str,
    task: str,
    metric: str,
    path: str | os.PathLike[str],
) -> Path:
    """Layer-pair similarity against the downstream metric, Spearman's rho in the title.

    The points are those of ``layer_pair_points`` (same arguments).
    """
    points = layer_pair_points(similarity, metrics, similarity_metric, task, metric)
    vision, text, method, n_pairs = points.select(RUN_GROUP).row(0)
    x, y = points["similarity"].to_numpy(), points["value"].to_numpy()
    fig = Figure(figsize=PANEL_SIZE, layout="constrained")
    ax = fig.subplots()
    ax.scatter(x, y, color=colormaps["tab10"](0))
    for xi, yi, (v, t) in zip(x, y, points.select(LAYER_PAIR).rows(), strict=True):
        label = ax.annotate(
            f"v{v}/t{t}", (xi, yi), fontsize="x-small", xytext=(3, 3), textcoords="offset points"
        )
        label.set_in_layout(False)  # the layout engine would measure every label (most of the time)
    ax.margins(0.08)  # room for the labels the layout leaves out
    ax.set(xlabel=f"layer-pair similarity ({similarity_metric})", ylabel=f"{task}: {metric}")
    ax.grid(alpha=0.3)
    ax.set_title(
        f"{vision} + {text}, {method}, n_pairs={n_pairs}\n"
        f"Spearman ρ = {spearman_rho(x, y):.3f} over {len(points)} layer pairs"
    )
    return _save(fig, path)


def plot_all(
    summary: pl.DataFrame,
    out_dir: str | os.PathLike[str],
    comparisons: pl.DataFrame | None = None,
) -> list[Path]:
    """Every metric-vs-n_pairs and relative-improvement figure of a summary table (the latter
    with the intervals of ``comparisons``, when given)."""
    paths = []
    for task, metric in summary.select("task", "metric").unique().sort(pl.all()).rows():
        stem = Path(out_dir) / _file_stem(f"{task}__{metric}")
        paths.append(plot_metric_vs_pairs(summary, task, metric, f"{stem}__vs_n_pairs.png"))
        compared = summary.filter(
            (pl.col("task") == task) & (pl.col("metric") == metric) & ~_is_baseline(BASELINE)
        )
        if compared["relative_improvement"].is_not_null().any():
            paths.append(
                plot_relative_improvement(
                    summary, task, metric, f"{stem}__improvement.png", comparisons=comparisons
                )
            )
    return paths


def spearman_rho(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation; NaN when fewer than 2 points or either side is constant."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def _columns(rows: pl.DataFrame, prefix: str) -> np.ndarray:
    """(2, n) lower and upper ends of an interval's columns, NaN where null."""
    return rows.select(f"{prefix}_low", f"{prefix}_high").fill_null(np.nan).to_numpy().T


def _error_bars(mean: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Matplotlib's (2, n) distances below and above the mean; none where an end is NaN."""
    return np.nan_to_num(np.stack([mean - low, high - mean]), nan=0.0)


def _level(rows: pl.DataFrame) -> str:
    levels = rows["level"].unique().to_list()
    return f"{levels[0]:.0%}" if len(levels) == 1 else "CI"


def _relative_intervals(
    comparisons: pl.DataFrame,
    series: tuple[str, str, str, str],
    baseline: tuple[str, str],
    task: str,
    metric: str,
    n_pairs: list[int],
) -> pl.DataFrame:
    """Per n_pairs (in order), a series' interval columns over the baseline divided by the
    baseline's mean (nulls where the comparison or its interval is absent)."""
    vision, text, method, choice = series
    rows = comparisons.filter(
        (pl.col("vision_encoder") == vision)
        & (pl.col("text_encoder") == text)
        & (pl.col("method") == method)
        & (pl.col("layer_choice") == choice)
        & (pl.col("baseline_method") == baseline[0])
        & (pl.col("baseline_choice") == baseline[1])
        & (pl.col("task") == task)
        & (pl.col("metric") == metric)
        & (pl.col("baseline_mean") != 0)
    )
    ends = [f"{p}_{e}" for p in ("seed_ci", "item_ci") for e in ("low", "high")]
    relative = rows.select("n_pairs", *(pl.col(end) / pl.col("baseline_mean") for end in ends))
    return pl.DataFrame({"n_pairs": n_pairs}).join(relative, on="n_pairs", how="left")


def _is_baseline(baseline: tuple[str, str]) -> pl.Expr:
    return (pl.col("method") == baseline[0]) & (pl.col("layer_choice") == baseline[1])


def _select(table: pl.DataFrame, task: str, metric: str, name: str) -> pl.DataFrame:
    rows = table.filter((pl.col("task") == task) & (pl.col("metric") == metric))
    if rows.is_empty():
        raise ValueError(f"{name} table has no rows for task {task!r}, metric {metric!r}")
    return rows.sort([*ENCODER_PAIR, *SERIES])


def _series_colours(rows: pl.DataFrame) -> dict[tuple[str, str], tuple[float, ...]]:
    """One colour per method (its layer choices share it and differ by line style)."""
    methods = rows["method"].unique().sort().to_list()
    palette = colormaps["tab10"]
    colour = {method: palette(i % palette.N) for i, method in enumerate(methods)}
    return {key: colour[key[0]] for key in rows.select(SERIES).unique().rows()}


def _line_style(choice: str) -> str:
    return {"last": "--", "best": "-"}.get(choice, ":")


def _panels(rows: pl.DataFrame) -> tuple[Figure, list[Axes]]:
    n = rows.select(ENCODER_PAIR).n_unique()
    fig = Figure(figsize=(PANEL_SIZE[0] * n + 2.5, PANEL_SIZE[1]), layout="constrained")
    return fig, list(fig.subplots(1, n, squeeze=False)[0])


def _n_pairs_ticks(ax: Axes, n_pairs: list[int]) -> None:
    ax.set_xticks(n_pairs, labels=[str(n) for n in n_pairs])
    ax.minorticks_off()


def _file_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    return Path(path)


def plot_segmentation_maps(
    images: list[np.ndarray],
    truths: list[np.ndarray],
    predictions: dict[str, list[np.ndarray]],
    classnames: list[str],
    title: str,
    path: str | os.PathLike[str],
    ignore_index: int = 255,
) -> Path:
    """One row per image: the image, its true mask, then each method's predicted label map
    (``predictions``: column title -> maps in the images' order), one colour per class and a
    legend (the background light grey); ignored pixels white."""
    palette = colormaps["tab10" if len(classnames) <= 11 else "tab20"]
    colours = np.array(
        [(0.82, 0.82, 0.82)] + [palette(i % palette.N)[:3] for i in range(len(classnames) - 1)]
    )  # class 0, the background, light grey

    def paint(labels: np.ndarray) -> np.ndarray:
        rgb = np.ones((*labels.shape, 3))
        known = labels != ignore_index
        rgb[known] = colours[np.clip(labels[known], 0, len(classnames) - 1)]
        return rgb

    columns = ["image", "truth", *predictions]
    fig = Figure(figsize=(2.4 * len(columns) + 1.8, 2.2 * len(images) + 0.8), layout="constrained")
    axes = fig.subplots(len(images), len(columns), squeeze=False)
    for row, (image, truth) in enumerate(zip(images, truths, strict=True)):
        panels = [image, paint(truth), *(paint(maps[row]) for maps in predictions.values())]
        for ax, panel, name in zip(axes[row], panels, columns, strict=True):
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name.replace(": ", ":\n", 1), fontsize="small")
    handles = [Patch(color=colours[i], label=name) for i, name in enumerate(classnames)]
    fig.legend(handles=handles, loc="outside right upper", fontsize="x-small")
    fig.suptitle(title, fontsize="small")
    return _save(fig, path)
