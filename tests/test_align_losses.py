"""InfoNCE and the STRUCTURE regulariser against plain loop implementations of their formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.align.losses import (
    fused_divergence,
    gram,
    info_nce,
    level_weights,
    log_transitions,
    row_divergence,
    scaled_centred_units,
    structure_regulariser,
    structure_weight,
    transition_powers,
)

# ---- brute-force references: explicit loops, float64, written from docs/methods.md ----


def bf_unit_centred(a: np.ndarray) -> np.ndarray:
    rows = [row / math.sqrt(sum(v * v for v in row)) for row in a]
    mean = [sum(row[j] for row in rows) / len(rows) for j in range(a.shape[1])]
    return np.array([[row[j] - mean[j] for j in range(a.shape[1])] for row in rows])


def bf_row_softmax(s: np.ndarray) -> np.ndarray:
    out = np.zeros_like(s)
    for i in range(len(s)):
        top = max(s[i])
        exps = [math.exp(v - top) for v in s[i]]
        total = sum(exps)
        out[i] = [e / total for e in exps]
    return out


def bf_power(p: np.ndarray, level: int) -> np.ndarray:
    out = p.copy()
    for _ in range(level - 1):
        out = out @ p
    return out


def bf_kl(p: np.ndarray, q: np.ndarray) -> float:
    return sum(pj * math.log(pj / qj) for pj, qj in zip(p, q, strict=True) if pj > 0)


def bf_divergence(p: np.ndarray, q: np.ndarray, divergence: str) -> float:
    total = 0.0
    for pi, qi in zip(p, q, strict=True):
        mi = 0.5 * (pi + qi)
        if divergence == "js":
            total += 0.5 * bf_kl(pi, mi) + 0.5 * bf_kl(qi, mi)
        else:
            total += 0.5 * (bf_kl(mi, qi) + bf_kl(mi, pi))
    return total / len(p)


def bf_structure(x: np.ndarray, z: np.ndarray, tau: float, levels: int, divergence: str) -> float:
    xs, zs = bf_unit_centred(x), bf_unit_centred(z)
    px, pz = bf_row_softmax(xs @ xs.T / tau), bf_row_softmax(zs @ zs.T / tau)
    total = 0.0
    for level in range(1, levels + 1):
        weight = 1.0 if levels == 1 else 1.0 / level
        total += weight * bf_divergence(bf_power(px, level), bf_power(pz, level), divergence)
    return total / levels


def bf_info_nce(zi: np.ndarray, zt: np.ndarray, tau: float) -> float:
    n = len(zi)
    logits = [[float(np.dot(zi[i], zt[j])) / tau for j in range(n)] for i in range(n)]
    row_ce = col_ce = 0.0
    for k in range(n):
        row_ce += -logits[k][k] + math.log(sum(math.exp(logits[k][j]) for j in range(n)))
        col_ce += -logits[k][k] + math.log(sum(math.exp(logits[i][k]) for i in range(n)))
    return 0.5 * (row_ce / n + col_ce / n)


def random_pair(seed: int, n: int = 24, d1: int = 6, d2: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d1)), rng.normal(size=(n, d2))


# ---- tests ----


@pytest.mark.parametrize("levels", [1, 3])
@pytest.mark.parametrize("divergence", ["js", "reference"])
@pytest.mark.parametrize("tau", [0.05, 0.5])
def test_structure_matches_brute_force(levels: int, divergence: str, tau: float) -> None:
    x, z = random_pair(seed=levels + 10 * int(tau * 100))
    expected = bf_structure(x, z, tau, levels, divergence)
    got = structure_regulariser(torch.tensor(x), torch.tensor(z), tau, levels, divergence)
    assert got.dtype == torch.float32
    assert expected > 1e-3
    assert got.item() == pytest.approx(expected, rel=2e-4)


def test_structure_zero_for_rotated_and_scaled_features() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8))
    # an isometric embedding into 20 dims (orthonormal columns), then a scale:
    # rows keep their inner products after L2 normalisation and centring.
    q, _ = np.linalg.qr(rng.normal(size=(20, 8)))
    z = 3.7 * x @ q.T
    for divergence in ("js", "reference"):
        for levels in (1, 3):
            r = structure_regulariser(torch.tensor(x), torch.tensor(z), 0.05, levels, divergence)
            assert abs(r.item()) < 1e-5
    other = rng.normal(size=(64, 20))
    assert structure_regulariser(torch.tensor(x), torch.tensor(other), 0.05).item() > 1e-2


def test_reference_variant_about_ten_times_true_js_on_random_features() -> None:
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(256, 8, generator=g), torch.randn(256, 8, generator=g)
    js = structure_regulariser(x, z, 0.05, 1, "js").item()
    reference = structure_regulariser(x, z, 0.05, 1, "reference").item()
    assert 0 < js <= math.log(2)
    print(f"\nrandom 8-d features: JS {js:.4f}, reference {reference:.4f}, x{reference / js:.1f}")
    assert 5 < reference / js < 20


def test_structure_is_float32_under_autocast() -> None:
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(32, 6, generator=g), torch.randn(6, 12, generator=g, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = x @ w
        assert z.dtype == torch.bfloat16
        r = structure_regulariser(x, z, 0.05)
    assert r.dtype == torch.float32
    expected = structure_regulariser(x, z.detach().float(), 0.05)
    assert r.item() == pytest.approx(expected.item(), rel=1e-6)
    r.backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


@pytest.mark.parametrize("levels", [1, 2])
@pytest.mark.parametrize("divergence", ["js", "reference"])
def test_structure_gradient_matches_finite_differences(levels: int, divergence: str) -> None:
    x, z = random_pair(seed=3, n=10, d1=4, d2=5)
    z_t = torch.tensor(z, requires_grad=True)
    structure_regulariser(torch.tensor(x), z_t, 0.5, levels, divergence).backward()
    eps = 1e-4
    for i, j in [(3, 2), (0, 4), (9, 0)]:
        up, down = z.copy(), z.copy()
        up[i, j] += eps
        down[i, j] -= eps
        numeric = (
            bf_structure(x, up, 0.5, levels, divergence)
            - bf_structure(x, down, 0.5, levels, divergence)
        ) / (2 * eps)
        assert z_t.grad[i, j].item() == pytest.approx(numeric, rel=1e-2, abs=1e-6)


@pytest.mark.parametrize("divergence", ["js", "reference"])
def test_fused_single_level_matches_autograd_through_matrix_powers(divergence: str) -> None:
    x, z = (torch.tensor(a, dtype=torch.float32) for a in random_pair(seed=6, n=48, d2=12))
    fused_z, graph_z = z.clone().requires_grad_(), z.clone().requires_grad_()
    fused = structure_regulariser(x, fused_z, 0.05, 1, divergence)
    fused.backward()
    [(px, log_px)] = transition_powers(log_transitions(x, 0.05), 1)
    [(pz, log_pz)] = transition_powers(log_transitions(graph_z, 0.05), 1)
    graph = row_divergence(px, log_px, pz, log_pz, divergence)
    graph.backward()
    assert fused.item() == pytest.approx(graph.item(), rel=1e-5)
    torch.testing.assert_close(fused_z.grad, graph_z.grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("divergence", ["js", "reference"])
def test_fused_divergence_is_the_same_in_row_blocks(divergence: str) -> None:
    """Blocks of 5 rows (the last one short) give the one-block value and gradient."""
    x, z = (torch.tensor(a, dtype=torch.float64) for a in random_pair(seed=8, n=48, d2=12))
    x, z = scaled_centred_units(x, 0.05).double(), scaled_centred_units(z, 0.05).double()
    results = []
    for block_elements in (48 * 48, 48 * 5):
        z_b = z.clone().requires_grad_()
        value = fused_divergence(x, z_b, divergence, block_elements)
        value.backward()
        results.append((value.item(), z_b.grad))
    (whole, whole_grad), (blocked, blocked_grad) = results
    assert blocked == pytest.approx(whole, rel=1e-12)
    torch.testing.assert_close(blocked_grad, whole_grad, rtol=1e-10, atol=1e-14)


def test_gram_backward() -> None:
    a = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gram, (a,))


@pytest.mark.parametrize("tau", [0.05, 1.0])
def test_info_nce_matches_manual(tau: float) -> None:
    rng = np.random.default_rng(4)
    zi, zt = rng.normal(size=(9, 5)), rng.normal(size=(9, 5))
    zi /= np.linalg.norm(zi, axis=1, keepdims=True)
    zt /= np.linalg.norm(zt, axis=1, keepdims=True)
    got = info_nce(torch.tensor(zi), torch.tensor(zt), tau).item()
    assert got == pytest.approx(bf_info_nce(zi, zt, tau), rel=1e-10)


def test_info_nce_is_small_for_matched_well_separated_pairs() -> None:
    z = torch.eye(6, dtype=torch.float64)
    assert info_nce(z, z, 0.05).item() == pytest.approx(math.log1p(5 * math.exp(-1 / 0.05)))
    assert info_nce(z, z.roll(1, dims=0), 0.05).item() > 10


def test_level_weights_and_structure_warmup() -> None:
    assert level_weights(1) == [1.0]
    assert level_weights(3) == [1.0, 0.5, pytest.approx(1 / 3)]
    with pytest.raises(ValueError, match="levels"):
        level_weights(0)
    assert [structure_weight(s, 10.0, 1000) for s in (0, 500, 1000, 5000)] == [0, 5, 10, 10]
    assert structure_weight(0, 10.0, 0) == 10.0


def test_unknown_divergence_is_named() -> None:
    x, z = random_pair(seed=5)
    with pytest.raises(ValueError, match="'kl'"):
        structure_regulariser(torch.tensor(x), torch.tensor(z), 0.05, 1, "kl")
