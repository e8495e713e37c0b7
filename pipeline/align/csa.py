"""``csa``: canonical similarity analysis (Li, Chinchali, Topcu; ICLR 2025), training free.

Both sides are centred with the training means; CCA is solved in closed form: each side is
whitened with its covariance plus a ridge ``eps`` times its mean variance, and the SVD of the
whitened cross-covariance gives the canonical directions and correlations rho. An embedding is
the first ``sim_dim`` canonical coordinates, L2-normalised; the score of a pair is
sum_i rho_i u_i v_i.

``pca_dim`` (when set) first projects each side onto at most that many principal components.
With n pairs <= a side's (projected) width its covariance is singular: ``reduce: error`` raises,
``reduce: pca`` (default) projects that side onto its top n - 1 principal components. The
widths used are recorded in ``hyperparameters()["fitted"]["pca_dims"]`` (null: not reduced).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.align.base import ClosedFormAligner, check_features
from pipeline.align.params import CSAParams
from pipeline.linalg import l2_normalise


def principal_axes(centred: np.ndarray, k: int) -> np.ndarray:
    """(d, k) top-k principal directions of column-centred data (eigenvectors of its scatter
    matrix, by decreasing eigenvalue; d x d work instead of an n x d SVD)."""
    values, vectors = np.linalg.eigh(centred.T @ centred)
    return vectors[:, np.argsort(values)[::-1][:k]]


def inverse_sqrt(cov: np.ndarray) -> np.ndarray:
    """C^(-1/2) of a symmetric positive-definite matrix, by eigendecomposition."""
    values, vectors = np.linalg.eigh(cov)
    if values[0] <= 0:
        raise ValueError("covariance is singular: raise eps or reduce the dimension")
    return (vectors / np.sqrt(values)) @ vectors.T


def ridge_covariance(centred: np.ndarray, eps: float) -> np.ndarray:
    """Sample covariance plus eps times its mean variance on the diagonal."""
    cov = centred.T @ centred / (len(centred) - 1)
    return cov + eps * np.trace(cov) / len(cov) * np.eye(len(cov))


def cca(xc: np.ndarray, yc: np.ndarray, rank: int, eps: float) -> tuple[np.ndarray, ...]:
    """Closed-form CCA of centred data: directions A (d1, r), B (d2, r) and correlations (r,).

    Whitening W = C^(-1/2); SVD of Wx Cxy Wy = U S V^T; A = Wx U, B = Wy V, rho = S.
    """
    wx, wy = inverse_sqrt(ridge_covariance(xc, eps)), inverse_sqrt(ridge_covariance(yc, eps))
    cross = xc.T @ yc / (len(xc) - 1)
    u, s, vt = np.linalg.svd(wx @ cross @ wy, full_matrices=False)
    return wx @ u[:, :rank], wy @ vt[:rank].T, s[:rank]


STATE_KEYS = ("image_mean", "text_mean", "image_directions", "text_directions", "correlations")


class CSAAligner(ClosedFormAligner):
    """CCA directions per modality; scores weighted by the canonical correlations."""

    kind = "csa"
    params: CSAParams
    STATE_KEYS = STATE_KEYS

    def reduced_width(self, n: int, width: int, side: str) -> int | None:
        """Principal components to keep on a side, or None to keep its features as they are."""
        k = min(width, self.params.pca_dim or width)
        if n <= k:
            if self.params.reduce == "error":
                raise ValueError(
                    f"csa: {n} pairs <= {side} feature width {k}, so its covariance is singular;"
                    " use more pairs, set pca_dim, or set reduce: pca"
                )
            k = n - 1
        return None if k == width else k

    def solve(self, x: np.ndarray, y: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        n = len(x)
        means = {"image": x.mean(axis=0), "text": y.mean(axis=0)}
        centred = {"image": x - means["image"], "text": y - means["text"]}
        widths = {side: self.reduced_width(n, c.shape[1], side) for side, c in centred.items()}
        axes = {
            side: None if k is None else principal_axes(centred[side], k)
            for side, k in widths.items()
        }
        reduced = {side: c if axes[side] is None else c @ axes[side] for side, c in centred.items()}
        rank = min(self.params.sim_dim, reduced["image"].shape[1], reduced["text"].shape[1])
        a, b, rho = cca(reduced["image"], reduced["text"], rank, self.params.eps)
        arrays = {
            "image_mean": means["image"],
            "text_mean": means["text"],
            "image_directions": a if axes["image"] is None else axes["image"] @ a,
            "text_directions": b if axes["text"] is None else axes["text"] @ b,
            "correlations": rho,
        }
        return arrays, {"rank": rank, "pca_dims": widths}

    def embed(self, a: np.ndarray, side: str) -> np.ndarray:
        arrays = self.fitted()
        a = check_features(f"{side} features", a, len(arrays[f"{side}_mean"]))
        coords = (a - arrays[f"{side}_mean"]) @ arrays[f"{side}_directions"]
        return l2_normalise(coords).astype(np.float32)

    def similarity(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        """sum_i rho_i u_i v_i: coordinates weighted by the canonical correlations."""
        rho = self.fitted()["correlations"].astype(np.float32)
        return (image_emb * rho) @ text_emb.T
