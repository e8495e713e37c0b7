"""All-layer-pair similarity, the stage function on real Zarr stores, layer choice, heatmaps."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from matplotlib.image import imread
from scipy.stats import ortho_group

from pipeline.pairs import Pairs, nested_subset, pair_rows
from pipeline.similarity import (
    METRICS,
    StoreRows,
    compute_similarity,
    matrix,
    metrics,
    scoring_pairs,
    select_layers,
    similarity_table,
    write_layer_choice,
)
from pipeline.similarity.calibration import CalibrationSettings
from pipeline.similarity.plots import score_grid, write_heatmap, write_pool_size_plot
from pipeline.similarity.selection import CALIBRATION_KEYS
from pipeline.stores.core import IncompleteStoreError
from pipeline.stores.features import FeatureStore, FeatureWriter

# ---- brute force, written plainly from the formulas (docs/similarity.md) ----


def bf_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T  # noqa: E741

    def hsic(a, b):
        return np.trace(a @ h @ b @ h) / (n - 1) ** 2

    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def bf_unbiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    n = len(x)
    one = np.ones(n)

    def hsic(a, b):
        a, b = a - np.diag(np.diag(a)), b - np.diag(np.diag(b))
        return (
            np.trace(a @ b)
            + (one @ a @ one) * (one @ b @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * (one @ a @ b @ one)
        ) / (n * (n - 3))

    k, l = x @ x.T, y @ y.T  # noqa: E741
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def bf_mutual_knn(x: np.ndarray, y: np.ndarray, k: int) -> float:
    def sets(z):
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        order = np.argsort(-(z @ z.T), axis=1, kind="stable")
        return [set([j for j in row if j != i][:k]) for i, row in enumerate(order)]

    return float(np.mean([len(a & b) / k for a, b in zip(sets(x), sets(y), strict=True)]))


def pairwise(function, vision, text, *args) -> np.ndarray:
    return np.array([[function(x, y, *args) for y in text] for x in vision])


# ---- data ----


def random_layers(n: int, dims: list[int], seed: int, shared: np.ndarray | None = None):
    """Layers with non-zero means; each mixes in a latent ``shared`` signal when given."""
    rng = np.random.default_rng(seed)
    layers = []
    for d in dims:
        x = rng.standard_normal((n, d)) + 5.0 * rng.standard_normal(d)
        if shared is not None:
            x += shared @ rng.standard_normal((shared.shape[1], d))
        layers.append(x)
    return layers


def write_store(path, layers, chunk_rows: int = 16, layer_names=None):
    """A complete feature store written with the project's writer, ``chunk_rows`` per chunk."""
    dims = [values.shape[1] for values in layers]
    writer = FeatureWriter.create_or_resume(
        path,
        fingerprint="test",
        sample_ids=[f"s{i}" for i in range(len(layers[0]))],
        layer_names=layer_names or [f"block{i}" for i in range(len(layers))],
        dims=dims,
        attrs={},
        chunk_bytes=4 * min(dims) * chunk_rows,
    )
    for block, start, stop in writer.pending_blocks():
        writer.write_block(block, [values[start:stop].astype(np.float32) for values in layers])
    writer.finalize()
    return path


# ---- all-pairs matrices against brute force ----


@pytest.mark.parametrize(("chunk_rows", "budget"), [(7, 1), (13, 200_000), (10_000, 1 << 30)])
def test_cka_matrices_equal_brute_force(chunk_rows, budget):
    n = 45
    latent = np.random.default_rng(9).standard_normal((n, 3))
    vision = random_layers(n, [4, 60, 9], seed=1, shared=latent)  # 60 > n
    text = random_layers(n, [7, 50], seed=2, shared=latent)
    moments = matrix.centred_moments(vision, text, chunk_rows, budget, progress=False)
    linear, unbiased = matrix.linear_cka_matrix(moments), matrix.unbiased_cka_matrix(moments)
    assert linear.shape == unbiased.shape == (3, 2)
    np.testing.assert_allclose(linear, pairwise(bf_linear_cka, vision, text), rtol=0, atol=1e-10)
    np.testing.assert_allclose(
        unbiased, pairwise(bf_unbiased_cka, vision, text), rtol=0, atol=1e-10
    )


