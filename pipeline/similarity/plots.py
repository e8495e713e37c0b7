"""Heatmaps of a similarity table: vision layers down, text layers across, one per metric.

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

CHOICE_MARKERS = ("*", "o", "s", "D", "^", "v", "P", "X")


def score_grid(table: pl.DataFrame, metric: str) -> np.ndarray:
    """The (vision layers, text layers) array of one metric's scores (NaN where absent)."""
    scored = table.filter(pl.col("metric") == metric)
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
    scored = table.filter(pl.col("metric") == metric)
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
