"""Per-pair similarity metrics against plain brute-force implementations of their formulas."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import ortho_group

from pipeline.similarity import metrics

SHAPES = [(6, 3, 8), (9, 40, 2), (30, 4, 9), (64, 100, 50), (200, 16, 32)]  # (n, d1, d2)


# ---- brute force, written plainly from the definitions in docs/similarity.md ----


def centring_matrix(n: int) -> np.ndarray:
    return np.eye(n) - np.ones((n, n)) / n


def bf_hsic(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    h = centring_matrix(len(k))
    return np.trace(k @ h @ l @ h) / (len(k) - 1) ** 2


def bf_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    k, l = x @ x.T, y @ y.T  # noqa: E741
    return bf_hsic(k, l) / np.sqrt(bf_hsic(k, k) * bf_hsic(l, l))


def bf_hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    n = len(k)
    kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    one = np.ones(n)
    return (
        np.trace(kt @ lt)
        + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * (one @ kt @ lt @ one)
    ) / (n * (n - 3))


def bf_unbiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    k, l = x @ x.T, y @ y.T  # noqa: E741
    return bf_hsic_unbiased(k, l) / np.sqrt(bf_hsic_unbiased(k, k) * bf_hsic_unbiased(l, l))


def bf_knn_sets(x: np.ndarray, k: int) -> list[set[int]]:
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    sets = []
    for i, row in enumerate(z @ z.T):
        ranked = [j for j in np.argsort(-row, kind="stable") if j != i]
        sets.append(set(ranked[:k]))
    return sets


def bf_mutual_knn(x: np.ndarray, y: np.ndarray, k: int) -> float:
    sx, sy = bf_knn_sets(x, k), bf_knn_sets(y, k)
    return float(np.mean([len(a & b) / k for a, b in zip(sx, sy, strict=True)]))


def random_pair(n: int, d1: int, d2: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Correlated features with non-zero means, so centring matters."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d1)) + rng.standard_normal(d1)
    y = x @ rng.standard_normal((d1, d2)) * 0.3 + rng.standard_normal((n, d2)) + 2.0
    return x, y


# ---- equality with brute force ----


@pytest.mark.parametrize(("n", "d1", "d2"), SHAPES)
def test_linear_cka_equals_brute_force(n, d1, d2):
    x, y = random_pair(n, d1, d2, seed=n + d1)
    assert metrics.linear_cka(x, y) == pytest.approx(bf_linear_cka(x, y), abs=1e-10)


@pytest.mark.parametrize(("n", "d1", "d2"), SHAPES)
def test_unbiased_hsic_and_cka_equal_brute_force(n, d1, d2):
    x, y = random_pair(n, d1, d2, seed=n + d2)
    k, l = x @ x.T, y @ y.T  # noqa: E741
    scale = np.sqrt(bf_hsic_unbiased(k, k) * bf_hsic_unbiased(l, l))
    assert metrics.hsic_unbiased(k, l) == pytest.approx(bf_hsic_unbiased(k, l), abs=1e-10 * scale)
    assert metrics.unbiased_cka(x, y) == pytest.approx(bf_unbiased_cka(x, y), abs=1e-10)


@pytest.mark.parametrize(("n", "d1", "d2", "batch_size"), [(64, 5, 70, 16), (203, 16, 8, 50)])
def test_minibatch_cka_is_the_ratio_of_averaged_hsic(n, d1, d2, batch_size):
    x, y = random_pair(n, d1, d2, seed=7)
    order = np.random.default_rng(3).permutation(n)
    batches = [order[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    assert len(batches) == n // batch_size
    grams = [(x[b] @ x[b].T, y[b] @ y[b].T) for b in batches]
    xy = np.mean([bf_hsic_unbiased(gx, gy) for gx, gy in grams])
    xx = np.mean([bf_hsic_unbiased(gx, gx) for gx, _ in grams])
    yy = np.mean([bf_hsic_unbiased(gy, gy) for _, gy in grams])
    expected = xy / np.sqrt(xx * yy)
    assert metrics.minibatch_cka(x, y, batch_size, seed=3) == pytest.approx(expected, abs=1e-10)
    per_batch_average = np.mean([bf_unbiased_cka(x[b], y[b]) for b in batches])
    assert expected != pytest.approx(per_batch_average, abs=1e-6)  # the averaging bug differs


def test_minibatch_cka_with_one_full_batch_is_unbiased_cka():
    x, y = random_pair(50, 6, 9, seed=1)
    assert metrics.minibatch_cka(x, y, 50, seed=0) == pytest.approx(metrics.unbiased_cka(x, y))


def test_minibatch_indices_are_equal_size_disjoint_and_seeded():
    batches = metrics.minibatch_indices(103, 25, seed=5)
    assert batches.shape == (4, 25)
    assert len(np.unique(batches)) == 100
    assert np.array_equal(batches, metrics.minibatch_indices(103, 25, seed=5))
    assert not np.array_equal(batches, metrics.minibatch_indices(103, 25, seed=6))
    with pytest.raises(ValueError, match="exceeds"):
        metrics.minibatch_indices(10, 11, seed=0)
    with pytest.raises(ValueError, match=">= 4"):
        metrics.minibatch_indices(10, 3, seed=0)


@pytest.mark.parametrize(("n", "d1", "d2", "k"), [(30, 4, 40, 3), (200, 16, 8, 10), (120, 3, 3, 1)])
def test_mutual_knn_equals_brute_force(n, d1, d2, k):
    x, y = random_pair(n, d1, d2, seed=k)
    assert metrics.mutual_knn(x, y, k) == pytest.approx(bf_mutual_knn(x, y, k), abs=1e-12)


def test_knn_indices_match_a_full_sort_and_exclude_self():
    x, _ = random_pair(97, 12, 1, seed=4)
    found = metrics.knn_indices(x, 6, block_rows=10)  # several blocks, uneven last one
    assert found.shape == (97, 6)
    assert [set(row) for row in found] == bf_knn_sets(x, 6)
    assert not np.any(found == np.arange(97)[:, None])


# ---- invariances and known answers ----


@pytest.mark.parametrize("metric", [metrics.linear_cka, metrics.unbiased_cka])
def test_cka_is_invariant_to_rotation_scale_and_shift(metric):
    x, _ = random_pair(40, 12, 1, seed=2)
    q = ortho_group.rvs(12, random_state=0)
    assert metric(x, x @ q) == pytest.approx(1.0, abs=1e-12)
    assert metric(x, 3.7 * x) == pytest.approx(1.0, abs=1e-12)
    assert metric(x, x + 100.0) == pytest.approx(1.0, abs=1e-9)


def test_minibatch_cka_of_a_rotation_is_one():
    x, _ = random_pair(90, 12, 1, seed=2)
    q = ortho_group.rvs(12, random_state=1)
    assert metrics.minibatch_cka(x, 2.0 * x @ q, 30, seed=0) == pytest.approx(1.0, abs=1e-12)


def test_mutual_knn_of_a_representation_with_itself_is_one():
    x, _ = random_pair(80, 10, 1, seed=3)
    q = ortho_group.rvs(10, random_state=2)
    assert metrics.mutual_knn(x, x, 5) == 1.0
    assert metrics.mutual_knn(x, 0.5 * x @ q, "rice") == 1.0


def test_independent_features_unbiased_cka_near_zero_while_biased_cka_is_inflated():
    rng = np.random.default_rng(0)
    biased, unbiased = [], []
    for _ in range(20):
        x, y = rng.standard_normal((30, 100)), rng.standard_normal((30, 100))
        biased.append(metrics.linear_cka(x, y))
        unbiased.append(metrics.unbiased_cka(x, y))
    assert np.mean(biased) > 0.7  # n < d: biased CKA of pure noise looks very similar
    assert abs(np.mean(unbiased)) < 0.02
    assert np.std(unbiased) < 0.05


def test_unbiased_cka_never_nan_when_hsic_estimates_are_negative():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((12, 3)), rng.standard_normal((12, 3))
    k, l = x @ x.T, y @ y.T  # noqa: E741
    assert metrics.hsic_unbiased(k, l) < 0  # this seed's cross estimate is negative
    score = metrics.unbiased_cka(x, y)
    assert np.isfinite(score) and score < 0
    assert score == pytest.approx(bf_unbiased_cka(x, y), abs=1e-12)
    # A constant layer's uncentred Gram has self estimate 0 in exact arithmetic; in floating
    # point a residue of CPU-dependent sign, which would make the ratio NaN or arbitrary.
    # Residues within the terms' rounding error are reported as exactly 0.
    for value in (1.1, 0.7, 3.0, 1e3):
        constant_gram = np.full((12, 12), value)
        assert metrics.hsic_unbiased(constant_gram, constant_gram) == 0.0
        assert metrics.hsic_unbiased(constant_gram, l) == 0.0
        hsic = [metrics.hsic_unbiased(constant_gram, g) for g in (l, constant_gram, l)]
        assert metrics.cka_ratio(*hsic) == 0.0
    # The snap never touches a real estimate: small-but-genuine values survive.
    assert metrics.hsic_unbiased(k, l) == pytest.approx(bf_hsic_unbiased(k, l), rel=1e-9)
    assert metrics.cka_ratio(0.3, -1e-3, 2.0) == 0.0
    assert metrics.cka_ratio(-0.3, 0.0, 2.0) == 0.0
    assert np.array_equal(
        metrics.cka_ratio(np.array([0.5, 0.5]), np.array([1.0, -1.0]), 4.0), [0.25, 0.0]
    )
    constant = np.ones((12, 5))
    assert metrics.unbiased_cka(constant, y) == 0.0
    assert metrics.linear_cka(constant, y) == 0.0
    assert metrics.minibatch_cka(constant, y, 6, seed=0) == 0.0


def test_rice_rule_and_k_validation():
    assert metrics.rice_k(5000) == 35  # STRUCTURE's k at 5000 pairs
    assert metrics.rice_k(1000) == 20  # exact cube: 2 * 10
    assert metrics.rice_k(1001) == 21
    assert metrics.rice_k(125) == 10
    assert all(
        metrics.rice_k(n) == int(np.ceil(2 * round(n ** (1 / 3), 12))) for n in range(1, 3000)
    )
    assert metrics.resolve_k("rice", 5000) == 35
    assert metrics.resolve_k(10, 5000) == 10
    for bad in ("ten", 0, 50, 2.5, True):
        with pytest.raises(ValueError, match="knn k"):
            metrics.resolve_k(bad, 50)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="at least 4 samples"):
        metrics.hsic_unbiased(np.eye(3), np.eye(3))
    with pytest.raises(ValueError, match="n x n"):
        metrics.hsic_unbiased(np.eye(5), np.eye(6))
    with pytest.raises(ValueError, match="shape"):
        metrics.neighbour_overlap(np.zeros((4, 2), int), np.zeros((4, 3), int))