def test_accumulator_budget_splits_vision_layers_into_passes():
    assert matrix.plan_vision_blocks([4, 4, 4], [2], 10**9) == [[0, 1, 2]]
    # text grams 8*4 bytes, each vision layer 8*4*(2+4) = 192 bytes
    assert matrix.plan_vision_blocks([4, 4, 4], [2], 8 * 4 + 192) == [[0], [1], [2]]
    assert matrix.plan_vision_blocks([4, 4, 4], [2], 2 * 192) == [[0], [1, 2]]
    assert matrix.plan_vision_blocks([4, 4, 4], [2], 1) == [[0], [1], [2]]


def test_streaming_stays_accurate_when_means_dwarf_the_spread():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((500, 6)), rng.standard_normal((500, 5))
    y[:, 0] += x[:, 0]
    far = matrix.centred_moments([x + 1e6], [y - 1e6], chunk_rows=64, progress=False)
    near = matrix.centred_moments([x], [y], chunk_rows=500, progress=False)
    for score in (matrix.linear_cka_matrix, matrix.unbiased_cka_matrix):
        np.testing.assert_allclose(score(far), score(near), rtol=0, atol=1e-10)
    assert matrix.linear_cka_matrix(near)[0, 0] == pytest.approx(bf_linear_cka(x, y), abs=1e-12)


def test_streaming_from_a_zarr_store_equals_in_memory(tmp_path):
    n_store, dims_v, dims_t = 103, [5, 33], [8, 3, 20]
    vision = random_layers(n_store, dims_v, seed=4)
    text = random_layers(n_store, dims_t, seed=5)
    vision_store = FeatureStore.open(write_store(tmp_path / "v.zarr", vision))
    text_store = FeatureStore.open(write_store(tmp_path / "t.zarr", text))
    assert vision_store.layer(0).chunks == (16, 5)  # seven chunks, the last of 7 rows
    rows = np.random.default_rng(0).permutation(n_store)[:91]  # unsorted subset of rows
    streamed = matrix.centred_moments(
        [StoreRows(vision_store.layer(i), rows) for i in range(2)],
        [StoreRows(text_store.layer(i), rows) for i in range(3)],
        chunk_rows=10,  # nine full chunks and one of a single row
        max_accumulator_bytes=1,
        progress=False,
    )
    in_memory_v = [v[rows].astype(np.float32).astype(np.float64) for v in vision]
    in_memory_t = [t[rows].astype(np.float32).astype(np.float64) for t in text]
    in_memory = matrix.centred_moments(in_memory_v, in_memory_t, chunk_rows=91, progress=False)
    for score in (matrix.linear_cka_matrix, matrix.unbiased_cka_matrix):
        np.testing.assert_allclose(score(streamed), score(in_memory), rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        matrix.linear_cka_matrix(streamed),
        pairwise(bf_linear_cka, in_memory_v, in_memory_t),
        rtol=0,
        atol=1e-10,
    )


