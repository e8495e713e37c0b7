"""Feature preprocessing applied before every metric (``similarity.preprocess``).

- ``none``: the stored features as they are.
- ``structure``: the STRUCTURE authors' layer scoring (after the platonic-representation
  code): one threshold per encoder, the mean over the scored samples of each sample's
  0.95 quantile of |value| over all of its stored layers' values; every value is clamped
  to [-t, t], then each layer's rows are L2-normalised. An outlier dimension of large
  magnitude (common in ViTs) then no longer dominates CKA's Gram matrices.

The preprocessed layers are row sources again, so every metric, the null and the bootstrap
see the same features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.linalg import l2_normalise
from pipeline.similarity.matrix import RowSource

PREPROCESS = ("none", "structure")
STRUCTURE_QUANTILE = 0.95


def outlier_threshold(layers: Sequence[RowSource], q: float, chunk_rows: int) -> float:
    """Mean over samples of the q-quantile of |value| over all layers' values of the sample."""
    n = layers[0].shape[0]
    total = 0.0
    for start in range(0, n, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n))
        values = np.abs(np.concatenate([np.asarray(layer[rows]) for layer in layers], axis=1))
        total += float(np.quantile(values.astype(np.float64), q, axis=1).sum())
    return total / n


@dataclass(frozen=True)
class ClampedRows:
    """Rows of ``source`` clamped to [-threshold, threshold] and L2-normalised (float64)."""

    source: RowSource
    threshold: float

    @property
    def shape(self) -> tuple[int, ...]:
        return self.source.shape

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        values = np.asarray(self.source[rows], dtype=np.float64)
        return l2_normalise(np.clip(values, -self.threshold, self.threshold))


def preprocess_layers(layers: Sequence[RowSource], method: str, chunk_rows: int) -> list[RowSource]:
    """One encoder's layers under ``method`` (module docstring)."""
    if method == "none":
        return list(layers)
    if method == "structure":
        threshold = outlier_threshold(layers, STRUCTURE_QUANTILE, chunk_rows)
        return [ClampedRows(layer, threshold) for layer in layers]
    raise ValueError(f"config key 'similarity.preprocess': {method!r} is not one of {PREPROCESS}")
