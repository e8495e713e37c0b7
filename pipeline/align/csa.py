"""``csa``: canonical similarity analysis (Li, Chinchali, Topcu; ICLR 2025), training free.

Both sides are centred with the training means; CCA is solved in closed form: each side is
whitened with its covariance plus a ridge ``eps`` times its mean variance, and the SVD of the
whitened cross-covariance gives the canonical directions and correlations rho. An embedding is
the first ``sim_dim`` canonical coordinates, L2-normalised; the score of a pair is
sum_i w_i u_i v_i with w = rho, or w = 1 (``equal_weights``: the cosine of the canonical
coordinates, as the STRUCTURE and PAL authors score their CSA baseline).

``eps: 0`` is the unregularised estimator of the CSA authors' code (cca_zoo's ``CCA``), whose
covariances must be invertible. ``pca_dim`` (when set) first projects each side onto at most
that many principal components. A side whose covariance is singular, because n pairs <= its
(projected) width or, with ``eps: 0``, because its features have a lower numerical rank
(``RANK_RTOL``), is handled by ``reduce``: ``error`` raises, naming the side and its rank;
``pca`` (default) projects that side onto its top n - 1 (or rank) principal components. The
widths used are recorded in ``hyperparameters()["fitted"]["pca_dims"]`` (null: not reduced),
the numerical ranks in ``["feature_ranks"]`` (null unless ``eps`` is 0).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.align.base import ClosedFormAligner, check_features
from pipeline.align.params import CSAParams
from pipeline.linalg import l2_normalise

RANK_RTOL = 1e-10
"""With ``eps: 0``, a principal direction whose variance is at most this fraction of the largest
counts as null. On the default run's float32 MiniLM features, null directions (rank 381 of 384
at the last layer) lie at <= 2e-15 of the largest variance and real ones at >= 7e-6."""


def spectrum(centred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (decreasing) and eigenvectors (columns) of the scatter matrix of
    column-centred data (d x d work instead of an n x d SVD)."""
    values, vectors = np.linalg.eigh(centred.T @ centred)
    order = np.argsort(values)[::-1]
    return values[order], vectors[:, order]


def principal_axes(centred: np.ndarray, k: int) -> np.ndarray:
    """(d, k) top-k principal directions of column-centred data."""
    return spectrum(centred)[1][:, :k]


def numerical_rank(values: np.ndarray) -> int:
    """Directions of a decreasing spectrum above ``RANK_RTOL`` times its largest value."""
    return int(np.sum(values > RANK_RTOL * max(values[0], 0.0))) if len(values) else 0


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

    def reduced_width(self, n: int, width: int, side: str, rank: int | None) -> int | None:
        """Principal components to keep on a side (``rank``: its numerical rank, or None when
        not needed), or None to keep its features as they are."""
        k = min(width, self.params.pca_dim or width)
        singular = None
        if n <= k:
            singular, reduced = f"{n} pairs <= {side} feature width {k}", n - 1
        elif rank is not None and rank < k:
            singular, reduced = f"the {side} features have numerical rank {rank} of {k}", rank
        if singular is not None:
            if self.params.reduce == "error":
                fixes = "use more pairs, set pca_dim" if n <= k else "set eps > 0, pca_dim"
                raise ValueError(
                    f"csa: {singular}, so its covariance is singular; {fixes} <= {reduced},"
                    " or set reduce: pca"
                )
            k = reduced
        return None if k == width else k

    def solve(self, x: np.ndarray, y: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        n = len(x)
        means = {"image": x.mean(axis=0), "text": y.mean(axis=0)}
        centred = {"image": x - means["image"], "text": y - means["text"]}
        ranks: dict[str, int | None] = {}
        widths: dict[str, int | None] = {}
        axes: dict[str, np.ndarray | None] = {}
        for side, c in centred.items():
            # unregularised, a side's covariance must be invertible: its rank is checked
            found = spectrum(c) if self.params.eps == 0 else None
            ranks[side] = None if found is None else numerical_rank(found[0])
            widths[side] = k = self.reduced_width(n, c.shape[1], side, ranks[side])
            if k is not None and found is None:
                found = spectrum(c)
            axes[side] = None if k is None else found[1][:, :k]
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
        feature_ranks = None if self.params.eps > 0 else ranks
        return arrays, {"rank": rank, "pca_dims": widths, "feature_ranks": feature_ranks}

    def embed(self, a: np.ndarray, side: str) -> np.ndarray:
        arrays = self.fitted()
        a = check_features(f"{side} features", a, len(arrays[f"{side}_mean"]))
        coords = (a - arrays[f"{side}_mean"]) @ arrays[f"{side}_directions"]
        return l2_normalise(coords).astype(np.float32)

    def similarity(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        """sum_i w_i u_i v_i: coordinates weighted by the canonical correlations (w = rho), or
        their cosine (w = 1, ``equal_weights``)."""
        if self.params.equal_weights:
            return image_emb @ text_emb.T
        rho = self.fitted()["correlations"].astype(np.float32)
        return (image_emb * rho) @ text_emb.T
