"""Closed-form linear baselines: ``procrustes`` (orthogonal map) and ``ridge`` (regression map).

Both first L2-normalise each feature row (the geometry the other methods score in) and centre
it with the training mean; all fitting is in float64.

- ``procrustes``: each side is projected onto its top ``dim`` principal components (default
  min(d1, d2, n - 1): centred data of n rows has rank at most n - 1), then the orthogonal
  W = U V^T from the SVD U S V^T of Xp^T Yp maps image coordinates onto text coordinates.
  Image embedding: Xp W; text embedding: Yp.
- ``ridge``: W = (X^T X + alpha I)^(-1) X^T Y maps image features into the text feature space.
  Image embedding: X W; text embedding: Y.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np

from pipeline.align.base import (
    ClosedFormAligner,
    FitReport,
    check_features,
    check_pairs,
    register,
)
from pipeline.align.csa import principal_axes
from pipeline.align.params import ProcrustesParams, RidgeParams
from pipeline.linalg import l2_normalise

STATE_KEYS = ("image_mean", "text_mean", "image_map", "text_map")


def orthogonal_map(xp: np.ndarray, yp: np.ndarray) -> np.ndarray:
    """The orthogonal W minimising ||Xp W - Yp||_F: U V^T from the SVD of Xp^T Yp."""
    u, _, vt = np.linalg.svd(xp.T @ yp)
    return u @ vt


def ridge_map(xc: np.ndarray, yc: np.ndarray, alpha: float) -> np.ndarray:
    """W = (X^T X + alpha I)^(-1) X^T Y, solved (not inverted) in float64."""
    gram = xc.T @ xc + alpha * np.eye(xc.shape[1])
    return np.linalg.solve(gram, xc.T @ yc)


class LinearMapAligner(ClosedFormAligner):
    """Row-normalise, centre, then a linear map per modality (``image_map``, ``text_map``)."""

    STATE_KEYS = STATE_KEYS

    @abstractmethod
    def maps(self, xc: np.ndarray, yc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(image_map, text_map) fitted on centred unit rows."""

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
        x, y = l2_normalise(x), l2_normalise(y)
        means = x.mean(axis=0), y.mean(axis=0)
        image_map, text_map = self.maps(x - means[0], y - means[1])
        self.arrays = dict(zip(STATE_KEYS, (*means, image_map, text_map), strict=True))
        return FitReport(chosen_epoch=None, extra={"n_train": len(x)})

    def _embed(self, a: np.ndarray, side: str, name: str) -> np.ndarray:
        arrays = self.fitted()
        a = check_features(name, a, len(arrays[f"{side}_mean"]))
        coords = (l2_normalise(a) - arrays[f"{side}_mean"]) @ arrays[f"{side}_map"]
        return l2_normalise(coords).astype(np.float32)

    def embed_image(self, x: np.ndarray) -> np.ndarray:
        return self._embed(x, "image", "image features")

    def embed_text(self, y: np.ndarray) -> np.ndarray:
        return self._embed(y, "text", "text features")


@register
class ProcrustesAligner(LinearMapAligner):
    """Common-width PCA of each side, then the orthogonal map from image to text."""

    kind = "procrustes"
    Params = ProcrustesParams
    params: ProcrustesParams

    def maps(self, xc: np.ndarray, yc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = min(xc.shape[1], yc.shape[1], len(xc) - 1)
        k = min(self.params.dim or k, k)
        self.choices = {"dim": k}
        px, py = principal_axes(xc, k), principal_axes(yc, k)
        return px @ orthogonal_map(xc @ px, yc @ py), py


@register
class RidgeAligner(LinearMapAligner):
    """The ridge regression map from image features into the text feature space."""

    kind = "ridge"
    Params = RidgeParams
    params: RidgeParams

    def maps(self, xc: np.ndarray, yc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return ridge_map(xc, yc, self.params.alpha), np.eye(yc.shape[1])
