"""Similarity of every (vision layer, text layer) pair, read from two feature stores.

``compute_similarity`` returns the tidy similarity table (docs/formats.md):
``vision_encoder, text_encoder, vision_layer, text_layer, metric, value, n_samples,
sample_seed`` plus ``vision_layer_name, text_layer_name, metric_params``, the scoring
``pool_size`` and the calibration columns (``calibration.COLUMNS``), once per pool size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import polars as pl
import zarr

from pipeline.pairs import Pairs
from pipeline.similarity.calibration import (
    COLUMNS,
    CalibrationSettings,
    cka_replicates,
    draw_replicates,
    knn_replicates,
    summarise,
)
from pipeline.similarity.matrix import (
    DEFAULT_ACCUMULATOR_BYTES,
    DEFAULT_CHUNK_ROWS,
    centred_moments,
    layer_neighbours,
    linear_cka_matrix,
    minibatch_cka_matrix,
    mutual_knn_of_sets,
    unbiased_cka_matrix,
)
from pipeline.similarity.metrics import resolve_k
from pipeline.similarity.preprocess import preprocess_layers
from pipeline.stores.features import FeatureStore

METRICS = ("linear_cka", "unbiased_cka", "minibatch_cka", "mutual_knn")
DEFAULT_MINIBATCH_SIZE = 1000
FULL = "full"
NO_CALIBRATION = CalibrationSettings()


@dataclass(frozen=True)
class StoreRows:
    """Chosen rows of one store layer, as a row source: ``self[i]`` is ``array[rows[i]]``."""

    array: zarr.Array
    rows: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), self.array.shape[1])

    def __getitem__(self, index: slice | np.ndarray) -> np.ndarray:
        return self.array.oindex[self.rows[index], :]


def open_layers(path: Path, rows: np.ndarray) -> tuple[list[StoreRows], list[str]]:
    """Every layer of a complete feature store, restricted to ``rows``, and the layer names."""
    store = FeatureStore.open(path)
    if len(rows) and (rows.min() < 0 or rows.max() >= store.n_samples):
        raise ValueError(f"{path}: pair rows reach {rows.max()}, the store has {store.n_samples}")
    layers = [StoreRows(store.layer(i), rows) for i in range(store.num_layers)]
    return layers, store.layer_names


def similarity_table(
    scores: Mapping[str, np.ndarray],
    *,
    vision_encoder: str,
    text_encoder: str,
    vision_layer_names: Sequence[str],
    text_layer_names: Sequence[str],
    n_samples: int | Mapping[str, int],
    sample_seed: int,
    metric_params: Mapping[str, str] | None = None,
    pool_size: int | None = None,
    calibration: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> pl.DataFrame:
    """Tidy table, one row per (metric, vision layer, text layer), from (La, Lb) score arrays.

    ``pool_size`` defaults to the largest ``n_samples``; ``calibration[metric]`` holds the
    (La, Lb) arrays of ``calibration.COLUMNS`` (NaN where a metric has none).
    """
    if pool_size is None:
        pool_size = n_samples if isinstance(n_samples, int) else max(n_samples.values())
    frames = []
    for metric, values in scores.items():
        expected = (len(vision_layer_names), len(text_layer_names))
        if values.shape != expected:
            raise ValueError(f"{metric}: scores have shape {values.shape}, expected {expected}")
        vision_layer, text_layer = np.indices(expected).reshape(2, -1)
        count = n_samples if isinstance(n_samples, int) else n_samples[metric]
        frame = pl.DataFrame(
            {
                "vision_encoder": vision_encoder,
                "text_encoder": text_encoder,
                "vision_layer": vision_layer,
                "text_layer": text_layer,
                "metric": metric,
                "value": values.ravel().astype(np.float64),
                "n_samples": count,
                "sample_seed": sample_seed,
                "vision_layer_name": np.asarray(vision_layer_names, dtype=str)[vision_layer],
                "text_layer_name": np.asarray(text_layer_names, dtype=str)[text_layer],
                "metric_params": (metric_params or {}).get(metric, ""),
                "pool_size": pool_size,
                **{
                    column: np.ravel((calibration or {}).get(metric, {}).get(column, np.nan))
                    * np.ones(len(vision_layer))
                    for column in COLUMNS
                },
            }
        )
        frames.append(frame)
    table = pl.concat(frames)
    integer_columns = ["vision_layer", "text_layer", "n_samples", "sample_seed", "pool_size"]
    return table.with_columns(pl.col(integer_columns).cast(pl.Int64))


def pool_sizes_of(sizes: Sequence[int | str], n: int) -> list[int]:
    """``similarity.pool_sizes`` clipped to the pool's n pairs, largest first (``full`` = n)."""
    resolved = {n if size == FULL else int(size) for size in sizes} | {n}
    if min(resolved) < 4:
        raise ValueError(f"config key 'similarity.pool_sizes': sizes must be >= 4, got {sizes}")
    return sorted((size for size in resolved if size <= n), reverse=True)


