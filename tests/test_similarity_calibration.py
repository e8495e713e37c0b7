"""Permutation null, bootstrap and preprocessing of layer similarity against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.similarity import metrics
from pipeline.similarity.calibration import (
    CalibrationSettings,
    Replicates,
    cka_replicates,
    group_bootstrap,
    group_permutations,
    image_groups,
    knn_replicates,
    summarise,
)
from pipeline.similarity.matrix import layer_neighbours, mutual_knn_of_sets
from pipeline.similarity.preprocess import STRUCTURE_QUANTILE, outlier_threshold, preprocess_layers


def layers(n: int, dims: list[int], seed: int, latent: np.ndarray | None = None, signal=1.0):
    rng = np.random.default_rng(seed)
    out = []
    for dim in dims:
        x = rng.standard_normal((n, dim))
        if latent is not None:
            x += signal * latent @ rng.standard_normal((latent.shape[1], dim))
        out.append(x + 2.0)
    return out


def bf_linear_resampled(x: np.ndarray, y: np.ndarray, rows: np.ndarray) -> float:
    """Biased CKA, tr(KHLH), on resampled pool-centred Grams, entries of two copies zeroed."""
    copies = (rows[:, None] == rows[None, :]) & ~np.eye(len(rows), dtype=bool)
    h = np.eye(len(rows)) - 1.0 / len(rows)
    k, l = (metrics.linear_gram(metrics.centred(z))[np.ix_(rows, rows)] for z in (x, y))  # noqa: E741
    k[copies], l[copies] = 0.0, 0.0
    k, l = h @ k @ h, h @ l @ h  # noqa: E741
    return np.vdot(k, l) / np.sqrt(np.vdot(k, k) * np.vdot(l, l))


def bf_unbiased_resampled(x: np.ndarray, y: np.ndarray, rows: np.ndarray) -> float:
    """Song's estimator on resampled pool-centred Grams, copies of a sample zeroed like the
    diagonal."""
    ties = rows[:, None] == rows[None, :]
    k, l = (metrics.linear_gram(metrics.centred(z))[np.ix_(rows, rows)] for z in (x, y))  # noqa: E741
    k[ties], l[ties] = 0.0, 0.0
    hsic = metrics.hsic_unbiased
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def test_group_permutations_move_whole_image_groups():
    image_rows = np.array([7, 7, 7, 3, 3, 3, 9, 9, 5, 5, 1, 1, 1])
    groups = image_groups(image_rows)
    for pi in group_permutations(groups, 20, np.random.default_rng(0)):
        assert sorted(pi) == list(range(len(groups)))
        moved = groups[pi]
        for g in np.unique(groups):  # rows of one group land in one group of the same size
            assert len(set(moved[groups == g])) == 1
            assert (groups == moved[groups == g][0]).sum() == (groups == g).sum()
    singletons = group_permutations(np.arange(50), 1, np.random.default_rng(1))[0]
    assert sorted(singletons) == list(range(50)) and (singletons != np.arange(50)).any()


def test_group_bootstrap_draws_images_with_all_their_captions():
    groups = image_groups(np.array([4, 4, 2, 8, 8, 8]))
    counts = group_bootstrap(groups, 200, np.random.default_rng(0))
    for c in counts:
        for g in np.unique(groups):
            assert len(set(c[groups == g])) == 1
    assert counts[:, groups == groups[0]].mean() == pytest.approx(1.0, abs=0.25)


@pytest.mark.parametrize(("vision_dims", "text_dims"), [([5, 7], [6, 4, 3]), ([6, 4, 3], [5, 7])])
def test_permuted_and_resampled_cka_equal_recomputing_on_the_features(vision_dims, text_dims):
    n = 40
    latent = np.random.default_rng(9).standard_normal((n, 3))
    vision, text = layers(n, vision_dims, 1, latent), layers(n, text_dims, 2, latent)
    rng = np.random.default_rng(3)
    perms = group_permutations(np.arange(n), 4, rng)
    counts = group_bootstrap(np.arange(n), 3, rng)
    found = cka_replicates(vision, text, Replicates(perms, counts), progress=False)
    for j, pi in enumerate(perms):
        for a, x in enumerate(vision):
            for b, y in enumerate(text):
                assert found["linear_cka"][0][j, a, b] == pytest.approx(
                    metrics.linear_cka(x[pi], y), abs=1e-10
                )
                assert found["unbiased_cka"][0][j, a, b] == pytest.approx(
                    metrics.unbiased_cka(x[pi], y), abs=1e-10
                )
    for r, c in enumerate(counts):
        rows = np.repeat(np.arange(n), c.astype(int))
        for a, x in enumerate(vision):
            for b, y in enumerate(text):
                assert found["linear_cka"][1][r, a, b] == pytest.approx(
                    bf_linear_resampled(x, y, rows), abs=1e-10
                )
                assert found["unbiased_cka"][1][r, a, b] == pytest.approx(
                    bf_unbiased_resampled(x, y, rows), abs=1e-10
                )


def test_permuted_and_resampled_mutual_knn_equal_brute_force():
    n, k = 60, 5
    latent = np.random.default_rng(4).standard_normal((n, 4))
    vision, text = layers(n, [6, 8], 5, latent), layers(n, [7], 6, latent)
    rng = np.random.default_rng(7)
    perms = group_permutations(np.arange(n), 3, rng)
    counts = group_bootstrap(np.arange(n), 3, rng)
    vision_sets = layer_neighbours(vision, k, "vision", progress=False)
    text_sets = layer_neighbours(text, k, "text", progress=False)
    null, boot = knn_replicates(vision_sets, text_sets, Replicates(perms, counts))
    for j, pi in enumerate(perms):
        for a, x in enumerate(vision):
            assert null[j, a, 0] == pytest.approx(metrics.mutual_knn(x[pi], text[0], k), abs=1e-12)
    for r, c in enumerate(counts):
        for a, x in enumerate(vision):
            nx, ny = metrics.knn_indices(x, k), metrics.knn_indices(text[0], k)
            per_anchor = [len(set(nx[i]) & set(ny[i])) / k for i in range(n)]
            assert boot[r, a, 0] == pytest.approx(np.average(per_anchor, weights=c), abs=1e-12)
    assert mutual_knn_of_sets(vision_sets, text_sets) == pytest.approx(
        np.array([[metrics.mutual_knn(x, text[0], k)] for x in vision])
    )


def calibrated(vision, text, settings: CalibrationSettings, seed: int):
    n = vision[0].shape[0]
    rng = np.random.default_rng(seed)
    reps = Replicates(
        group_permutations(np.arange(n), settings.permutations, rng),
        group_bootstrap(np.arange(n), settings.bootstrap, rng),
    )
    k = metrics.rice_k(n)
    raw = mutual_knn_of_sets(
        layer_neighbours(vision, k, "v", False), layer_neighbours(text, k, "t", False)
    )
    knn = summarise(
        raw,
        *knn_replicates(
            layer_neighbours(vision, k, "v", False), layer_neighbours(text, k, "t", False), reps
        ),
        settings,
    )
    cka = cka_replicates(vision, text, reps, progress=False)["linear_cka"]
    raw_cka = np.array([[metrics.linear_cka(x, y) for y in text] for x in vision])
    return {"mutual_knn": knn, "linear_cka": summarise(raw_cka, *cka, settings)}


def test_random_pairing_is_centred_on_the_null_and_a_shared_signal_is_significant():
    settings = CalibrationSettings(permutations=50, bootstrap=20, level=0.9)
    n = 120
    z_random = {"mutual_knn": [], "linear_cka": []}
    for seed in range(8):
        independent = calibrated(layers(n, [8], seed), layers(n, [10], 100 + seed), settings, seed)
        for metric, out in independent.items():
            z_random[metric].append(out["calibrated"][0, 0])
    for values in z_random.values():
        assert abs(np.mean(values)) < 1.0  # mean of 8 ~N(0,1) scores
    latent = np.random.default_rng(50).standard_normal((n, 3))
    shared = calibrated(layers(n, [8], 1, latent), layers(n, [10], 2, latent), settings, 0)
    for out in shared.values():
        assert out["calibrated"][0, 0] > 5.0
        assert out["p_value"][0, 0] == pytest.approx(1 / 51)
        assert out["ci_low"][0, 0] > out["null_mean"][0, 0] + 2 * out["null_std"][0, 0]


def test_the_null_of_the_maximum_over_layer_pairs_is_stricter_than_one_cell():
    settings = CalibrationSettings(permutations=99, bootstrap=0)
    n = 80
    result = calibrated(layers(n, [6] * 4, 0), layers(n, [6] * 4, 1), settings, 3)["linear_cka"]
    assert (result["p_value_max"] >= result["p_value"]).all()
    assert (result["p_value_max"] > result["p_value"]).any()
    assert np.isnan(result["ci_low"]).all()  # no bootstrap asked


def test_best_against_last_interval_is_paired_over_resamples():
    n = 100
    latent = np.random.default_rng(2).standard_normal((n, 3))
    vision = [*layers(n, [8], 3, latent, signal=2.0), *layers(n, [8], 4)]  # last layer: noise
    text = layers(n, [8], 5, latent, signal=2.0)
    out = calibrated(vision, text, CalibrationSettings(permutations=20, bootstrap=50), 0)
    for metric in out.values():
        assert metric["vs_last_low"][0, 0] > 0  # the signal layer beats the last
        assert metric["vs_last_low"][1, 0] == metric["vs_last_high"][1, 0] == 0.0


def test_structure_preprocessing_stops_an_outlier_dimension_dominating_cka():
    n = 300
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((n, 4))
    x = latent @ rng.standard_normal((4, 64)) + 0.3 * rng.standard_normal((n, 64))
    y = latent @ rng.standard_normal((4, 48)) + 0.3 * rng.standard_normal((n, 48))
    x_outlier = x.copy()
    x_outlier[:, 0] += 200.0 * rng.standard_normal(n)  # one huge unrelated dimension of 64
    assert metrics.linear_cka(x_outlier, y) < 0.1 < 0.5 < metrics.linear_cka(x, y)
    (vision,), (text,) = (preprocess_layers([z], "structure", 64) for z in (x_outlier, y))
    clamped = metrics.linear_cka(vision[0:n], text[0:n])
    assert clamped > 0.5
    assert np.allclose(np.linalg.norm(vision[0:n], axis=1), 1.0)
    t = outlier_threshold([x_outlier], STRUCTURE_QUANTILE, 64)
    assert t == pytest.approx(np.mean(np.quantile(np.abs(x_outlier), 0.95, axis=1)))
    assert (
        np.abs(vision[0:n] * np.linalg.norm(np.clip(x_outlier, -t, t), axis=1)[:, None]).max()
        <= t + 1e-9
    )
    assert preprocess_layers([x], "none", 64)[0] is x
    with pytest.raises(ValueError, match=r"similarity\.preprocess"):
        preprocess_layers([x], "clamp", 64)


def test_settings_reject_a_calibrated_selection_without_a_null():
    with pytest.raises(ValueError, match=r"similarity\.permutations"):
        CalibrationSettings(permutations=0, statistic="calibrated")
    with pytest.raises(ValueError, match=r"similarity\.selection"):
        CalibrationSettings(statistic="best")


def test_the_config_schema_knows_the_calibration_settings():
    from pipeline.config import load_config, load_schema, validate_config
    from pipeline.similarity.calibration import STATISTICS
    from pipeline.similarity.preprocess import PREPROCESS

    similarity = load_schema()["properties"]["similarity"]["properties"]
    assert similarity["selection"]["enum"] == list(STATISTICS)
    assert similarity["preprocess"]["enum"] == list(PREPROCESS)
    default = load_config("config.yaml")
    assert {key: default["similarity"][key] for key in ("selection", "preprocess")} == {
        "selection": "raw",
        "preprocess": "none",
    }
    config = {**default, "similarity": {**default["similarity"], "selection": "calibrated"}}
    config["similarity"]["permutations"] = 0
    with pytest.raises(Exception, match=r"similarity\.permutations"):
        validate_config(config)
    config["similarity"].update(permutations=5, pool_sizes=[250, "full"])
    assert validate_config(config)["similarity"]["pool_sizes"] == [250, "full"]
