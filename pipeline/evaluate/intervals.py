"""Confidence intervals of the tables: over seeds and over test images (docs/formats.md).

Two sources of noise, two intervals:
- over seeds (training noise): the t-interval of a mean over seeds, mean +- t * s / sqrt(n)
  with t the (1 + level) / 2 quantile of Student's t with n - 1 degrees of freedom (none
  with one seed). A paired difference per seed gets the t-interval of the differences.
- over test images (test-set noise): a percentile bootstrap that resamples the test images
  with replacement, each bringing all its items (its captions for text-to-image retrieval):
  the images are the sampled units, captions of one image are not independent.

A bootstrappable metric is a mean of per-item hits (top-k accuracy, Recall@k) or a mean over
classes of the per-class mean hit (balanced accuracy): ``Hits`` holds the hits, the image of
each item and its class. A replicate weights each item by how often its image was drawn, so
all B replicates are one matrix product (counts of each image per replicate times per-image
sums of hits and items), equal to the metric recomputed on the resampled items (tests check
it). The draws depend only on the seed and the number of images, so every run of a task sees
the same resampled test sets and the difference of two runs is paired over images as well as
over seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Statistics:
    """The ``statistics`` config section: bootstrap replicates (0: no image bootstrap), the
    intervals' level and the bootstrap's seed."""

    bootstrap: int = 1000
    level: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        if self.bootstrap < 0:
            raise ValueError(f"statistics.bootstrap must be >= 0, got {self.bootstrap}")
        if not 0 < self.level < 1:
            raise ValueError(f"statistics.level must lie in (0, 1), got {self.level}")


@dataclass(frozen=True)
class Hits:
    """Per-item outcomes of one metric: ``hit[i]`` (bool), the test image ``unit[i]`` item i
    belongs to (the unit of resampling) and, for a class-balanced mean, its class
    ``stratum[i]`` (None: a plain mean over items)."""

    hit: np.ndarray
    unit: np.ndarray
    stratum: np.ndarray | None = None

    def value(self) -> float:
        """The metric: the mean hit, or the mean over the classes present of their mean hit."""
        hit = np.asarray(self.hit, dtype=bool)
        if len(hit) == 0:
            raise ValueError("a metric needs at least one item")
        if self.stratum is None:
            return float(np.mean(hit))
        present, class_of = np.unique(self.stratum, return_inverse=True)
        hits = np.bincount(class_of, weights=hit.astype(np.float64), minlength=len(present))
        return float(np.mean(hits / np.bincount(class_of, minlength=len(present))))


def seed_interval(values: np.ndarray, level: float) -> tuple[float, float] | None:
    """The t-interval of the mean of ``values`` (one per seed); None with fewer than two."""
    from scipy.stats import t as student_t  # scipy is slow to import: only the aggregate needs it

    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n < 2:
        return None
    half = student_t.ppf((1 + level) / 2, n - 1) * values.std(ddof=1) / np.sqrt(n)
    mean = values.mean()
    return float(mean - half), float(mean + half)


def resample_draws(n_units: int, replicates: int, seed: int) -> np.ndarray:
    """(replicates, n_units) indices of the units drawn, with replacement, per replicate."""
    if n_units < 1:
        raise ValueError("a bootstrap needs at least one unit")
    return np.random.default_rng(seed).integers(0, n_units, size=(replicates, n_units))


def resample_counts(draws: np.ndarray) -> np.ndarray:
    """(replicates, n_units) float64: how often each unit is drawn in each replicate."""
    replicates, n_units = draws.shape
    offsets = draws + n_units * np.arange(replicates)[:, None]
    counts = np.bincount(offsets.ravel(), minlength=replicates * n_units)
    return counts.reshape(replicates, n_units).astype(np.float64)


def replicates(hits: Hits, units: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The metric on every bootstrap replicate (``counts`` over the sorted ``units``)."""
    index = np.searchsorted(units, hits.unit)
    if (index >= len(units)).any() or (units[np.minimum(index, len(units) - 1)] != hits.unit).any():
        raise ValueError("an item's image is not among the bootstrap's units")
    stratum = np.zeros(len(hits.hit), np.int64) if hits.stratum is None else hits.stratum
    _, class_of = np.unique(stratum, return_inverse=True)
    n_classes = int(class_of.max()) + 1
    hit_sum = np.zeros((len(units), n_classes))
    item_sum = np.zeros((len(units), n_classes))
    np.add.at(hit_sum, (index, class_of), np.asarray(hits.hit, np.float64))
    np.add.at(item_sum, (index, class_of), 1.0)
    drawn_hits, drawn_items = counts @ hit_sum, counts @ item_sum
    present = drawn_items > 0
    ratio = np.divide(drawn_hits, drawn_items, out=np.zeros_like(drawn_hits), where=present)
    if hits.stratum is None:
        return ratio[:, 0]
    return ratio.sum(axis=1) / present.sum(axis=1)


def percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    """The central ``level`` percentile interval of bootstrap replicates."""
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def excludes_zero(interval: tuple[float, float] | None) -> bool | None:
    """Whether an interval lies wholly above or below zero (None without an interval)."""
    return None if interval is None else bool(interval[0] > 0 or interval[1] < 0)
