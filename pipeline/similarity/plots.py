"""Figures of a similarity table: per metric a heatmap (vision layers down, text layers
across) of the largest pool, and one figure of every metric against the pool size.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend
state) and written atomically.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.atomic import atomic_path
from pipeline.similarity.selection import largest_pool

CHOICE_MARKERS = ("*", "o", "s", "D", "^", "v", "P", "X")


def score_grid(table: pl.DataFrame, metric: str) -> np.ndarray:
    """The (vision layers, text layers) array of one metric's scores on the largest pool
    (NaN where absent)."""
    scored = largest_pool(table).filter(pl.col("metric") == metric)
    if scored.is_empty():
        raise ValueError(f"metric {metric!r} is not in the similarity table")
    if scored.select(["vision_layer", "text_layer"]).is_duplicated().any():
        raise ValueError(f"metric {metric!r} scores some layer pair more than once")
    vision, text = scored["vision_layer"].to_numpy(), scored["text_layer"].to_numpy()
    grid = np.full((vision.max() + 1, text.max() + 1), np.nan)
    grid[vision, text] = scored["value"].to_numpy()
    return grid


def write_heatmap(
    table: pl.DataFrame,
    metric: str,
    path: str | os.PathLike[str],
    choice: dict[str, Any] | None = None,
) -> None:
    """PNG heatmap of ``metric`` with a colour bar, marking the layers of a ``select_layers``
    result (labelled with the score of the metric that chose them)."""
    grid = score_grid(table, metric)
    scored = largest_pool(table).filter(pl.col("metric") == metric)
    figure = Figure(figsize=(1.5 + 0.35 * grid.shape[1], 1.2 + 0.3 * grid.shape[0]))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
    figure.colorbar(image, ax=axes, label=metric)
    axes.set_xlabel(f"text layer ({scored['text_encoder'][0]})")
    axes.set_ylabel(f"vision layer ({scored['vision_encoder'][0]})")
    axes.set_xticks(range(grid.shape[1]))
    axes.set_yticks(range(grid.shape[0]))
    axes.set_title(
        f"{metric}, n={scored['n_samples'][0]}, seed={scored['sample_seed'][0]}", fontsize=9
    )
    choices = (choice or {}).get("choices", {})
    chosen_by = (choice or {}).get("metric", "")
    for (name, picked), marker in zip(choices.items(), CHOICE_MARKERS, strict=False):
        axes.scatter(
            picked["text_layer"],
            picked["vision_layer"],
            marker=marker,
            s=90,
            facecolors="none",
            edgecolors="red",
            linewidths=1.5,
            label=f"{name} ({chosen_by} {picked['score']:.3f})",
        )
    if choices:
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.25, 1.0))
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def _error_bars(rows: pl.DataFrame) -> np.ndarray:
    """(2, N) distances from each value to its bootstrap interval (0 where it has none)."""
    low, high, value = (rows[c].to_numpy() for c in ("ci_low", "ci_high", "value"))
    return np.nan_to_num(np.clip(np.stack([value - low, high - value]), 0.0, None))


def write_pool_size_plot(
    table: pl.DataFrame, path: str | os.PathLike[str], statistic: str = "raw"
) -> None:
    """PNG with one panel per metric: against the pool size n, the value of the best layer
    pair at each n (by ``statistic``, labelled v<vision>/t<text>) and of the last pair, with
    their bootstrap intervals where the table has them."""
    column = "value" if statistic == "raw" else "calibrated"
    metrics = table["metric"].unique(maintain_order=True).to_list()
    figure = Figure(figsize=(4.2 * len(metrics), 3.4))
    FigureCanvasAgg(figure)
    for index, metric in enumerate(metrics):
        axes = figure.add_subplot(1, len(metrics), index + 1)
        scored = table.filter(pl.col("metric") == metric)
        last = scored.filter(
            (pl.col("vision_layer") == pl.col("vision_layer").max())
            & (pl.col("text_layer") == pl.col("text_layer").max())
        ).sort("pool_size")
        best = (
            scored.sort([column, "vision_layer", "text_layer"], descending=[True, False, False])
            .group_by("pool_size", maintain_order=True)
            .first()
            .sort("pool_size")
        )
        for rows, label, marker in ((best, "best at n", "o"), (last, "last", "s")):
            axes.errorbar(
                rows["pool_size"].to_numpy(),
                rows["value"].to_numpy(),
                yerr=_error_bars(rows),
                marker=marker,
                capsize=3,
                label=label,
            )
        for row in best.iter_rows(named=True):
            axes.annotate(
                f"v{row['vision_layer']}/t{row['text_layer']}",
                (row["pool_size"], row["value"]),
                textcoords="offset points",
                xytext=(3, 5),
                fontsize=7,
            )
        sizes = best["pool_size"].to_list()
        axes.set_xscale("log")
        axes.set_xticks(sizes, [str(size) for size in sizes])
        axes.minorticks_off()
        axes.set(xlabel="scoring pairs n", ylabel=metric, title=f"{metric} (best by {statistic})")
        axes.legend(fontsize=7)
    figure.suptitle(
        f"{table['vision_encoder'][0]} x {table['text_encoder'][0]}: similarity against n",
        fontsize=9,
    )
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
