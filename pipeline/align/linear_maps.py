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
from typing import Any

import numpy as np

from pipeline.align.base import ClosedFormAligner, check_features
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
    def maps(self, xc: np.ndarray, yc: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        """(image_map, text_map, the fit's choices) fitted on centred unit rows."""

    def solve(self, x: np.ndarray, y: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        x, y = l2_normalise(x), l2_normalise(y)
        means = x.mean(axis=0), y.mean(axis=0)
        image_map, text_map, choices = self.maps(x - means[0], y - means[1])
        return dict(zip(STATE_KEYS, (*means, image_map, text_map), strict=True)), choices

    def embed(self, a: np.ndarray, side: str) -> np.ndarray:
        arrays = self.fitted()
        a = check_features(f"{side} features", a, len(arrays[f"{side}_mean"]))
        coords = (l2_normalise(a) - arrays[f"{side}_mean"]) @ arrays[f"{side}_map"]
        return l2_normalise(coords).astype(np.float32)


class ProcrustesAligner(LinearMapAligner):
    """Common-width PCA of each side, then the orthogonal map from image to text."""

    kind = "procrustes"
    params: ProcrustesParams

    def maps(self, xc: np.ndarray, yc: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        k = min(xc.shape[1], yc.shape[1], len(xc) - 1)
        k = min(self.params.dim or k, k)
        px, py = principal_axes(xc, k), principal_axes(yc, k)
        return px @ orthogonal_map(xc @ px, yc @ py), py, {"dim": k}


class RidgeAligner(LinearMapAligner):
    """The ridge regression map from image features into the text feature space."""

    kind = "ridge"
    params: RidgeParams

    def maps(self, xc: np.ndarray, yc: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        return ridge_map(xc, yc, self.params.alpha), np.eye(yc.shape[1]), {}
