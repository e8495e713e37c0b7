"""The aligner interface, its fit report, and the closed-form aligners' shared fit.

An aligner maps image features x (n, d1) and text features y (n, d2) of the same pairs into a
shared space. ``pipeline.align.kinds.build_aligner(kind, params)`` makes an unfitted one from
its config section; ``fit`` learns (or computes) the map; ``state`` holds every array needed to
embed again, so an artifact (``pipeline.align.artifacts``) can rebuild it with ``load_state``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import polars as pl

from pipeline.align.params import params_to_dict

CURVE_SCHEMA: dict[str, pl.DataType] = {
    "epoch": pl.Int64(),
    "step": pl.Int64(),
    "lr": pl.Float64(),
    "structure_lambda": pl.Float64(),
    "train_loss": pl.Float64(),
    "infonce": pl.Float64(),
    "structure": pl.Float64(),
    "val_loss": pl.Float64(),
    "seconds": pl.Float64(),
}
"""Columns of a training curve, one row per epoch: ``step`` and ``lr`` after its last step,
``structure_lambda`` (lambda_t) at its last step, pair-weighted means of the total loss, InfoNCE
and R_S over its batches, the validation InfoNCE (null without validation pairs; null columns
without STRUCTURE), and its wall-clock seconds."""


def empty_curve() -> pl.DataFrame:
    """The curve of a closed-form method: no rows, the training-curve schema."""
    return pl.DataFrame(schema=CURVE_SCHEMA)


@dataclass
class FitReport:
    """What a fit produced besides the aligner's state.

    ``chosen_epoch``: the (1-based) epoch whose weights were kept, None for closed-form methods.
    ``curve``: one row per epoch with the ``CURVE_SCHEMA`` columns.
    ``extra``: JSON-able facts about the fit (sizes, stopping reason, seconds...).
    """

    chosen_epoch: int | None
    curve: pl.DataFrame = field(default_factory=empty_curve)
    extra: dict[str, Any] = field(default_factory=dict)


def check_features(name: str, a: np.ndarray, width: int | None = None) -> np.ndarray:
    """``a`` as a finite 2-D float64 array, optionally of a given width; else a ValueError."""
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (n, dim) array, got shape {a.shape}")
    if width is not None and a.shape[1] != width:
        raise ValueError(f"{name}: expected width {width} (as fitted), got {a.shape[1]}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return a.astype(np.float64, copy=False)


def check_pairs(x: np.ndarray, y: np.ndarray, what: str = "training") -> tuple[np.ndarray, ...]:
    """Image and text features of the same pairs, as float64; else a ValueError naming why."""
    x, y = check_features(f"{what} image features", x), check_features(f"{what} text features", y)
    check_pair_count(len(x), len(y), what)
    return x, y


def check_pair_count(image_rows: int, text_rows: int, what: str) -> None:
    """A ValueError unless both sides hold the same number (>= 2) of pairs."""
    if image_rows != text_rows:
        raise ValueError(f"{what} pairs: {image_rows} image rows but {text_rows} text rows")
    if image_rows < 2:
        raise ValueError(f"{what} pairs: need at least 2 pairs, got {image_rows}")


class Aligner(ABC):
    """A map of both modalities into a shared space; see the module docstring."""

    kind: ClassVar[str]  # the aligner kind (``align.methods.<name>.aligner``, ``kinds.KINDS``)
    scores_patches: ClassVar[bool] = False  # scores patch tokens itself (``patch_scores``)

    def __init__(self, params: Any) -> None:
        self.params = params
        self.choices: dict[str, Any] = {}  # data-dependent choices of the last fit, JSON-able

    @abstractmethod
    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        x_val: np.ndarray | None,
        y_val: np.ndarray | None,
        seed: int,
    ) -> FitReport:
        """Fit on pairs (x[i], y[i]); validation pairs, when given, drive early stopping."""

    @abstractmethod
    def embed_image(self, x: np.ndarray) -> np.ndarray:
        """(n, k) float32 image embeddings in the shared space, L2-normalised rows."""

    @abstractmethod
    def embed_text(self, y: np.ndarray) -> np.ndarray:
        """(n, k) float32 text embeddings in the shared space, L2-normalised rows."""

    def similarity(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        """(n_img, n_txt) scores; cosine (inner product of normalised rows) by default."""
        return image_emb @ text_emb.T

    def patch_scores(self, patch_tokens: np.ndarray) -> np.ndarray:
        """(..., P, K) float32 scores of patch tokens (..., P, D) in the shared space, no
        pooling, for the kinds whose ``scores_patches`` is true (segmentation)."""
        raise NotImplementedError(f"{self.kind} aligner does not score patch tokens")

    @abstractmethod
    def state(self) -> dict[str, np.ndarray]:
        """Every array needed to embed (weights, means, anchors...)."""

    @abstractmethod
    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Make this (unfitted) aligner equal to the one whose ``state()`` this is."""

    def hyperparameters(self) -> dict[str, Any]:
        """The resolved params (every key ``build_aligner`` accepts) plus ``fitted``: the
        data-dependent choices of the fit (e.g. a dimension reduction)."""
        return {**params_to_dict(self.params), "fitted": dict(self.choices)}

    def _require_fitted(self, ready: bool) -> None:
        if not ready:
            raise RuntimeError(f"{self.kind} aligner is not fitted (call fit or load_state)")


class ClosedFormAligner(Aligner):
    """An aligner whose whole state is a few named arrays (``STATE_KEYS``) computed from the
    training pairs by ``solve``; validation pairs and seed are not used."""

    STATE_KEYS: ClassVar[tuple[str, ...]]

    def __init__(self, params: Any) -> None:
        super().__init__(params)
        self.arrays: dict[str, np.ndarray] = {}

    @abstractmethod
    def solve(self, x: np.ndarray, y: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The state arrays and the fit's data-dependent choices from float64 pairs."""

    @abstractmethod
    def embed(self, a: np.ndarray, side: str) -> np.ndarray:
        """(n, k) float32 unit embeddings of features ``a`` of ``side`` ("image" or "text"),
        checked as ``f"{side} features"``."""

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        x_val: np.ndarray | None,
        y_val: np.ndarray | None,
        seed: int,
    ) -> FitReport:
        """Closed form on the training pairs; validation pairs and seed are not used."""
        x, y = check_pairs(x, y)
        self.arrays, self.choices = self.solve(x, y)
        return FitReport(chosen_epoch=None, extra={"n_train": len(x)})

    def embed_image(self, x: np.ndarray) -> np.ndarray:
        return self.embed(x, "image")

    def embed_text(self, y: np.ndarray) -> np.ndarray:
        return self.embed(y, "text")

    def fitted(self) -> dict[str, np.ndarray]:
        """The state arrays; a RuntimeError before ``fit`` or ``load_state``."""
        self._require_fitted(bool(self.arrays))
        return self.arrays

    def state(self) -> dict[str, np.ndarray]:
        return dict(self.fitted())

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.arrays = state_arrays(self.kind, state, self.STATE_KEYS)


def state_arrays(kind: str, state: dict[str, np.ndarray], keys: tuple[str, ...]) -> dict:
    """The named arrays of a saved state; a ValueError names a missing or unexpected key."""
    missing, extra = set(keys) - set(state), set(state) - set(keys)
    if missing or extra:
        raise ValueError(
            f"{kind} state: missing keys {sorted(missing)}, unexpected keys {sorted(extra)}"
        )
    return {key: np.asarray(state[key]) for key in keys}
