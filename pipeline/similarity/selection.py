"""Which pairs score the layers, and which layer pair each layer choice takes.

Scoring sample (``scoring_pairs``), one caption per image either way:
- ``"pool"``: a fixed pool of up to ``pool_size`` pairs drawn with ``seed`` (as the
  STRUCTURE code does with 5000 training pairs), the same for every run;
- ``"run"``: only the pairs the (``n_pairs``, ``seed``) run may train on, i.e. the nested
  subset of ``pipeline.pairs``, so a run never picks layers with more pairs than it has
  (docs/protocols.md). It is also capped at ``pool_size``.

Layer choice (``select_layers``), on the rows of the table's largest pool: ``last`` (the
last layer of each encoder), ``best`` (the pair with the highest score; ties go to the
lowest vision layer, then the lowest text layer) and optional quantiles ``q<q>``: the pair
at rank round(q (N-1)) of the N pairs ordered by score, in the same order whose top is
``best`` (so ``q1`` is ``best``). The score is the raw value or the calibrated score
(``similarity.selection``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.atomic import write_json
from pipeline.pairs import GridRun, Pairs, nested_subset, subset_order

SCORING_MODES = ("pool", "run")


def scoring_pairs(
    pairs: Pairs, mode: str, pool_size: int, seed: int, n_pairs: int | None = None
) -> Pairs:
    """The pairs that score layer similarity (module docstring).

    ``n_pairs`` is the run's data size in "run" mode (None: all pairs); "pool" ignores it.
    """
    if pool_size < 1:
        raise ValueError(f"scoring pool_size must be >= 1, got {pool_size}")
    if mode == "pool":
        candidates = pairs.take(subset_order(len(pairs), seed))
    elif mode == "run":
        candidates = pairs.take(nested_subset(len(pairs), n_pairs, seed))
    else:
        raise ValueError(f"unknown scoring mode {mode!r}; choose from {SCORING_MODES}")
    unique = candidates.one_caption_per_image()
    return unique.take(np.arange(min(pool_size, len(unique))))


CALIBRATION_KEYS = ("calibrated", "p_value", "p_value_max", "ci_low", "ci_high")


def largest_pool(table: pl.DataFrame) -> pl.DataFrame:
    """The rows of the largest scoring pool (all rows of a table without ``pool_size``)."""
    if "pool_size" not in table.columns:
        return table
    return table.filter(pl.col("pool_size") == pl.col("pool_size").max())


def _single_value(table: pl.DataFrame, column: str) -> Any:
    values = table[column].unique().to_list()
    if len(values) != 1:
        raise ValueError(f"the similarity table mixes several {column} values: {values}")
    return values[0]


def _number(value: Any) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _pick(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("vision_layer", "text_layer", "vision_layer_name", "text_layer_name")
    choice = {key: row[key] for key in keys if key in row}
    calibration = {key: _number(row[key]) for key in CALIBRATION_KEYS if key in row}
    return {**choice, "score": row["value"], **calibration}


def _best_vs_last(best: dict[str, Any]) -> dict[str, Any] | None:
    """The paired bootstrap interval of statistic(best) - statistic(last), if the table has it."""
    low, high = _number(best.get("vs_last_low")), _number(best.get("vs_last_high"))
    if low is None or high is None:
        return None
    return {"ci_low": low, "ci_high": high, "distinguishable": low > 0 or high < 0}


def _ranked(scored: pl.DataFrame, column: str) -> list[dict[str, Any]]:
    """Best first: highest ``column``, ties to the lowest vision then text layer."""
    order = scored.sort([column, "vision_layer", "text_layer"], descending=[True, False, False])
    return order.rows(named=True)


def select_layers(
    table: pl.DataFrame,
    metric: str,
    quantile_bins: Sequence[float] | None = None,
    statistic: str = "raw",
) -> dict[str, Any]:
    """Layer choices of one encoder pair from its similarity table, scored by ``metric``.

    Returns ``metric, vision_encoder, text_encoder, n_samples, sample_seed, selection``
    (``statistic``: ranking by ``value`` or by ``calibrated``) and ``choices``:
    ``{"last": ..., "best": ..., "q0.5": ...}``, each with ``vision_layer``, ``text_layer``
    (and their names when the table has them), the ``score`` (the raw value) and, when the
    table has them, ``calibrated, p_value, p_value_max, ci_low, ci_high``. With calibration
    columns it also holds ``best_vs_last`` and ``by_pool_size``: the best pair of every
    pool size of the table, smallest first.
    """
    available = table["metric"].unique().sort().to_list()
    if metric not in available:
        raise ValueError(f"metric {metric!r} is not in the similarity table ({available})")
    column = {"raw": "value", "calibrated": "calibrated"}.get(statistic)
    if column is None or column not in table.columns:
        raise ValueError(f"similarity.selection {statistic!r} has no column in the table")
    every_pool = table.filter(pl.col("metric") == metric)
    scored = largest_pool(every_pool)
    header = {
        column: _single_value(scored, column)
        for column in ("vision_encoder", "text_encoder", "n_samples", "sample_seed")
    }
    if scored[column].is_nan().any() or scored[column].is_null().any():
        raise ValueError(f"metric {metric!r} has missing or NaN scores ({column})")
    if scored.select(["vision_layer", "text_layer"]).is_duplicated().any():
        raise ValueError(f"metric {metric!r} scores some layer pair more than once")
    ranked = _ranked(scored, column)
    last_vision, last_text = scored["vision_layer"].max(), scored["text_layer"].max()
    last = [r for r in ranked if (r["vision_layer"], r["text_layer"]) == (last_vision, last_text)]
    if not last:
        raise ValueError(f"metric {metric!r} has no score for the last layers")
    choices = {"last": _pick(last[0]), "best": _pick(ranked[0])}
    for q in quantile_bins or ():
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile {q} is outside [0, 1]")
        rank = math.floor(q * (len(ranked) - 1) + 0.5)  # position in ascending score order
        choices[f"q{q:g}"] = {**_pick(ranked[len(ranked) - 1 - rank]), "quantile": q}
    choice = {"metric": metric, **header, "selection": statistic, "choices": choices}
    if "pool_size" in table.columns:
        choice["best_vs_last"] = _best_vs_last(ranked[0])
        choice["by_pool_size"] = [
            {"pool_size": size, **_pick(_ranked(rows, column)[0])}
            for (size,), rows in sorted(every_pool.group_by(["pool_size"]))
        ]
    return choice


def write_layer_choice(path: str | os.PathLike[str], choice: dict[str, Any]) -> None:
    """Write ``layers.json``: a ``select_layers`` result plus ``scope`` and, for ``scope: run``,
    ``runs``: the choice of each grid run by its name (``pipeline.pairs.run_name``)."""
    write_json(path, choice)


def read_layer_choice(path: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def chosen_layers(layers: dict[str, Any], choice: str, run: GridRun) -> dict[str, Any]:
    """The (vision_layer, text_layer, score) that ``run`` aligns under ``choice``."""
    source = layers["runs"][run.name] if layers.get("scope") == "run" else layers
    if choice not in source["choices"]:
        raise ValueError(
            f"layer choice {choice!r} is not in layers.json (has {sorted(source['choices'])}); "
            "quantile choices need similarity.quantile_bins"
        )
    return source["choices"][choice]
