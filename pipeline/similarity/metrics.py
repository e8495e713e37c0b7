"""Cross-modal similarity of one pair of representations (docs/similarity.md).

Short pure functions, arrays in and arrays out, computed in float64. ``x`` (n x d1) and
``y`` (n x d2) hold features of the same n samples, row i of one paired with row i of the
other. These are the per-pair definitions; ``matrix.py`` evaluates the same quantities for
every layer pair at once.

Convention for degenerate denominators: a CKA ratio is 0 wherever a self-similarity term
(HSIC of a representation with itself) is <= 0. In exact arithmetic HSIC_1(K, K) is a
squared norm (of the U-centred K) and vanishes only for a layer with no variation over the
sample; rounding then leaves a residue of either sign (its sign depends on the CPU and the
BLAS), where a plain ratio gives NaN or an arbitrary number (the reference code's bug). So
``hsic_unbiased`` reports an estimate within the rounding error of its own terms as exactly
0, and such a layer, having no structure to share, scores 0. The cross term HSIC_1(K, L) is
an unbiased estimate and may be genuinely negative, so unbiased CKA may be slightly below 0
for unrelated layers.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.linalg import l2_normalise

RICE = "rice"
# An HSIC_1 estimate no larger than this many n * eps times its largest term is rounding
# noise of a cancellation that is exact in real arithmetic (summation error grows <= n eps).
ROUNDING_SLACK = 8.0


def centred(x: np.ndarray) -> np.ndarray:
    """Columns minus their means, in float64."""
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(axis=0)


def linear_gram(x: np.ndarray) -> np.ndarray:
    """K = X X^T in float64."""
    x = np.asarray(x, dtype=np.float64)
    return x @ x.T


def cka_ratio(hsic_xy: np.ndarray, hsic_xx: np.ndarray, hsic_yy: np.ndarray) -> np.ndarray:
    """``hsic_xy / sqrt(hsic_xx * hsic_yy)``, elementwise; 0 where a self term is <= 0."""
    xy, xx, yy = np.broadcast_arrays(
        *(np.asarray(v, dtype=np.float64) for v in (hsic_xy, hsic_xx, hsic_yy))
    )
    valid = (xx > 0) & (yy > 0)
    denominator = np.sqrt(np.where(valid, xx * yy, 1.0))
    return np.where(valid, xy / denominator, 0.0)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019): ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), centred."""
    xc, yc = centred(x), centred(y)
    cross = np.sum((xc.T @ yc) ** 2)
    return float(cka_ratio(cross, np.sum((xc.T @ xc) ** 2), np.sum((yc.T @ yc) ** 2)))


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741 (the paper's name)
    """Song et al. (2012) unbiased HSIC_1 of two n x n Gram matrices (n >= 4).

    With K~, L~ the Grams with zeroed diagonals:
    ``[tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))``.
    """
    n = k.shape[0]
    if k.shape != (n, n) or l.shape != (n, n):
        raise ValueError(f"Gram matrices must both be n x n, got {k.shape} and {l.shape}")
    if n < 4:
        raise ValueError(f"unbiased HSIC needs at least 4 samples, got {n}")
    k_off = np.asarray(k, dtype=np.float64).copy()
    l_off = np.asarray(l, dtype=np.float64).copy()
    np.fill_diagonal(k_off, 0.0)
    np.fill_diagonal(l_off, 0.0)
    terms = (
        np.sum(k_off * l_off.T),
        k_off.sum() * l_off.sum() / ((n - 1) * (n - 2)),
        -2.0 / (n - 2) * (k_off.sum(axis=0) @ l_off.sum(axis=1)),
    )
    total = sum(terms)
    if abs(total) <= ROUNDING_SLACK * n * np.finfo(np.float64).eps * max(map(abs, terms)):
        return 0.0
    return float(total / (n * (n - 3)))


def unbiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Debiased linear CKA: HSIC_1 ratio of the linear Grams (0 if a self estimate is <= 0).

    HSIC_1 is invariant to translating the features, so they are centred first: a constant
    layer then has an exactly zero Gram instead of a large constant one whose estimate is
    rounding noise of either sign.
    """
    k, l = linear_gram(centred(x)), linear_gram(centred(y))  # noqa: E741
    return float(cka_ratio(hsic_unbiased(k, l), hsic_unbiased(k, k), hsic_unbiased(l, l)))


def minibatch_indices(n: int, batch_size: int, seed: int) -> np.ndarray:
    """Rows of ``n // batch_size`` equal-size minibatches of a seeded permutation.

    Returns an array of shape (n_batches, batch_size); the ``n % batch_size`` rows left
    over are not used, so every batch estimate has the same size and weight.
    """
    if batch_size < 4:
        raise ValueError(f"minibatch size must be >= 4 for unbiased HSIC, got {batch_size}")
    if batch_size > n:
        raise ValueError(f"minibatch size {batch_size} exceeds the {n} samples")
    n_batches = n // batch_size
    order = np.random.default_rng(seed).permutation(n)
    return order[: n_batches * batch_size].reshape(n_batches, batch_size)


def minibatch_cka(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> float:
    """Minibatch CKA (Nguyen, Raghu, Kornblith 2021).

    HSIC_1(K,L), HSIC_1(K,K) and HSIC_1(L,L) are each averaged over the minibatches of
    ``minibatch_indices``; the ratio is taken of the averages (not averaged per batch).
    """
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    hsic = np.zeros(3)
    batches = minibatch_indices(len(x), batch_size, seed)
    for rows in batches:
        k, l = linear_gram(x[rows]), linear_gram(y[rows])  # noqa: E741
        hsic += (hsic_unbiased(k, l), hsic_unbiased(k, k), hsic_unbiased(l, l))
    return float(cka_ratio(*(hsic / len(batches))))


def rice_k(n: int) -> int:
    """The "rice" rule k = ceil(2 n^(1/3)), exactly: the least integer k with k^3 >= 8n."""
    k = math.ceil(2 * n ** (1 / 3))
    while (k - 1) ** 3 >= 8 * n:
        k -= 1
    while k**3 < 8 * n:
        k += 1
    return k


def resolve_k(k: int | str, n: int) -> int:
    """The neighbour count for n samples: an int, or ``"rice"``; must lie in 1..n-1."""
    if k == RICE:
        k = rice_k(n)
    elif isinstance(k, str | bool) or not isinstance(k, int | np.integer):
        raise ValueError(f"knn k must be a positive int or {RICE!r}, got {k!r}")
    if not 1 <= k <= n - 1:
        raise ValueError(f"knn k={k} is outside 1..{n - 1} (n={n} samples, self excluded)")
    return int(k)


def knn_indices(x: np.ndarray, k: int, block_rows: int = 1024) -> np.ndarray:
    """The k nearest neighbours of each row by cosine similarity, itself excluded.

    Returns an (n, k) int array of neighbour sets (order within a row is unspecified).
    Similarities are computed ``block_rows`` rows at a time, so memory is O(block_rows n).
    """
    z = l2_normalise(np.asarray(x, dtype=np.float64))
    n = len(z)
    k = resolve_k(k, n)
    neighbours = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, block_rows):
        rows = np.arange(start, min(start + block_rows, n))
        similarity = z[rows] @ z.T
        similarity[np.arange(len(rows)), rows] = -np.inf
        neighbours[rows] = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
    return neighbours


def neighbour_overlap(neighbours_x: np.ndarray, neighbours_y: np.ndarray) -> float:
    """Mean over samples of |N^X(i) ∩ N^Y(i)| / k for two (n, k) neighbour-set arrays."""
    if neighbours_x.shape != neighbours_y.shape:
        raise ValueError(
            f"neighbour sets differ in shape: {neighbours_x.shape} vs {neighbours_y.shape}"
        )
    shared = (neighbours_x[:, :, None] == neighbours_y[:, None, :]).any(axis=2)
    return float(shared.sum(axis=1).mean() / neighbours_x.shape[1])


def mutual_knn(x: np.ndarray, y: np.ndarray, k: int | str) -> float:
    """Mutual kNN alignment (Huh et al. 2024) on L2-normalised features, self excluded."""
    k = resolve_k(k, len(x))
    return neighbour_overlap(knn_indices(x, k), knn_indices(y, k))
