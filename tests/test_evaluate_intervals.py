"""Intervals: the seed t-interval, the image bootstrap (fast path against a brute-force loop,
coverage), the outcomes table, summary intervals, paired comparisons and their plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline.evaluate.intervals import (
    Hits,
    Statistics,
    excludes_zero,
    percentile_interval,
    replicates,
    resample_counts,
    resample_draws,
    seed_interval,
)
from pipeline.evaluate.plots import plot_all, plot_metric_vs_pairs, plot_relative_improvement
from pipeline.evaluate.retrieval import retrieval_metrics, retrieval_outcomes
from pipeline.evaluate.tables import (
    COMPARISONS_SCHEMA,
    OUTCOMES_SCHEMA,
    SUMMARY_SCHEMA,
    RunKey,
    bootstrap_replicates,
    compare,
    comparison_pairs,
    concat_metrics,
    concat_outcomes,
    metric_rows,
    outcome_rows,
    read_comparisons,
    read_outcomes,
    summarise,
    write_comparisons,
    write_outcomes,
)
from pipeline.evaluate.zeroshot import classification_metrics, classification_outcomes

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
T_975 = {2: 4.302652729911275, 4: 2.7764451051977987}  # Student's t 0.975 quantiles by df


def resample(hits: Hits, units: np.ndarray, drawn: np.ndarray) -> Hits:
    """Brute force: the items of the drawn images, with repetition, in draw order."""
    rows = np.concatenate([np.flatnonzero(hits.unit == units[i]) for i in drawn])
    stratum = None if hits.stratum is None else hits.stratum[rows]
    return Hits(hits.hit[rows], hits.unit[rows], stratum)


# ---------------------------------------------------------------- interval math


def test_seed_interval_of_known_numbers() -> None:
    low, high = seed_interval(np.array([1.0, 2.0, 3.0]), 0.95)  # mean 2, s 1, n 3
    half = T_975[2] / np.sqrt(3)
    assert low == pytest.approx(2 - half) and high == pytest.approx(2 + half)
    low, high = seed_interval(np.array([0.5, 0.5, 0.7, 0.3, 0.5]), 0.95)  # s = sqrt(0.02)
    assert high - low == pytest.approx(2 * T_975[4] * np.sqrt(0.02) / np.sqrt(5))
    assert seed_interval(np.array([0.4]), 0.95) is None
    assert seed_interval(np.array([0.4, 0.4]), 0.95) == (0.4, 0.4)


def test_percentile_interval_and_excludes_zero() -> None:
    assert percentile_interval(np.arange(101.0), 0.9) == pytest.approx((5.0, 95.0))
    assert excludes_zero((0.1, 0.3)) and excludes_zero((-0.3, -0.1))
    assert not excludes_zero((-0.1, 0.2)) and not excludes_zero((0.0, 0.0))
    assert excludes_zero(None) is None


def test_statistics_reject_bad_settings() -> None:
    with pytest.raises(ValueError, match=r"statistics\.level"):
        Statistics(level=1.0)
    with pytest.raises(ValueError, match=r"statistics\.bootstrap"):
        Statistics(bootstrap=-1)


def test_resample_counts_count_the_draws() -> None:
    draws = resample_draws(7, 50, seed=3)
    counts = resample_counts(draws)
    assert counts.shape == (50, 7) and (counts.sum(axis=1) == 7).all()
    assert all((np.bincount(d, minlength=7) == c).all() for d, c in zip(draws, counts, strict=True))
    assert (resample_draws(7, 50, seed=3) == draws).all()
    assert not (resample_draws(7, 50, seed=4) == draws).all()


@pytest.mark.parametrize("stratified", [False, True])
def test_bootstrap_fast_path_equals_brute_force(stratified: bool) -> None:
    """Captions clustered by image (1-4 per image), classes for the balanced mean, units not
    0..n-1: each replicate is the metric recomputed on the resampled images' items."""
    rng = np.random.default_rng(0)
    images = np.sort(rng.choice(1000, size=60, replace=False))
    unit = np.repeat(images, rng.integers(1, 5, size=len(images)))
    rng.shuffle(unit)
    stratum = rng.integers(0, 6, size=len(unit)) if stratified else None
    hits = Hits(rng.random(len(unit)) < 0.4, unit, stratum)
    units = np.unique(unit)
    draws = resample_draws(len(units), 300, seed=1)
    fast = replicates(hits, units, resample_counts(draws))
    brute = np.array([resample(hits, units, drawn).value() for drawn in draws])
    np.testing.assert_allclose(fast, brute, rtol=0, atol=1e-12)
    assert fast.std() > 0