def compute_similarity(
    vision_store: Path,
    text_store: Path,
    pairs: Pairs,
    metrics: Sequence[str],
    knn_k: int | str,
    vision_encoder: str,
    text_encoder: str,
    sample_seed: int,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    minibatch_size: int = DEFAULT_MINIBATCH_SIZE,
    max_accumulator_bytes: int = DEFAULT_ACCUMULATOR_BYTES,
    progress: bool = True,
    pool_sizes: Sequence[int | str] = (FULL,),
    preprocess: str = "none",
    calibration: CalibrationSettings = NO_CALIBRATION,
) -> pl.DataFrame:
    """Every requested metric for every (vision layer, text layer) pair on the given pairs.

    ``pairs`` are the scoring pairs in their drawn order (see ``selection.scoring_pairs``);
    each size of ``pool_sizes`` (``pool_sizes_of``) scores the first that many, so smaller
    pools are nested random subsets of the larger ones, and the full pool's rows come first.
    Linear and unbiased CKA stream over ``chunk_rows`` pairs at a time; mutual kNN holds one
    layer's rows at a time; minibatch CKA reads one batch of ``minibatch_size`` (capped at
    the number of pairs) with ``sample_seed`` choosing the batches. ``n_samples`` records
    how many pairs each metric used (minibatch CKA drops the remainder of n / batch size).
    Features go through ``preprocess`` (``preprocess.PREPROCESS``) before every metric;
    ``calibration`` sets the permutation null and the bootstrap (``calibration.py``).
    """
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown or not metrics:
        raise ValueError(f"unknown similarity metrics {unknown or metrics}; choose from {METRICS}")
    if len(pairs) < 4:
        raise ValueError(f"need at least 4 scoring pairs, got {len(pairs)}")
    scoring = PoolScoring(
        metrics=tuple(metrics),
        knn_k=knn_k,
        vision_encoder=vision_encoder,
        text_encoder=text_encoder,
        sample_seed=sample_seed,
        chunk_rows=chunk_rows,
        minibatch_size=minibatch_size,
        max_accumulator_bytes=max_accumulator_bytes,
        progress=progress,
        preprocess=preprocess,
        calibration=calibration,
    )
    stores = Path(vision_store), Path(text_store)
    tables = []
    for m in pool_sizes_of(pool_sizes, len(pairs)):
        # Sub-pools show how values and choices move with n; they carry the null only when
        # the choice needs it (a calibrated selection), which keeps their cost small.
        raw_only = m < len(pairs) and calibration.statistic == "raw"
        pool = replace(scoring, calibration=NO_CALIBRATION) if raw_only else scoring
        tables.append(pool.score(*stores, pairs.take(np.arange(m))))
    return pl.concat(tables)


@dataclass(frozen=True)
class PoolScoring:
    """``compute_similarity``'s settings, fixed once and applied to each pool size."""

    metrics: tuple[str, ...]
    knn_k: int | str
    vision_encoder: str
    text_encoder: str
    sample_seed: int
    chunk_rows: int
    minibatch_size: int
    max_accumulator_bytes: int
    progress: bool
    preprocess: str
    calibration: CalibrationSettings

    def score(self, vision_store: Path, text_store: Path, pairs: Pairs) -> pl.DataFrame:
        """The table of one pool."""
        pairs = pairs.take(np.argsort(pairs.image_rows, kind="stable"))  # sequential store reads
        vision, vision_names = open_layers(vision_store, pairs.image_rows)
        text, text_names = open_layers(text_store, pairs.caption_rows)
        vision = preprocess_layers(vision, self.preprocess, self.chunk_rows)
        text = preprocess_layers(text, self.preprocess, self.chunk_rows)
        n = len(pairs)
        replicates = draw_replicates(pairs.image_rows, self.calibration, self.sample_seed)
        calibrate = bool(self.calibration.permutations or self.calibration.bootstrap)
        scores: dict[str, np.ndarray] = {}
        replicated: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        n_samples = dict.fromkeys(self.metrics, n)
        params: dict[str, str] = {}
        if {"linear_cka", "unbiased_cka"} & set(self.metrics):
            moments = centred_moments(
                vision, text, self.chunk_rows, self.max_accumulator_bytes, self.progress
            )
            if "linear_cka" in self.metrics:
                scores["linear_cka"] = linear_cka_matrix(moments)
            if "unbiased_cka" in self.metrics:
                scores["unbiased_cka"] = unbiased_cka_matrix(moments)
            if calibrate:
                replicated |= cka_replicates(vision, text, replicates, self.progress)
        if "minibatch_cka" in self.metrics:
            batch_size = min(self.minibatch_size, n)
            scores["minibatch_cka"] = minibatch_cka_matrix(
                vision,
                text,
                batch_size,
                self.sample_seed,
                self.max_accumulator_bytes,
                self.progress,
            )
            n_samples["minibatch_cka"] = n // batch_size * batch_size
            params["minibatch_cka"] = f"batch_size={batch_size},batches={n // batch_size}"
        if "mutual_knn" in self.metrics:
            k = resolve_k(self.knn_k, n)
            vision_sets = layer_neighbours(vision, k, "vision", self.progress)
            text_sets = layer_neighbours(text, k, "text", self.progress)
            scores["mutual_knn"] = mutual_knn_of_sets(vision_sets, text_sets)
            params["mutual_knn"] = f"k={k}"
            if calibrate:
                replicated["mutual_knn"] = knn_replicates(vision_sets, text_sets, replicates)
        return similarity_table(
            {metric: scores[metric] for metric in self.metrics},
            vision_encoder=self.vision_encoder,
            text_encoder=self.text_encoder,
            vision_layer_names=vision_names,
            text_layer_names=text_names,
            n_samples=n_samples,
            sample_seed=self.sample_seed,
            metric_params=params,
            pool_size=n,
            calibration={
                metric: summarise(scores[metric], *replicated[metric], self.calibration)
                for metric in replicated
                if metric in self.metrics
            },
        )
