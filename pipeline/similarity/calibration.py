"""Permutation null, calibrated scores and bootstrap intervals of every layer pair.

Two kinds of replicate of the scoring pool, shared by every metric and layer pair so that
the maxima and differences taken over layer pairs are paired (docs/similarity.md):

- a *permutation* re-pairs the two sides: the vision rows are permuted by image group (the
  pairs of one image move together to the rows of another image with as many pairs), so the
  null keeps the dependence among captions of one image. With one caption per image (the
  scoring pool of ``selection.scoring_pairs``) it is a uniform permutation of the pairs;
- a *bootstrap* resample draws image groups with replacement; ``counts[i]`` is how often
  pair i is drawn (pairs of one image share their count).

Neither recomputes a feature. With ``K = Xc Xc^T`` the centred Gram of a layer (``L`` of the
other side), permuting rows of X is ``K[pi][:, pi]``, so the permuted cross terms of all
layer pairs are one gathered Gram per layer of one side and one matrix product with the
other side's Grams; a resample is a weighting of the pool,
so its HSIC terms are products of ``K``, ``K o L`` and the count vectors (all replicates in
one matrix product). Mutual kNN keeps each layer's neighbour sets: a permutation relabels
them (``pi^-1[N(pi_i)]``), and a resample reweights the per-anchor overlaps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse
from tqdm.auto import tqdm

from pipeline.similarity.matrix import RowSource, mutual_knn_of_sets, sample_count
from pipeline.similarity.metrics import centred, cka_ratio

STATISTICS = ("raw", "calibrated")


@dataclass(frozen=True)
class CalibrationSettings:
    """``similarity.permutations``, ``bootstrap``, ``level`` and ``selection`` of the config."""

    permutations: int = 0
    bootstrap: int = 0
    level: float = 0.95
    statistic: str = "raw"

    def __post_init__(self) -> None:
        if self.statistic not in STATISTICS:
            raise ValueError(f"similarity.selection must be one of {STATISTICS}")
        if self.statistic == "calibrated" and self.permutations < 2:
            raise ValueError("similarity.selection: calibrated needs similarity.permutations >= 2")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"similarity.level must lie in (0, 1), got {self.level}")


@dataclass(frozen=True)
class Replicates:
    """Row maps of the permutations (P, n) and bootstrap counts (B, n) of one pool."""

    permutations: np.ndarray
    counts: np.ndarray


def image_groups(image_rows: np.ndarray) -> np.ndarray:
    """Group index of each pair: pairs of the same image share one."""
    return np.unique(np.asarray(image_rows), return_inverse=True)[1]


def group_permutations(groups: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, n) row maps: row i of the permuted side is row ``pi[i]``. Each image group
    takes, in order, the rows of a random group of the same size."""
    n = len(groups)
    sizes = np.bincount(groups)
    order = np.argsort(groups, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    maps = np.tile(np.arange(n), (count, 1))
    for size in np.unique(sizes):
        members = np.flatnonzero(sizes == size)
        rows = order[starts[members][:, None] + np.arange(size)]  # (groups, size)
        for pi in maps:
            pi[rows] = rows[rng.permutation(len(members))]
    return maps


def group_bootstrap(groups: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """(count, n) multiplicities of a bootstrap over image groups (a pair has its group's)."""
    n_groups = int(groups.max()) + 1
    draws = rng.integers(n_groups, size=(count, n_groups))
    per_group = np.zeros((count, n_groups))
    np.add.at(per_group, (np.arange(count)[:, None], draws), 1.0)
    return per_group[:, groups]


def draw_replicates(image_rows: np.ndarray, settings: CalibrationSettings, seed: int) -> Replicates:
    groups = image_groups(image_rows)
    rng = np.random.default_rng([seed, len(groups)])
    return Replicates(
        group_permutations(groups, settings.permutations, rng),
        group_bootstrap(groups, settings.bootstrap, rng),
    )


# ---- CKA: permuted and reweighted HSIC terms from centred Gram matrices ----


def centred_gram(layer: RowSource) -> np.ndarray:
    x = centred(np.asarray(layer[0 : layer.shape[0]]))
    return x @ x.T


@dataclass(frozen=True)
class GramTerms:
    """Permutation-invariant sums of one centred Gram K (q = diag K, K~ = K, zero diagonal)."""

    gram: np.ndarray
    diag: np.ndarray  # q
    self_norm: float  # ||K||_F^2 = ||X^T X||_F^2
    off_sum: float  # 1'K~1
    off_rows: np.ndarray  # K~1


def gram_terms(gram: np.ndarray) -> GramTerms:
    diag = np.diag(gram).copy()
    rows = gram.sum(axis=1)
    return GramTerms(
        gram, diag, float(np.vdot(gram, gram)), float(rows.sum() - diag.sum()), rows - diag
    )


def _song(tr: np.ndarray, sum_k, sum_l, rows_dot, n) -> np.ndarray:
    """Song et al.'s HSIC_1 from tr(K~L~), 1'K~1, 1'L~1, (K~1).(L~1) over n (arrays of n)."""
    return (tr + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * rows_dot) / (n * (n - 3))


def _self_unbiased(t: GramTerms, n: int) -> float:
    tr = t.self_norm - float(t.diag @ t.diag)
    return float(_song(tr, t.off_sum, t.off_sum, float(t.off_rows @ t.off_rows), n))


def _weighted_hsic(k: GramTerms, l: GramTerms, kc, lc, counts, m) -> tuple[np.ndarray, ...]:  # noqa: E741
    """Biased and unbiased HSIC of every resample (``counts`` (B, n), sizes ``m``).

    A copy of a sample is no independent draw, so the resampled Grams have the entries of
    two copies of one sample zeroed: for the unbiased estimate (Song's) like the diagonal,
    for the biased one (the plain centred ``tr(K H L H)``) off the diagonal only, each
    sample keeping one diagonal term per copy. Otherwise duplicated rows, identical in both
    modalities, would inflate the resampled scores. All from weighted sums of the pool.
    """
    ct = counts.T
    cmc = np.einsum("ib,ib->b", ct, (k.gram * l.gram) @ ct)  # sum_uv c_u c_v K_uv L_uv
    ckc, clc = np.einsum("ib,ib->b", ct, kc), np.einsum("ib,ib->b", ct, lc)
    out = []
    for zeroed in (ct - 1.0, ct):  # entries zeroed per row of a copy: biased, unbiased
        tr = cmc - np.einsum("ib,ib,i->b", ct, zeroed, k.diag * l.diag)
        sum_k = ckc - np.einsum("ib,ib,i->b", ct, zeroed, k.diag)
        sum_l = clc - np.einsum("ib,ib,i->b", ct, zeroed, l.diag)
        k_rows, l_rows = kc - zeroed * k.diag[:, None], lc - zeroed * l.diag[:, None]
        out.append((tr, sum_k, sum_l, np.einsum("ib,ib,ib->b", ct, k_rows, l_rows)))
    (tr, sum_k, sum_l, rows), unbiased = out[0], _song(*out[1], m)
    linear = (tr - 2.0 / m * rows + sum_k * sum_l / m**2) / m**2
    return linear, unbiased


def cka_replicates(
    vision: Sequence[RowSource],
    text: Sequence[RowSource],
    replicates: Replicates,
    progress: bool = True,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"linear_cka" | "unbiased_cka": (null (P, La, Lb), bootstrap (B, La, Lb))}``.

    Every Gram is held, (La + 2 min(La, Lb)) n^2 float64 with the permuted copies: each
    permutation gathers the Grams of the side with fewer layers (vision rows by pi = text
    rows by pi^-1) and multiplies them with the other side's in one matrix product.
    """
    sample_count(vision, text)
    if len(text) > len(vision):
        return _cka_replicates(text, vision, replicates, progress)
    inverse = Replicates(np.argsort(replicates.permutations, axis=1), replicates.counts)
    swapped = _cka_replicates(vision, text, inverse, progress)
    return {name: (a.transpose(0, 2, 1), b.transpose(0, 2, 1)) for name, (a, b) in swapped.items()}


def _cka_replicates(
    held: Sequence[RowSource],
    streamed: Sequence[RowSource],
    replicates: Replicates,
    progress: bool,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``cka_replicates`` with the rows of ``streamed`` permuted; arrays (R, streamed, held)."""
    n = held[0].shape[0]
    perms, counts = replicates.permutations, replicates.counts
    m = counts.sum(axis=1)
    shape_p, shape_b = (
        (len(perms), len(streamed), len(held)),
        (len(counts), len(streamed), len(held)),
    )
    out = {name: (np.zeros(shape_p), np.zeros(shape_b)) for name in ("linear", "unbiased")}
    grams = [gram_terms(centred_gram(layer)) for layer in held]
    stacked = np.stack([g.gram.ravel() for g in grams])  # (L, n^2)
    h_diag = np.stack([g.diag for g in grams])
    h_rows = np.stack([g.off_rows for g in grams])
    h_norm = np.array([g.self_norm for g in grams])
    h_sum = np.array([g.off_sum for g in grams])
    h_self_u = np.array([_self_unbiased(g, n) for g in grams])
    h_counts = [g.gram @ counts.T for g in grams]
    h_boot = [_weighted_hsic(g, g, c, c, counts, m) for g, c in zip(grams, h_counts, strict=True)]
    ks = [gram_terms(centred_gram(layer)) for layer in streamed]
    k_self_u = np.array([_self_unbiased(k, n) for k in ks])
    k_norm = np.array([k.self_norm for k in ks])[:, None]
    permuted = np.empty((len(ks), n * n))
    for j, pi in enumerate(tqdm(perms, desc="null", disable=not progress, leave=False)):
        rows, cols = np.ix_(pi, pi)  # one gather of K[pi, pi] (twice as fast as rows, then columns)
        for a, k in enumerate(ks):
            permuted[a].reshape(n, n)[:] = k.gram[rows, cols]
        cross = permuted @ stacked.T  # (streamed, held): <K[pi, pi], L>, one matrix product
        out["linear"][0][j] = cka_ratio(cross, k_norm, h_norm[None, :])
        for a, k in enumerate(ks):
            tr = cross[a] - h_diag @ k.diag[pi]
            hsic = _song(tr, k.off_sum, h_sum, h_rows @ k.off_rows[pi], n)
            out["unbiased"][0][j, a] = cka_ratio(hsic, k_self_u[a], h_self_u)
    for a, k in enumerate(tqdm(ks, desc="bootstrap", disable=not progress or not len(counts))):
        if not len(counts):
            break
        kc = k.gram @ counts.T
        k_lin, k_unb = _weighted_hsic(k, k, kc, kc, counts, m)
        for b, (g, gc) in enumerate(zip(grams, h_counts, strict=True)):
            linear, unbiased = _weighted_hsic(k, g, kc, gc, counts, m)
            out["linear"][1][:, a, b] = cka_ratio(linear, k_lin, h_boot[b][0])
            out["unbiased"][1][:, a, b] = cka_ratio(unbiased, k_unb, h_boot[b][1])
    return {f"{name}_cka": value for name, value in out.items()}


# ---- mutual kNN: relabelled neighbour sets and reweighted per-anchor overlaps ----


def anchor_overlaps(
    vision_sets: Sequence[np.ndarray], text_sets: Sequence[np.ndarray]
) -> np.ndarray:
    """(n, La, Lb): |N_a(i) ∩ N_b(i)| / k for every anchor i and layer pair."""
    n, k = vision_sets[0].shape

    def indicator(sets: np.ndarray) -> sparse.csr_array:
        data = np.ones(n * k)
        return sparse.csr_array(
            (data, np.sort(sets, axis=1).ravel(), np.arange(n + 1) * k), shape=(n, n)
        )

    text_ind = [indicator(s) for s in text_sets]
    overlaps = np.empty((n, len(vision_sets), len(text_sets)))
    for a, sets in enumerate(vision_sets):
        v = indicator(sets)
        for b, t in enumerate(text_ind):
            overlaps[:, a, b] = np.asarray(v.multiply(t).sum(axis=1)).ravel() / k
    return overlaps


def knn_replicates(
    vision_sets: Sequence[np.ndarray], text_sets: Sequence[np.ndarray], replicates: Replicates
) -> tuple[np.ndarray, np.ndarray]:
    """Mutual kNN (null (P, La, Lb), bootstrap (B, La, Lb)) from each layer's neighbour sets.

    A bootstrap reweights the anchors whose neighbourhoods are compared, the neighbourhoods
    staying those of the pool (a resampled copy would be every copy's nearest neighbour in
    both modalities and inflate the overlap).
    """
    n = len(vision_sets[0])
    null = np.empty((len(replicates.permutations), len(vision_sets), len(text_sets)))
    for j, pi in enumerate(replicates.permutations):
        inverse = np.argsort(pi)
        null[j] = mutual_knn_of_sets([inverse[sets[pi]] for sets in vision_sets], text_sets)
    counts = replicates.counts
    overlaps = anchor_overlaps(vision_sets, text_sets).reshape(n, -1)
    boot = (counts @ overlaps / counts.sum(axis=1, keepdims=True)).reshape(
        len(counts), len(vision_sets), len(text_sets)
    )
    return null, boot


# ---- from replicates to the reported columns ----

COLUMNS = (
    "null_mean",
    "null_std",
    "calibrated",
    "p_value",
    "p_value_max",
    "ci_low",
    "ci_high",
    "vs_last_low",
    "vs_last_high",
)


def standardise(values: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(values - null mean) / null std; 0 where the null has no spread."""
    safe = np.where(std > 0, std, 1.0)
    return np.where(std > 0, (values - mean) / safe, 0.0)


def _exceedance(null: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """(1 + #{null >= observed}) / (1 + P), the permutation p-value (exact, conservative)."""
    return (1.0 + (null >= observed).sum(axis=0)) / (1.0 + len(null))


def summarise(
    raw: np.ndarray, null: np.ndarray, boot: np.ndarray, settings: CalibrationSettings
) -> dict[str, np.ndarray]:
    """The ``COLUMNS`` of one metric, each (La, Lb); NaN where the replicates are absent.

    ``p_value_max`` and ``vs_last_*`` are on the selection statistic (raw value or calibrated
    score): the first against the permutation null of the maximum over all layer pairs, the
    second the bootstrap interval of statistic(pair) - statistic(last pair), paired.
    """
    nan = np.full(raw.shape, np.nan)
    out = dict.fromkeys(COLUMNS, nan)
    tail = (1.0 - settings.level) / 2.0
    mean = std = None
    if len(null) >= 2:
        mean, std = null.mean(axis=0), null.std(axis=0, ddof=1)
        z, z_null = standardise(raw, mean, std), standardise(null, mean, std)
        stat, stat_null = (raw, null) if settings.statistic == "raw" else (z, z_null)
        maxima = stat_null.reshape(len(null), -1).max(axis=1)[:, None, None]
        out |= {
            "null_mean": mean,
            "null_std": std,
            "calibrated": z,
            "p_value": _exceedance(null, raw),
            "p_value_max": _exceedance(maxima, stat),
        }
    if len(boot) >= 2:
        out["ci_low"], out["ci_high"] = np.quantile(boot, [tail, 1.0 - tail], axis=0)
        stat_boot = (
            boot if mean is None or settings.statistic == "raw" else standardise(boot, mean, std)
        )
        difference = stat_boot - stat_boot[:, -1:, -1:]
        out["vs_last_low"], out["vs_last_high"] = np.quantile(
            difference, [tail, 1.0 - tail], axis=0
        )
    return out