def test_replicates_reject_an_item_outside_the_units() -> None:
    hits = Hits(np.array([True, False]), np.array([0, 5]))
    with pytest.raises(ValueError, match="not among the bootstrap's units"):
        replicates(hits, np.array([0, 1]), np.ones((2, 2)))


def test_bootstrap_interval_covers_the_true_rate_at_about_its_level() -> None:
    """Clustered Bernoulli items (three captions per image sharing a latent): the interval
    over images covers the true rate in about 95% of 300 simulated test sets."""
    rng = np.random.default_rng(7)
    n_images, true_rate, covered = 150, 0.3, 0
    unit = np.repeat(np.arange(n_images), 3)
    counts = resample_counts(resample_draws(n_images, 400, seed=0))
    for _ in range(300):
        easy = rng.random(n_images) < true_rate  # the image decides its captions' hits
        hit = np.where(rng.random(len(unit)) < 0.8, easy[unit], rng.random(len(unit)) < 0.3)
        low, high = percentile_interval(
            replicates(Hits(hit, unit), np.arange(n_images), counts), 0.95
        )
        covered += low <= true_rate <= high
    assert 0.88 <= covered / 300 <= 0.99


def test_seed_interval_covers_the_true_mean_at_about_its_level() -> None:
    rng = np.random.default_rng(11)
    samples = rng.normal(0.6, 0.05, size=(2000, 3))
    covered = sum(low <= 0.6 <= high for low, high in (seed_interval(s, 0.9) for s in samples))
    assert 0.87 <= covered / 2000 <= 0.93


# ---------------------------------------------------------------- per-item outcomes


def test_classification_outcomes_give_the_metrics_and_keep_image_rows() -> None:
    rng = np.random.default_rng(2)
    logits, labels = rng.normal(size=(40, 6)), rng.integers(0, 6, size=40)
    rows = np.arange(40) * 2 + 1  # the members' image rows in the split
    outcomes = classification_outcomes(logits, labels, rows)
    assert set(outcomes) == {"top1", "top5", "balanced_accuracy"}
    metrics = classification_metrics(logits, labels)
    assert {name: hits.value() for name, hits in outcomes.items()} == metrics
    assert (outcomes["top1"].unit == rows).all() and outcomes["top1"].stratum is None
    assert (outcomes["balanced_accuracy"].stratum == labels).all()


def test_retrieval_outcomes_resample_captions_with_their_image() -> None:
    rng = np.random.default_rng(3)
    caption_image = np.repeat(np.arange(10), 3)
    scores = rng.normal(size=(10, 30))
    outcomes = retrieval_outcomes(scores, caption_image)
    metrics = retrieval_metrics(scores, caption_image)
    assert {name: hits.value() for name, hits in outcomes.items()} == metrics
    assert (outcomes["t2i_recall@5"].unit == caption_image).all()
    assert (outcomes["i2t_recall@5"].unit == np.arange(10)).all()


# ---------------------------------------------------------------- tables


def key(method: str = "linear", choice: str = "last", seed: int = 1, n_pairs: int = 100):
    return RunKey("vit", "minilm", method, choice, 3, 5, n_pairs, seed)


def planted(rates: dict[tuple[str, str], float], seeds=(1, 2, 3), n_images: int = 300, seed=0):
    """Metrics and outcomes of a classification task: each series hits every image with its
    rate, a shared per-image difficulty making the series' hits correlated (as on one test
    set). The same rates give the very same hits (identical methods)."""
    rng = np.random.default_rng(seed)
    metrics, outcomes = [], []
    for s in seeds:
        difficulty = rng.random(n_images)
        for (method, choice), rate in rates.items():
            hit = difficulty < rate
            labels = np.arange(n_images) % 3
            hits = {
                "top1": Hits(hit, np.arange(n_images)),
                "balanced_accuracy": Hits(hit, np.arange(n_images), labels),
            }
            run = key(method, choice, s)
            metrics.append(
                metric_rows(run, "w.cls", "classification", {m: h.value() for m, h in hits.items()})
            )
            metrics.append(metric_rows(run, "w.seg", "segmentation", {"miou": rate / 2}))
            outcomes.append(outcome_rows(run, "w.cls", "classification", hits))
    return concat_metrics(metrics), concat_outcomes(outcomes)


