"""Aligner methods on data with known answers; params, determinism, artifacts and the grid."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch
from scipy.linalg import sqrtm
from sklearn.cross_decomposition import CCA

from pipeline.align.artifacts import (
    CURVE,
    DONE,
    PARAMS,
    WEIGHTS,
    load_aligner,
    read_params,
    save_run,
)
from pipeline.align.asif import relative_representation
from pipeline.align.base import CURVE_SCHEMA, Aligner
from pipeline.align.grid import fit_runs
from pipeline.align.kinds import KINDS, aligner_class, aligner_params, build_aligner, uses_tokens
from pipeline.align.linear_maps import ridge_map
from pipeline.align.losses import info_nce
from pipeline.align.training import lr_factor
from pipeline.pairs import grid_runs, is_run_name, nested_subset

FAST_HEAD = {"dim": 16, "batch_size": 64, "max_epochs": 6, "patience": 2}
FAST = {
    "linear": FAST_HEAD,
    "mlp": {**FAST_HEAD, "hidden": 32},
    "csa": {"sim_dim": 4},
    "asif": {"k": 20},
    "procrustes": {},
    "ridge": {},
}


def linear_world(n: int, seed: int, d1: int = 12, d2: int = 16, noise: float = 0.1):
    """Pairs sharing a 4-d latent through fixed linear maps (the maps do not depend on seed)."""
    maps = np.random.default_rng(99)
    a, b = maps.normal(size=(4, d1)), maps.normal(size=(4, d2))
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    x = z @ a + noise * rng.normal(size=(n, d1))
    y = z @ b + noise * rng.normal(size=(n, d2))
    return x.astype(np.float32), y.astype(np.float32)


def unit_rows(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


# ---- building from config ----


def test_registry_holds_every_kind() -> None:
    kinds = {"linear", "mlp", "csa", "asif", "procrustes", "ridge", "pal", "none"}
    assert set(KINDS) == kinds
    for kind in kinds:
        aligner = build_aligner(kind, {})
        assert aligner.kind == kind and isinstance(aligner.params, KINDS[kind].params)


def test_the_table_flags_match_the_classes() -> None:
    """A kind scores patches exactly when its class implements ``patch_scores``; only PAL fits
    on tokens."""
    for kind in KINDS:
        cls = aligner_class(kind)
        assert cls.scores_patches == (cls.patch_scores is not Aligner.patch_scores), kind
        assert build_aligner(kind, {}).scores_patches == (kind == "pal")
    assert [kind for kind in KINDS if uses_tokens(kind)] == ["pal"]
    with pytest.raises(NotImplementedError, match="ridge aligner does not score patch tokens"):
        build_aligner("ridge", {}).patch_scores(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="unknown aligner 'bogus'"):
        uses_tokens("bogus")


def test_unknown_kind_key_and_bad_values_are_named() -> None:
    with pytest.raises(ValueError, match="unknown aligner 'bogus'"):
        build_aligner("bogus", {})
    with pytest.raises(ValueError, match=r"'linear'.*'hidden' is unknown"):
        build_aligner("linear", {"hidden": 8})
    with pytest.raises(ValueError, match=r"'mlp'.*'dropout' must lie in"):
        aligner_params("mlp", {"dropout": 2})
    with pytest.raises(ValueError, match=r"'mlp'.*'structure.lamda' is unknown"):
        build_aligner("mlp", {"structure": {"lamda": 1}})
    with pytest.raises(ValueError, match=r"'linear'.*'structure.divergence'"):
        build_aligner("linear", {"structure": {"divergence": "kl"}})
    with pytest.raises(ValueError, match=r"'csa'.*'sim_dim' must be of type int"):
        build_aligner("csa", {"sim_dim": "many"})
    with pytest.raises(ValueError, match=r"'asif'.*'k' must be >= 1"):
        build_aligner("asif", {"k": 0})
    with pytest.raises(ValueError, match=r"'linear'.*'dim' must be of type int, got True"):
        build_aligner("linear", {"dim": True})


def test_params_are_coerced_and_recorded() -> None:
    aligner = build_aligner("linear", {"lr": "1e-3", "betas": [0.8, 0.9], "structure": {}})
    hp = aligner.hyperparameters()
    assert hp["lr"] == 1e-3 and hp["betas"] == [0.8, 0.9]
    assert hp["structure"] == {
        "lambda": 10.0,
        "levels": 1,
        "warmup_steps": 1000,
        "divergence": "js",
    }
    assert build_aligner("linear", {}).hyperparameters()["structure"] is None


@pytest.mark.parametrize("method", sorted(FAST))
def test_hyperparameters_rebuild_the_same_aligner(method: str) -> None:
    hp = build_aligner(method, FAST[method]).hyperparameters()
    assert hp.pop("fitted") == {}
    assert build_aligner(method, hp).hyperparameters() == {**hp, "fitted": {}}
    json.dumps(hp)


# ---- every method: shapes, norms, beating chance, input checks ----


@pytest.mark.parametrize("method", sorted(FAST))
def test_methods_embed_unit_rows_and_retrieve(method: str) -> None:
    x, y = linear_world(300, seed=0)
    xt, yt = linear_world(100, seed=1)
    aligner = build_aligner(method, FAST[method])
    aligner.fit(x, y, *linear_world(60, seed=2), seed=0)
    ei, et = aligner.embed_image(xt), aligner.embed_text(yt)
    assert ei.dtype == et.dtype == np.float32 and ei.shape[1] == et.shape[1]
    np.testing.assert_allclose(np.linalg.norm(ei, axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(et, axis=1), 1, rtol=1e-5)
    scores = aligner.similarity(ei, et)
    assert scores.shape == (100, 100)
    top1 = (scores.argmax(axis=1) == np.arange(100)).mean()
    assert top1 > 0.2  # chance is 0.01


@pytest.mark.parametrize("method", sorted(FAST))
def test_bad_inputs_raise_named_errors(method: str) -> None:
    x, y = linear_world(40, seed=0)
    aligner = build_aligner(method, FAST[method])
    with pytest.raises(RuntimeError, match="not fitted"):
        aligner.embed_image(x)
    with pytest.raises(ValueError, match="39 text rows"):
        aligner.fit(x, y[:39], None, None, seed=0)
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        aligner.fit(bad, y, None, None, seed=0)
    aligner.fit(x, y, None, None, seed=0)
    with pytest.raises(ValueError, match="width 12"):
        aligner.embed_image(x[:, :5])
    with pytest.raises(ValueError, match="text features"):
        aligner.embed_text(y[:, :5])


# ---- trained heads ----


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("linear", {**FAST_HEAD, "structure": {"lambda": 5, "warmup_steps": 3, "levels": 2}}),
        ("mlp", {**FAST_HEAD, "hidden": 32, "dropout": 0.3}),
    ],
)
def test_training_is_deterministic_for_a_seed(method: str, params: dict) -> None:
    x, y = linear_world(200, seed=0)
    xv, yv = linear_world(50, seed=1)

    def weights(seed: int) -> dict[str, np.ndarray]:
        aligner = build_aligner(method, params)
        aligner.fit(x, y, xv, yv, seed=seed)
        return aligner.state()

    first, again, other = weights(7), weights(7), weights(8)
    assert first.keys() == again.keys()
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert any(not np.array_equal(first[k], other[k]) for k in first if k.endswith("weight"))


def test_early_stopping_keeps_the_best_validation_epoch() -> None:
    x, y = linear_world(40, seed=0, noise=1.0)  # few noisy pairs: validation loss turns up
    xv, yv = linear_world(200, seed=1, noise=1.0)
    aligner = build_aligner(
        "linear", {"dim": 32, "lr": 0.05, "max_epochs": 300, "patience": 5, "batch_size": 256}
    )
    report = aligner.fit(x, y, xv, yv, seed=0)
    curve = report.curve
    assert curve.schema == pl.Schema(CURVE_SCHEMA)
    best = int(curve["epoch"][int(np.argmin(curve["val_loss"].to_numpy()))])
    assert report.chosen_epoch == best
    assert report.extra["stopped_early"] and len(curve) == best + 5
    assert curve["step"].to_list() == curve["epoch"].to_list()  # one batch of 40 per epoch
    # the restored weights are the best epoch's: their validation loss (one batch of all 200
    # validation pairs) is the recorded one
    zi, zt = (torch.from_numpy(a) for a in (aligner.embed_image(xv), aligner.embed_text(yv)))
    assert info_nce(zi, zt, 0.05).item() == pytest.approx(curve["val_loss"][best - 1], rel=1e-5)


def test_early_stopping_waits_for_the_structure_warmup() -> None:
    """One step per epoch and a 30-step warm-up: the plain head stops within a few epochs,
    the STRUCTURE head trains at least until lambda is at full weight and chooses an epoch
    from then on."""
    x, y = linear_world(40, seed=0, noise=1.0)
    xv, yv = linear_world(200, seed=1, noise=1.0)
    head = {"dim": 32, "lr": 0.05, "max_epochs": 300, "patience": 5, "batch_size": 256}
    plain = build_aligner("linear", head).fit(x, y, xv, yv, seed=0)
    assert len(plain.curve) < 30
    structure = {"lambda": 1.0, "warmup_steps": 30}
    report = build_aligner("linear", {**head, "structure": structure}).fit(x, y, xv, yv, seed=0)
    curve = report.curve
    assert report.chosen_epoch >= 31 and len(curve) >= 36
    assert curve["structure_lambda"][report.chosen_epoch - 1] == pytest.approx(1.0)
    after = curve.filter(pl.col("structure_lambda") == 1.0)
    best = int(after["epoch"][int(np.argmin(after["val_loss"].to_numpy()))])
    assert report.chosen_epoch == best and len(curve) == best + 5


def test_training_that_ends_inside_the_warmup_keeps_and_reports_the_last_epoch() -> None:
    x, y = linear_world(40, seed=0)
    params = {**FAST_HEAD, "max_epochs": 3, "structure": {"lambda": 1.0, "warmup_steps": 1000}}
    report = build_aligner("linear", params).fit(x, y, *linear_world(40, seed=1), seed=0)
    assert report.chosen_epoch == 3 == len(report.curve)


def test_without_validation_the_last_epoch_is_kept() -> None:
    x, y = linear_world(100, seed=0)
    report = build_aligner("linear", FAST_HEAD).fit(x, y, None, None, seed=0)
    assert report.chosen_epoch == FAST_HEAD["max_epochs"] == len(report.curve)
    assert report.curve["val_loss"].null_count() == len(report.curve)


def test_structure_curve_columns_and_warmup() -> None:
    x, y = linear_world(128, seed=0)
    params = {**FAST_HEAD, "structure": {"lambda": 4, "warmup_steps": 8}, "max_epochs": 5}
    report = build_aligner("linear", params).fit(x, y, *linear_world(64, seed=1), seed=0)
    curve = report.curve
    # 2 batches per epoch; lambda_t at the last step of epoch e is 4 * min(1, (2e - 1) / 8)
    assert curve["structure_lambda"].to_list() == [4 * min(1, (2 * e - 1) / 8) for e in range(1, 6)]
    assert (curve["structure"] > 0).all()
    lam, total = curve["structure_lambda"], curve["train_loss"]
    np.testing.assert_array_less(curve["infonce"].to_numpy(), total.to_numpy() + 1e-12)
    assert (lam > 0).all()


def test_learning_rate_schedule() -> None:
    assert [lr_factor(s, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, 4, 20) == 1.0
    assert lr_factor(12, 4, 20) == pytest.approx(0.5)
    assert lr_factor(20, 4, 20) == pytest.approx(0.0)
    assert lr_factor(0, 0, 10) == 1.0


def test_mlp_residual_path_trains() -> None:
    x, y = linear_world(100, seed=0)
    params = {**FAST_HEAD, "hidden": 32}
    aligner = build_aligner("mlp", params)
    aligner.fit(x, y, None, None, seed=3)
    trained = aligner.state()["image.1.skip.weight"]
    untrained = build_aligner("mlp", {**params, "max_epochs": 1, "lr": 1e-12})
    untrained.fit(x, y, None, None, seed=3)
    assert np.abs(trained - untrained.state()["image.1.skip.weight"]).max() > 1e-3
    no_skip = build_aligner("mlp", {**params, "residual": False})
    no_skip.fit(x, y, None, None, seed=3)
    assert not any("skip" in key for key in no_skip.state())


# ---- CSA ----


def correlated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3)) * np.array([2.0, 1.0, 0.5])
    x = z @ rng.normal(size=(3, 6)) + 0.8 * rng.normal(size=(n, 6)) + 5.0
    y = z @ rng.normal(size=(3, 5)) + 0.8 * rng.normal(size=(n, 5)) - 2.0
    return x, y


def test_csa_matches_direct_whitening_and_svd() -> None:
    x, y = correlated(500, seed=0)
    xt, yt = correlated(50, seed=1)
    aligner = build_aligner("csa", {"sim_dim": 4, "eps": 0.0})
    aligner.fit(x, y, None, None, seed=0)
    # the formula, written directly: C^-1/2 by scipy's matrix square root
    xc, yc = x - x.mean(0), y - y.mean(0)
    cxx, cyy, cxy = (a.T @ b / (len(x) - 1) for a, b in ((xc, xc), (yc, yc), (xc, yc)))
    wx, wy = np.linalg.inv(sqrtm(cxx).real), np.linalg.inv(sqrtm(cyy).real)
    u, rho, vt = np.linalg.svd(wx @ cxy @ wy)
    np.testing.assert_allclose(aligner.state()["correlations"], rho[:4], rtol=1e-10)
    ui = unit_rows((xt - x.mean(0)) @ wx @ u[:, :4])
    vi = unit_rows((yt - y.mean(0)) @ wy @ vt[:4].T)
    expected = (ui * rho[:4]) @ vi.T
    got = aligner.similarity(aligner.embed_image(xt), aligner.embed_text(yt))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    # canonical coordinates of the training data: white, cross-covariance diag(rho)
    a, b = aligner.state()["image_directions"], aligner.state()["text_directions"]
    cu, cv = xc @ a, yc @ b
    np.testing.assert_allclose(cu.T @ cu / (len(x) - 1), np.eye(4), atol=1e-10)
    np.testing.assert_allclose(cu.T @ cv / (len(x) - 1), np.diag(rho[:4]), atol=1e-10)


def test_csa_correlations_match_sklearn_cca() -> None:
    x, y = correlated(2000, seed=2)
    aligner = build_aligner("csa", {"sim_dim": 3, "eps": 0.0})
    aligner.fit(x, y, None, None, seed=0)
    sk = CCA(n_components=3, scale=False, max_iter=5000, tol=1e-12).fit(x, y)
    u, v = sk.transform(x, y)
    sk_rho = [abs(np.corrcoef(u[:, i], v[:, i])[0, 1]) for i in range(3)]
    np.testing.assert_allclose(aligner.state()["correlations"], sk_rho, atol=1e-3)


def test_csa_small_n_reduces_or_raises() -> None:
    x, y = linear_world(10, seed=0)  # 10 pairs, widths 12 and 16
    with pytest.raises(ValueError, match="10 pairs <= image feature width 12"):
        build_aligner("csa", {"reduce": "error"}).fit(x, y, None, None, seed=0)
    aligner = build_aligner("csa", {"sim_dim": 50})
    aligner.fit(x, y, None, None, seed=0)
    assert aligner.hyperparameters()["fitted"] == {
        "rank": 9,
        "pca_dims": {"image": 9, "text": 9},
        "feature_ranks": None,
    }
    assert aligner.embed_image(x).shape == (10, 9)
    configured = build_aligner("csa", {"pca_dim": 3, "reduce": "error"})
    configured.fit(*linear_world(100, seed=0), None, None, seed=0)
    assert configured.hyperparameters()["fitted"] == {
        "rank": 3,
        "pca_dims": {"image": 3, "text": 3},
        "feature_ranks": None,
    }


RHO = np.array([0.9, 0.6, 0.3])


def known_correlations(n: int, seed: int, d1: int = 6, d2: int = 5) -> tuple[np.ndarray, ...]:
    """Pairs whose sample canonical correlations are exactly ``RHO`` (then 0): white centred
    u, w and extra columns (orthonormal after QR of centred noise), v = RHO u + sqrt(1 - RHO^2)
    w, each side padded with its own uncorrelated columns, mixed by a random invertible map and
    shifted. CCA is invariant to the maps."""
    rng = np.random.default_rng(seed)
    r = len(RHO)
    cols = 2 * r + (d1 - r) + (d2 - r)
    noise = rng.normal(size=(n, cols))
    q = np.linalg.qr(noise - noise.mean(0))[0] * np.sqrt(n - 1)
    u, w = q[:, :r], q[:, r : 2 * r]
    v = u * RHO + w * np.sqrt(1 - RHO**2)
    x = np.hstack([u, q[:, 2 * r : r + d1]]) @ rng.normal(size=(d1, d1)) + 3.0
    y = np.hstack([v, q[:, r + d1 :]]) @ rng.normal(size=(d2, d2)) - 1.0
    return x, y


def test_unregularised_csa_recovers_known_correlations_and_the_ridge_shrinks_them() -> None:
    x, y = known_correlations(400, seed=0)
    exact = build_aligner("csa", {"sim_dim": 5, "eps": 0})
    exact.fit(x, y, None, None, seed=0)
    np.testing.assert_allclose(exact.state()["correlations"], [*RHO, 0, 0], atol=1e-9)
    assert exact.hyperparameters()["fitted"]["feature_ranks"] == {"image": 6, "text": 5}
    ridge = build_aligner("csa", {"sim_dim": 3})  # eps 0.1 x the mean variance
    ridge.fit(x, y, None, None, seed=0)
    shrunk = ridge.state()["correlations"]
    assert np.all(shrunk < RHO - 1e-3) and np.all(shrunk > 0), shrunk


def test_a_rank_deficient_side_is_an_error_or_reduced_to_its_rank(tmp_path) -> None:
    x, y = known_correlations(400, seed=1)
    # a text column that is a sum of two others, stored as float32 as the feature stores do
    y = np.hstack([y, y[:, :1] + y[:, 1:2]]).astype(np.float32)
    params = {"sim_dim": 3, "eps": 0, "reduce": "error"}
    with pytest.raises(ValueError, match=r"text features have numerical rank 5 of 6.*eps > 0"):
        build_aligner("csa", params).fit(x, y, None, None, seed=0)
    meta = {"method": "csa_reference", "vision_encoder": "dinov2", "vision_layer": 23}
    meta |= {"text_encoder": "roberta", "text_layer": 24}
    grid = grid_runs(["full"], [0], len(x))
    with pytest.raises(ValueError, match=r"csa_reference run n400_s0 \(dinov2 layer 23, "):
        fit_runs("csa", params, (x, y, None, None), grid, tmp_path, meta)
    reduced = build_aligner("csa", {**params, "reduce": "pca"})
    reduced.fit(x, y, None, None, seed=0)
    fitted = reduced.hyperparameters()["fitted"]
    assert fitted["pca_dims"] == {"image": None, "text": 5}
    assert fitted["feature_ranks"] == {"image": 6, "text": 5}
    np.testing.assert_allclose(reduced.state()["correlations"], RHO, atol=1e-6)
    # with the ridge the covariance is invertible at any rank: nothing reduced, rank unchecked
    ridge = build_aligner("csa", {"sim_dim": 3, "reduce": "error"})
    ridge.fit(x, y, None, None, seed=0)
    assert ridge.hyperparameters()["fitted"]["pca_dims"] == {"image": None, "text": None}


def test_equal_weights_score_the_cosine_of_canonical_coordinates() -> None:
    x, y = known_correlations(400, seed=2)
    weighted = build_aligner("csa", {"sim_dim": 3, "eps": 0})
    equal = build_aligner("csa", {"sim_dim": 3, "eps": 0, "equal_weights": True})
    for aligner in (weighted, equal):
        aligner.fit(x, y, None, None, seed=0)
    u, v = equal.embed_image(x[:20]), equal.embed_text(y[:20])
    np.testing.assert_array_equal(u, weighted.embed_image(x[:20]))
    np.testing.assert_allclose(equal.similarity(u, v), u @ v.T, atol=1e-6)
    np.testing.assert_allclose(weighted.similarity(u, v), (u * RHO) @ v.T, atol=1e-6)


# ---- ASIF ----


def test_asif_hand_made_case() -> None:
    anchors = np.eye(3)  # both modalities: anchors along the axes
    rep = relative_representation(np.array([[3.0, 4.0, 0.0], [3.0, -4.0, 0.0]]), anchors, 3, 2)
    # cosines (0.6, +-0.8, 0), signed squares (0.36, +-0.64, 0), normalised by sqrt(0.5392)
    expected = np.array([[0.36, 0.64, 0.0], [0.36, -0.64, 0.0]]) / np.sqrt(0.5392)
    np.testing.assert_allclose(rep, expected, rtol=1e-12)
    top1 = relative_representation(np.array([[3.0, 4.0, 1.0]]), anchors, 1, 8)
    np.testing.assert_allclose(top1, [[0.0, 1.0, 0.0]])

    aligner = build_aligner("asif", {"p": 2})  # k = 800, capped at the 3 anchors
    aligner.fit(anchors, 5 * anchors, None, None, seed=0)
    assert aligner.hyperparameters()["fitted"] == {"k": 3, "n_anchors": 3}
    image = aligner.embed_image(np.array([[3.0, 4.0, 0.0], [3.0, -4.0, 0.0]]))
    text = aligner.embed_text(np.array([[0.0, 4.0, 3.0]]))
    np.testing.assert_allclose(aligner.similarity(image, text)[:, 0], [0.7596, -0.7596], atol=1e-4)


# ---- Procrustes and ridge ----


def isometric_pairs(n: int, d1: int, d2: int, seed: int) -> tuple[np.ndarray, ...]:
    """Unit rows x and y = x Q with Q (d1, d2) orthonormal rows, so y rows are unit too."""
    rng = np.random.default_rng(seed)
    q = np.linalg.qr(rng.normal(size=(d2, d1)))[0].T
    x = unit_rows(rng.normal(size=(n, d1)))
    return x, x @ q, q


def test_procrustes_recovers_a_rotation() -> None:
    x, y, q = isometric_pairs(200, 5, 5, seed=0)
    aligner = build_aligner("procrustes", {})
    aligner.fit(x, y, None, None, seed=0)
    assert aligner.hyperparameters()["fitted"] == {"dim": 5}
    xt = unit_rows(np.random.default_rng(1).normal(size=(30, 5)))
    np.testing.assert_allclose(aligner.embed_image(xt), aligner.embed_text(xt @ q), atol=1e-6)
    reduced = build_aligner("procrustes", {"dim": 3})
    reduced.fit(x, y, None, None, seed=0)
    assert reduced.embed_image(xt).shape == (30, 3)


def test_ridge_recovers_a_linear_map_and_matches_the_augmented_least_squares() -> None:
    x, y, q = isometric_pairs(200, 5, 8, seed=2)
    aligner = build_aligner("ridge", {"alpha": 0.0})
    aligner.fit(x, y, None, None, seed=0)
    xt = unit_rows(np.random.default_rng(3).normal(size=(30, 5)))
    np.testing.assert_allclose(aligner.embed_image(xt), aligner.embed_text(xt @ q), atol=1e-6)
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(50, 6)), rng.normal(size=(50, 3))
    augmented_a = np.vstack([a, np.sqrt(2.5) * np.eye(6)])
    augmented_b = np.vstack([b, np.zeros((6, 3))])
    expected = np.linalg.lstsq(augmented_a, augmented_b, rcond=None)[0]
    np.testing.assert_allclose(ridge_map(a, b, 2.5), expected, atol=1e-12)


# ---- artifacts ----


@pytest.mark.parametrize("method", sorted(FAST))
def test_artifacts_round_trip(method: str, tmp_path) -> None:
    x, y = linear_world(120, seed=0)
    xt, yt = linear_world(30, seed=1)
    aligner = build_aligner(method, FAST[method])
    report = aligner.fit(x, y, *linear_world(40, seed=2), seed=0)
    run = save_run(tmp_path / "run", aligner, report, {"n_pairs": 120, "seed": 0})
    assert sorted(p.name for p in run.iterdir()) == sorted([WEIGHTS, PARAMS, CURVE, DONE])
    loaded = load_aligner(run)
    assert type(loaded) is type(aligner)
    assert loaded.hyperparameters() == aligner.hyperparameters()
    for embed in ("embed_image", "embed_text"):
        data = xt if embed == "embed_image" else yt
        assert np.array_equal(getattr(loaded, embed)(data), getattr(aligner, embed)(data))
    ei, et = aligner.embed_image(xt), aligner.embed_text(yt)
    assert np.array_equal(loaded.similarity(ei, et), aligner.similarity(ei, et))
    params = read_params(run)
    assert params["aligner"] == method and params["meta"] == {"n_pairs": 120, "seed": 0}
    assert params["chosen_epoch"] == report.chosen_epoch
    assert "torch" in params["versions"] and params["divergence"] is None
    curve = pl.read_parquet(run / CURVE)
    assert curve.schema == pl.Schema(CURVE_SCHEMA)
    assert (len(curve) > 0) == (method in ("linear", "mlp"))


def test_artifacts_record_the_divergence_and_need_the_marker(tmp_path) -> None:
    x, y = linear_world(64, seed=0)
    aligner = build_aligner("linear", {**FAST_HEAD, "structure": {"divergence": "reference"}})
    run = save_run(tmp_path / "run", aligner, aligner.fit(x, y, None, None, seed=0), {})
    assert read_params(run)["divergence"] == "reference"
    (run / DONE).unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        load_aligner(run)
    with pytest.raises(RuntimeError, match="not fitted"):  # a failed save leaves no marker
        save_run(tmp_path / "failed", build_aligner("ridge", {}), None, {})
    assert not (tmp_path / "failed" / DONE).exists()


# ---- the grid ----


def test_fit_runs_nested_subsets_and_resume(tmp_path) -> None:
    x, y = linear_world(300, seed=0)
    features = (x, y, *linear_world(50, seed=1))
    grid = grid_runs([30, 100, "full"], [0, 5], len(x))

    def fit(params):
        return fit_runs("csa", params, features, grid, tmp_path, {"layer": 4})

    runs = fit({"sim_dim": 3})
    assert [r.name for r in runs] == [
        "n30_s0",
        "n30_s5",
        "n100_s0",
        "n100_s5",
        "n300_s0",
        "n300_s5",
    ]
    assert all(is_run_name(run.name) for run in runs)
    assert not any(
        is_run_name(name) for name in ("n30_s", "n30_s0x", "xn30_s0", "n_s0", "runs.json")
    )
    for run in runs:
        params = read_params(run)
        n, seed = params["meta"]["n_pairs"], params["meta"]["seed"]
        assert params["meta"]["layer"] == 4 and params["fit"]["n_train"] == n
        rows = nested_subset(300, n, seed)
        refit = build_aligner("csa", {"sim_dim": 3})
        refit.fit(x[rows], y[rows], None, None, seed)
        assert np.array_equal(load_aligner(run).embed_image(x[:5]), refit.embed_image(x[:5]))
    stamps = {r: (r / DONE).stat().st_mtime_ns for r in runs}
    assert fit({"sim_dim": 3}) == runs
    assert all((r / DONE).stat().st_mtime_ns == stamps[r] for r in runs)
    fit({"sim_dim": 2})
    assert all((r / DONE).stat().st_mtime_ns != stamps[r] for r in runs)
    assert read_params(runs[0])["hyperparameters"]["sim_dim"] == 2
    with pytest.raises(ValueError, match="n_pairs=400 is outside"):
        grid_runs([400], [0], len(x))


def test_fit_runs_trains_heads_and_restores_threads(tmp_path) -> None:
    x, y = linear_world(200, seed=0)
    before = torch.get_num_threads()
    grid = grid_runs([50, 200], [1], len(x))
    runs = fit_runs("linear", FAST_HEAD, (x, y, None, None), grid, tmp_path, {}, threads=1)
    assert torch.get_num_threads() == before
    assert [read_params(r)["chosen_epoch"] for r in runs] == [6, 6]