def test_minibatch_matrix_equals_the_per_pair_minibatch_cka():
    vision = random_layers(70, [3, 25], seed=6)
    text = random_layers(70, [40, 2, 6], seed=7)
    found = matrix.minibatch_cka_matrix(vision, text, 16, seed=11, progress=False)
    expected = pairwise(metrics.minibatch_cka, vision, text, 16, 11)
    np.testing.assert_allclose(found, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("k", [1, 4, "rice"])
def test_mutual_knn_matrix_equals_brute_force(k):
    latent = np.random.default_rng(1).standard_normal((60, 2))
    vision = random_layers(60, [3, 30], seed=8, shared=latent)
    text = random_layers(60, [5, 2, 70], seed=9, shared=latent)
    k_int = metrics.resolve_k(k, 60)
    found = matrix.mutual_knn_matrix(vision, text, k, progress=False)
    np.testing.assert_allclose(found, pairwise(bf_mutual_knn, vision, text, k_int), atol=1e-12)


def test_matrices_of_a_layer_with_itself_and_constant_layers():
    x = random_layers(30, [6], seed=1)[0]
    constant = np.full((30, 4), 2.5)
    rotated = 2.0 * x @ ortho_group.rvs(6, random_state=0) - 1.0
    moments = matrix.centred_moments([x, constant], [rotated, constant], progress=False)
    for score in (matrix.linear_cka_matrix(moments), matrix.unbiased_cka_matrix(moments)):
        assert np.all(np.isfinite(score))
        assert score[0, 0] == pytest.approx(1.0, abs=1e-12)
        assert np.all(score[1, :] == 0.0) and np.all(score[:, 1] == 0.0)
    assert matrix.mutual_knn_matrix([x], [x @ ortho_group.rvs(6, random_state=1)], 5)[0, 0] == 1.0


def test_layers_must_share_their_rows():
    with pytest.raises(ValueError, match="text layer 1 has 9 rows, expected 10"):
        matrix.sample_count([np.zeros((10, 2))], [np.zeros((10, 3)), np.zeros((9, 3))])
    with pytest.raises(ValueError, match="vision layer 0 has shape"):
        matrix.sample_count([np.zeros(10)], [np.zeros((10, 3))])


# ---- the stage: scoring sample, stores, table ----


def image_caption_pairs(n_images: int, captions_per_image: int, seed: int = 0) -> Pairs:
    rng = np.random.default_rng(seed)
    image_ids = [f"img{i}" for i in range(n_images)]
    caption_images = np.repeat(image_ids, captions_per_image)[
        rng.permutation(n_images * captions_per_image)
    ]
    images = pl.DataFrame({"image_id": image_ids})
    captions = pl.DataFrame({"image_id": caption_images.tolist()})
    return pair_rows(images, captions)


def test_run_scoring_pairs_never_exceed_the_run_and_are_nested():
    pairs = image_caption_pairs(200, 5)
    previous = None
    for n_pairs in (10, 50, 300, 1000):
        visible = pairs.take(nested_subset(len(pairs), n_pairs, seed=42))
        chosen = scoring_pairs(pairs, "run", pool_size=5000, seed=42, n_pairs=n_pairs)
        assert len(chosen) <= n_pairs
        assert len(np.unique(chosen.image_rows)) == len(chosen)  # one caption per image
        assert set(chosen.caption_rows) <= set(visible.caption_rows)
        assert len(chosen) == len(np.unique(visible.image_rows))  # every visible image scored
        if previous is not None:
            assert np.array_equal(chosen.caption_rows[: len(previous)], previous.caption_rows)
        previous = chosen
    capped = scoring_pairs(pairs, "run", pool_size=20, seed=42, n_pairs=300)
    uncapped = scoring_pairs(pairs, "run", pool_size=5000, seed=42, n_pairs=300)
    assert np.array_equal(capped.caption_rows, uncapped.caption_rows[:20])


def test_pool_scoring_pairs_are_a_seeded_capped_nested_pool():
    pairs = image_caption_pairs(300, 5)
    pool = scoring_pairs(pairs, "pool", pool_size=100, seed=1)
    assert len(pool) == 100 and len(np.unique(pool.image_rows)) == 100
    assert np.array_equal(pool.caption_rows, scoring_pairs(pairs, "pool", 100, 1).caption_rows)
    assert not np.array_equal(pool.caption_rows, scoring_pairs(pairs, "pool", 100, 2).caption_rows)
    bigger = scoring_pairs(pairs, "pool", pool_size=250, seed=1)
    assert np.array_equal(bigger.caption_rows[:100], pool.caption_rows)
    assert len(scoring_pairs(pairs, "pool", pool_size=5000, seed=1)) == 300  # all images
    with pytest.raises(ValueError, match="unknown scoring mode"):
        scoring_pairs(pairs, "everything", 100, 1)
    with pytest.raises(ValueError, match="n_pairs"):
        scoring_pairs(pairs, "run", 100, 1, n_pairs=10**6)


@pytest.fixture
def planted_stores(tmp_path):
    """Vision layer 2 and text layer 1 carry the same latent signal; other layers less or none."""
    n_images, captions_per_image = 150, 2
    rng = np.random.default_rng(0)
    latent = rng.standard_normal((n_images, 4))
    noise = np.random.default_rng(1)
    vision = [
        noise.standard_normal((n_images, 12)),
        noise.standard_normal((n_images, 20)) + 0.3 * latent @ noise.standard_normal((4, 20)),
        latent @ noise.standard_normal((4, 16)) + 0.05 * noise.standard_normal((n_images, 16)),
        noise.standard_normal((n_images, 8)) + 0.5 * latent @ noise.standard_normal((4, 8)),
    ]
    pairs = image_caption_pairs(n_images, captions_per_image, seed=3)
    per_caption_latent = latent[pairs.image_rows]
    n_captions = len(pairs)
    text = [
        noise.standard_normal((n_captions, 10)),
        per_caption_latent @ noise.standard_normal((4, 24))
        + 0.05 * noise.standard_normal((n_captions, 24)),
        noise.standard_normal((n_captions, 6))
        + 0.4 * per_caption_latent @ noise.standard_normal((4, 6)),
    ]
    vision_store = write_store(tmp_path / "vit.zarr", vision, chunk_rows=32)
    text_store = write_store(
        tmp_path / "minilm.zarr", text, chunk_rows=40, layer_names=["emb", "l1", "l2"]
    )
    return vision_store, text_store, pairs, vision, text


def test_compute_similarity_table_matches_per_pair_metrics(planted_stores):
    vision_store, text_store, pairs, vision, text = planted_stores
    scoring = scoring_pairs(pairs, "pool", pool_size=120, seed=5)
    table = compute_similarity(
        vision_store,
        text_store,
        scoring,
        list(METRICS),
        "rice",
        "vit",
        "minilm",
        sample_seed=5,
        chunk_rows=25,
        minibatch_size=50,
        progress=False,
    )
    assert table.columns[:8] == [
        "vision_encoder",
        "text_encoder",
        "vision_layer",
        "text_layer",
        "metric",
        "value",
        "n_samples",
        "sample_seed",
    ]
    assert table.height == len(METRICS) * 4 * 3
    assert table["value"].is_finite().all()
    x = [v[scoring.image_rows].astype(np.float32).astype(np.float64) for v in vision]
    y = [t[scoring.caption_rows].astype(np.float32).astype(np.float64) for t in text]
    k = metrics.rice_k(120)
    expected = {
        "linear_cka": pairwise(bf_linear_cka, x, y),
        "unbiased_cka": pairwise(bf_unbiased_cka, x, y),
        "mutual_knn": pairwise(bf_mutual_knn, x, y, k),
    }
    for metric, values in expected.items():
        np.testing.assert_allclose(score_grid(table, metric), values, rtol=0, atol=1e-8)
    rows = table.filter(pl.col("metric") == "minibatch_cka")
    assert rows["n_samples"].unique().to_list() == [100]  # two batches of 50, 20 left over
    assert rows["metric_params"][0] == "batch_size=50,batches=2"
    assert table.filter(pl.col("metric") == "mutual_knn")["metric_params"][0] == f"k={k}"
    assert set(table.filter(pl.col("metric") == "linear_cka")["n_samples"]) == {120}
    assert table["text_layer_name"].unique().sort().to_list() == ["emb", "l1", "l2"]
    assert table["sample_seed"].unique().to_list() == [5]


def test_selection_finds_the_planted_layer_pair(planted_stores, tmp_path):
    vision_store, text_store, pairs, _, _ = planted_stores
    scoring = scoring_pairs(pairs, "run", pool_size=5000, seed=7, n_pairs=200)
    assert len(scoring) <= 200
    table = compute_similarity(
        vision_store,
        text_store,
        scoring,
        list(METRICS),
        10,
        "vit",
        "minilm",
        sample_seed=7,
        minibatch_size=40,
        progress=False,
    )
    for metric in METRICS:
        choice = select_layers(table, metric, quantile_bins=[0.0, 0.5, 1.0])
        best = choice["choices"]["best"]
        assert (best["vision_layer"], best["text_layer"]) == (2, 1), metric
        assert best["text_layer_name"] == "l1"
        assert choice["choices"]["q1"] == {**best, "quantile": 1.0}
        last = choice["choices"]["last"]
        assert (last["vision_layer"], last["text_layer"]) == (3, 2)
        assert last["score"] == score_grid(table, metric)[3, 2]
        assert choice["choices"]["q0"]["score"] == score_grid(table, metric).min()
        assert choice["n_samples"] in (len(scoring), len(scoring) // 40 * 40)
        assert (choice["sample_seed"], choice["metric"]) == (7, metric)
    write_layer_choice(tmp_path / "choice.json", choice)
    assert json.loads((tmp_path / "choice.json").read_text()) == choice

    paths = [tmp_path / "heatmaps" / f"{m}.png" for m in METRICS]
    for path in paths:
        write_heatmap(table, path.stem, path, choice)
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert imread(path).ndim == 3


def test_select_layers_breaks_ties_deterministically_and_ranks_quantiles():
    values = np.array([[0.2, 0.9, 0.1], [0.9, 0.5, 0.3]])  # tie between (0, 1) and (1, 0)
    table = similarity_table(
        {"linear_cka": values},
        vision_encoder="v",
        text_encoder="t",
        vision_layer_names=["a", "b"],
        text_layer_names=["x", "y", "z"],
        n_samples=10,
        sample_seed=0,
    )
    shuffled = table.sample(fraction=1.0, shuffle=True, seed=3)
    choice = select_layers(shuffled, "linear_cka", quantile_bins=[0.0, 0.4, 0.5])
    picks = {
        name: (c["vision_layer"], c["text_layer"], c["score"])
        for name, c in choice["choices"].items()
    }
    assert picks["best"] == (0, 1, 0.9)
    assert picks["last"] == (1, 2, 0.3)
    assert picks["q0"] == (0, 2, 0.1)
    assert picks["q0.4"] == (1, 2, 0.3)  # rank 2 of the ascending 0.1, 0.2, 0.3, 0.5, ...
    assert picks["q0.5"] == (1, 1, 0.5)  # rank round(2.5) = 3
    with pytest.raises(ValueError, match="not in the similarity table"):
        select_layers(table, "mutual_knn")
    with pytest.raises(ValueError, match="several vision_encoder"):
        other = table.with_columns(pl.lit("v2").alias("vision_encoder"))
        select_layers(pl.concat([table, other]), "linear_cka")
    with pytest.raises(ValueError, match="NaN"):
        select_layers(table.with_columns(pl.lit(float("nan")).alias("value")), "linear_cka")
    with pytest.raises(ValueError, match="outside"):
        select_layers(table, "linear_cka", quantile_bins=[1.5])


def test_stage_errors_name_the_problem(planted_stores, tmp_path):
    vision_store, text_store, pairs, _, _ = planted_stores
    args = ("rice", "vit", "minilm", 0)
    with pytest.raises(ValueError, match="unknown similarity metrics"):
        compute_similarity(vision_store, text_store, pairs, ["cosine"], *args)
    with pytest.raises(IncompleteStoreError, match=r"missing\.zarr is incomplete"):
        compute_similarity(tmp_path / "missing.zarr", text_store, pairs, ["linear_cka"], *args)
    too_far = Pairs(pairs.image_rows + 1000, pairs.caption_rows)
    with pytest.raises(ValueError, match=r"vit\.zarr: pair rows reach"):
        compute_similarity(vision_store, text_store, too_far, ["linear_cka"], *args)
    with pytest.raises(ValueError, match="shape"):
        similarity_table(
            {"linear_cka": np.zeros((2, 2))},
            vision_encoder="v",
            text_encoder="t",
            vision_layer_names=["a"],
            text_layer_names=["x", "y"],
            n_samples=3,
            sample_seed=0,
        )


def test_calibrated_pool_sizes_keep_the_raw_table_and_choice(planted_stores, tmp_path):
    vision_store, text_store, pairs, _, _ = planted_stores
    scoring = scoring_pairs(pairs, "pool", pool_size=120, seed=5)
    args = (vision_store, text_store, scoring, list(METRICS), "rice", "vit", "minilm", 5)
    plain = compute_similarity(*args, minibatch_size=50, progress=False)
    settings = CalibrationSettings(permutations=30, bootstrap=30, level=0.9, statistic="calibrated")
    table = compute_similarity(
        *args,
        minibatch_size=50,
        progress=False,
        pool_sizes=[30, 60, "full", 10_000],
        calibration=settings,
    )
    assert table.columns[: len(plain.columns)] == plain.columns
    assert table["pool_size"].unique(maintain_order=True).to_list() == [120, 60, 30]
    full = table.filter(pl.col("pool_size") == 120)
    assert full.select(plain.columns[:11]).equals(plain.select(plain.columns[:11]))
    calibrated = full.filter(pl.col("metric") != "minibatch_cka")
    for column in ("null_mean", "null_std", "calibrated", "p_value", "ci_low", "vs_last_low"):
        assert calibrated[column].is_finite().all(), column
    assert full.filter(pl.col("metric") == "minibatch_cka")["calibrated"].is_nan().all()
    assert (calibrated["ci_low"] <= calibrated["value"] + 1e-12).all()
    assert (calibrated["p_value_max"] >= calibrated["p_value"] - 1e-12).all()

    raw_choice = select_layers(plain, "mutual_knn")
    assert select_layers(table, "mutual_knn")["choices"]["best"] == {
        **raw_choice["choices"]["best"],
        **{
            key: select_layers(table, "mutual_knn")["choices"]["best"][key]
            for key in CALIBRATION_KEYS
        },
    }
    choice = select_layers(table, "mutual_knn", statistic="calibrated")
    best = choice["choices"]["best"]
    assert (best["vision_layer"], best["text_layer"]) == (2, 1)
    assert best["p_value_max"] == pytest.approx(1 / 31)
    assert choice["best_vs_last"]["distinguishable"] is True
    assert [entry["pool_size"] for entry in choice["by_pool_size"]] == [30, 60, 120]
    write_layer_choice(tmp_path / "layers.json", choice)
    assert json.loads((tmp_path / "layers.json").read_text()) == choice
    write_pool_size_plot(table, tmp_path / "by_pool_size.png", "calibrated")
    assert imread(tmp_path / "by_pool_size.png").ndim == 3
    write_heatmap(table, "mutual_knn", tmp_path / "mutual_knn.png", choice)

    repeats = compute_similarity(  # two captions per image: the null permutes image groups
        vision_store,
        text_store,
        pairs,
        ["linear_cka"],
        "rice",
        "vit",
        "minilm",
        0,
        progress=False,
        calibration=CalibrationSettings(permutations=10, bootstrap=5),
    )
    assert repeats["p_value"].is_finite().all() and repeats["ci_high"].is_finite().all()