def test_outcomes_table_round_trips_and_checks_its_key(tmp_path: Path) -> None:
    _, outcomes = planted({("linear", "last"): 0.5}, seeds=(1,))
    assert outcomes.columns == OUTCOMES_SCHEMA.names
    write_outcomes(outcomes, tmp_path / "o.parquet")
    back = read_outcomes(tmp_path / "o.parquet")
    assert back.equals(outcomes)
    assert back["stratum"].to_list()[0] is not None and back["stratum"].to_list()[1] is None
    with pytest.raises(ValueError, match="two rows for one key"):
        concat_outcomes([outcomes, outcomes])
    assert concat_outcomes([]).is_empty()


def test_bootstrap_replicates_check_the_outcomes_against_the_metrics() -> None:
    metrics, outcomes = planted({("linear", "last"): 0.5}, seeds=(1,))
    statistics = Statistics(bootstrap=50)
    reps = bootstrap_replicates(outcomes, metrics, statistics)
    assert len(reps) == 2 and all(r.shape == (50,) for r in reps.values())
    assert bootstrap_replicates(outcomes, metrics, Statistics(bootstrap=0)) == {}
    wrong = metrics.with_columns(value=pl.col("value") + 0.01 * (pl.col("metric") == "top1"))
    with pytest.raises(ValueError, match="the metrics table"):
        bootstrap_replicates(outcomes, wrong, statistics)
    extra = outcome_rows(
        key(seed=9),
        "w.cls",
        "classification",
        {"top1": Hits(np.ones(300, bool), np.arange(300) + 1)},
    )
    more = concat_metrics(
        [metrics, metric_rows(key(seed=9), "w.cls", "classification", {"top1": 1.0})]
    )
    with pytest.raises(ValueError, match="other test images"):
        bootstrap_replicates(concat_outcomes([outcomes, extra]), more, statistics)


def test_summary_keeps_its_columns_and_adds_intervals() -> None:
    metrics, outcomes = planted({("linear", "last"): 0.5, ("mlp", "last"): 0.6})
    statistics = Statistics(bootstrap=200, level=0.9, seed=5)
    reps = bootstrap_replicates(outcomes, metrics, statistics)
    summary = summarise(metrics, reps, statistics)
    assert summary.columns == SUMMARY_SCHEMA.names
    plain = summarise(metrics)
    original = ["mean", "std", "count", "relative_improvement"]
    assert summary.select(original).equals(plain.select(original))
    row = summary.filter((pl.col("method") == "mlp") & (pl.col("metric") == "top1")).row(
        0, named=True
    )
    values = metrics.filter((pl.col("method") == "mlp") & (pl.col("metric") == "top1"))["value"]
    assert (row["seed_ci_low"], row["seed_ci_high"]) == pytest.approx(
        seed_interval(values.to_numpy(), 0.9)
    )
    assert row["item_ci_low"] < row["mean"] < row["item_ci_high"]
    assert (row["level"], row["bootstrap"], row["bootstrap_seed"]) == (0.9, 200, 5)
    segmentation = summary.filter(pl.col("task") == "w.seg")
    assert segmentation["item_ci_low"].is_null().all()  # no per-item outcomes
    assert segmentation["seed_ci_low"].is_not_null().all()
    assert plain["item_ci_low"].is_null().all()


def test_comparison_pairs_every_baseline_once() -> None:
    series = [
        ("linear", "last"),
        ("linear", "best"),
        ("linear_structure", "last"),
        ("linear_structure", "best"),
        ("csa", "best"),
    ]
    pairs = comparison_pairs(series, {"linear_structure": "linear"})
    assert pairs == sorted(
        [
            (("csa", "best"), ("linear", "last")),
            (("linear", "best"), ("linear", "last")),
            (("linear_structure", "best"), ("linear", "best")),
            (("linear_structure", "best"), ("linear", "last")),
            (("linear_structure", "best"), ("linear_structure", "last")),
            (("linear_structure", "last"), ("linear", "last")),
        ]
    )


def test_paired_difference_excludes_zero_for_a_planted_gain_and_not_for_identical_methods(
    tmp_path: Path,
) -> None:
    rates = {("linear", "last"): 0.5, ("linear", "best"): 0.5, ("mlp", "last"): 0.62}
    metrics, outcomes = planted(rates)
    statistics = Statistics(bootstrap=500)
    reps = bootstrap_replicates(outcomes, metrics, statistics)
    comparisons = compare(metrics, {}, reps, statistics)
    assert comparisons.columns == COMPARISONS_SCHEMA.names
    write_comparisons(comparisons, tmp_path / "c.parquet")
    assert read_comparisons(tmp_path / "c.parquet").equals(comparisons)

    def row(method: str, choice: str, metric: str) -> dict:
        return comparisons.filter(
            (pl.col("method") == method)
            & (pl.col("layer_choice") == choice)
            & (pl.col("metric") == metric)
        ).row(0, named=True)

    gain = row("mlp", "last", "top1")
    assert gain["seeds"] == 3 and gain["difference"] == pytest.approx(0.12, abs=0.03)
    assert gain["difference"] == pytest.approx(gain["mean"] - gain["baseline_mean"])
    assert gain["relative"] == pytest.approx(gain["difference"] / gain["baseline_mean"])
    assert 0 < gain["item_ci_low"] < gain["difference"] < gain["item_ci_high"]
    assert gain["item_excludes_zero"] and gain["seed_excludes_zero"]
    same = row("linear", "best", "top1")  # best picked the same layers: identical runs
    assert same["difference"] == 0 and same["item_ci_low"] <= 0 <= same["item_ci_high"]
    assert not same["item_excludes_zero"] and not same["seed_excludes_zero"]
    segmentation = row("mlp", "last", "miou")
    assert segmentation["item_ci_low"] is None and segmentation["item_excludes_zero"] is None
    assert not comparisons.filter(
        pl.col("method") == "linear", pl.col("layer_choice") == "last"
    ).height


def test_paired_difference_of_equal_methods_excludes_zero_at_about_the_nominal_rate() -> None:
    """Two methods of one rate whose hits differ by per-image noise: the paired interval over
    images excludes zero in about 5% of 300 simulated test sets (false positives)."""
    rng = np.random.default_rng(4)
    n_images, false_positives = 200, 0
    units = np.arange(n_images)
    counts = resample_counts(resample_draws(n_images, 400, seed=0))
    for _ in range(300):
        easy = rng.random(n_images) < 0.5  # shared difficulty: the methods' hits correlate
        a, b = (
            np.where(rng.random(n_images) < 0.7, easy, rng.random(n_images) < 0.5) for _ in "ab"
        )
        difference = replicates(Hits(a, units), units, counts) - replicates(
            Hits(b, units), units, counts
        )
        false_positives += excludes_zero(percentile_interval(difference, 0.95))
    assert 0.01 <= false_positives / 300 <= 0.10


def test_comparisons_pair_only_shared_seeds_and_need_two_for_a_seed_interval() -> None:
    frames = [
        metric_rows(key("linear", "last", 1), "w.cls", "classification", {"top1": 0.5}),
        metric_rows(key("linear", "last", 2), "w.cls", "classification", {"top1": 0.7}),
        metric_rows(key("mlp", "last", 2), "w.cls", "classification", {"top1": 0.8}),
        metric_rows(key("mlp", "last", 3), "w.cls", "classification", {"top1": 0.1}),
    ]
    [row] = compare(concat_metrics(frames), {}).rows(named=True)
    assert row["seeds"] == 1 and row["difference"] == pytest.approx(0.1)
    assert row["mean"] == pytest.approx(0.8) and row["baseline_mean"] == pytest.approx(0.7)
    assert row["seed_ci_low"] is None and row["seed_excludes_zero"] is None


# ---------------------------------------------------------------- plots


def test_plots_draw_the_intervals(tmp_path: Path) -> None:
    rates = {("linear", "last"): 0.5, ("mlp", "last"): 0.62, ("mlp", "best"): 0.58}
    metrics, outcomes = planted(rates)
    metrics = pl.concat(
        [metrics, planted(rates, seed=1)[0].with_columns(n_pairs=pl.lit(1000, pl.Int64))]
    )
    statistics = Statistics(bootstrap=200)
    reps = bootstrap_replicates(outcomes, metrics, statistics)
    summary = summarise(metrics, reps, statistics)
    comparisons = compare(metrics, {}, reps, statistics)
    bare = plot_relative_improvement(summary, "w.cls", "top1", tmp_path / "bare.png")
    bars = plot_relative_improvement(
        summary, "w.cls", "top1", tmp_path / "bars.png", comparisons=comparisons
    )
    curve = plot_metric_vs_pairs(summary, "w.cls", "top1", tmp_path / "curve.png")
    no_intervals = plot_metric_vs_pairs(
        summarise(metrics.filter(pl.col("seed") == 1)), "w.cls", "top1", tmp_path / "plain.png"
    )
    for path in (bare, bars, curve, no_intervals):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000
    assert bars.read_bytes() != bare.read_bytes()
    paths = plot_all(summary, tmp_path / "plots", comparisons)
    assert sorted(p.name for p in paths) == sorted(
        f"w.{task}__{metric}__{kind}.png"
        for task, metric in (("cls", "top1"), ("cls", "balanced_accuracy"), ("seg", "miou"))
        for kind in ("improvement", "vs_n_pairs")
    )
