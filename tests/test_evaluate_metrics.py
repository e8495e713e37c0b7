"""Zero-shot classification and retrieval metrics against hand-computed and brute-force answers."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate.retrieval import (
    image_to_text_ranks,
    retrieval_metrics,
    retrieval_scores,
    target_ranks,
    text_to_image_ranks,
)
from pipeline.evaluate.zeroshot import (
    class_embeddings,
    class_ranks,
    classification_metrics,
    zero_shot_classification,
    zero_shot_logits,
)
from pipeline.linalg import l2_normalise


class LinearAligner:
    """Stand-in aligner: linear maps to a shared space, similarity weighted per coordinate."""

    def __init__(self, w_image: np.ndarray, w_text: np.ndarray, weights: np.ndarray) -> None:
        self.w_image, self.w_text, self.weights = w_image, w_text, weights

    def embed_image(self, x: np.ndarray) -> np.ndarray:
        return l2_normalise(x @ self.w_image)

    def embed_text(self, y: np.ndarray) -> np.ndarray:
        return l2_normalise(y @ self.w_text)

    def similarity(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        return (image_emb * self.weights) @ text_emb.T


def identity_aligner(dim: int, weights: np.ndarray | None = None) -> LinearAligner:
    eye = np.eye(dim)
    return LinearAligner(eye, eye, np.ones(dim) if weights is None else weights)


def stable_rank(row: np.ndarray, target: int) -> int:
    """Brute force: position of the target in a stable sort by descending score."""
    return int(np.flatnonzero(np.argsort(-row, kind="stable") == target)[0])


# ---------------------------------------------------------------- zero-shot classification


def test_class_embeddings_normalise_each_prompt_before_averaging() -> None:
    prompts = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
    emb = class_embeddings(identity_aligner(2), prompts, np.array([0, 0, 1]), n_classes=2)
    # class 0: mean of (1, 0) and (0, 1) re-normalised; averaging raw prompts would give (2, 1)/√5
    np.testing.assert_allclose(emb, [[1 / np.sqrt(2), 1 / np.sqrt(2)], [0.6, 0.8]])


def test_class_embeddings_match_manual_template_average() -> None:
    rng = np.random.default_rng(0)
    aligner = LinearAligner(rng.normal(size=(6, 4)), rng.normal(size=(5, 4)), np.ones(4))
    prompts = rng.normal(size=(7, 5))
    class_index = np.array([2, 0, 1, 0, 2, 2, 1])
    emb = class_embeddings(aligner, prompts, class_index, n_classes=3)
    for c in range(3):
        templates = [
            p @ aligner.w_text for p, k in zip(prompts, class_index, strict=True) if k == c
        ]
        mean = np.mean([t / np.linalg.norm(t) for t in templates], axis=0)
        np.testing.assert_allclose(emb[c], mean / np.linalg.norm(mean), rtol=1e-12)


def test_class_embeddings_reject_a_class_without_prompts() -> None:
    with pytest.raises(ValueError, match=r"classes \[1\] have no prompt"):
        class_embeddings(identity_aligner(2), np.eye(2), np.array([0, 2]), n_classes=3)
    with pytest.raises(ValueError, match="class_index holds values outside"):
        class_embeddings(identity_aligner(2), np.eye(2), np.array([0, 3]), n_classes=3)


def test_zero_shot_logits_use_the_aligner_similarity() -> None:
    weights = np.array([0.9, 0.1])
    aligner = identity_aligner(2, weights)
    images = np.array([[1.0, 1.0], [0.0, 2.0]])
    classes = np.array([[1.0, 0.0], [0.0, 1.0]])
    logits = zero_shot_logits(aligner, images, classes)
    s = 1 / np.sqrt(2)
    np.testing.assert_allclose(logits, 100 * np.array([[0.9 * s, 0.1 * s], [0.0, 0.1]]))


def test_zero_shot_classification_end_to_end() -> None:
    images = np.array([[1.0, 0.1], [0.2, 1.0], [0.9, -0.1]])
    prompts = np.array([[1.0, 0.0], [2.0, 0.2], [0.0, 1.0]])
    metrics = zero_shot_classification(
        identity_aligner(2), images, np.array([0, 1, 1]), prompts, np.array([0, 0, 1]), 2
    )
    assert metrics == {"top1": pytest.approx(2 / 3), "balanced_accuracy": pytest.approx(0.75)}


def test_classification_metrics_hand_computed_with_ties_and_fewer_than_five_classes() -> None:
    logits = np.array(
        [
            [1.0, 1.0, 0.0],  # label 0: tie with class 1 goes to the lower index -> hit
            [1.0, 1.0, 0.0],  # label 1: the tied class 0 ranks first -> miss
            [0.0, 0.0, 0.0],  # label 2: all tied, rank 2 -> miss
            [0.0, 0.0, 5.0],  # label 2: hit
        ]
    )
    labels = np.array([0, 1, 2, 2])
    np.testing.assert_array_equal(class_ranks(logits, labels), [0, 1, 2, 0])
    metrics = classification_metrics(logits, labels)
    assert set(metrics) == {"top1", "balanced_accuracy"}  # no top-5 with 3 classes
    assert metrics["top1"] == pytest.approx(0.5)
    assert metrics["balanced_accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)


def test_balanced_accuracy_counts_unpredicted_classes_and_skips_absent_ones() -> None:
    # 6 classes; labels use classes 0, 1, 3 only; class 3 is never predicted.
    predicted = np.array([0, 0, 0, 1, 0, 1])
    labels = np.array([0, 0, 1, 1, 3, 3])
    logits = np.eye(6)[predicted]
    metrics = classification_metrics(logits, labels)
    assert metrics["top1"] == pytest.approx(3 / 6)
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 2 + 1 / 2 + 0 / 2) / 3)
    # a missed row ranks behind the predicted class and the zero-scored classes of lower index
    ranks = class_ranks(logits, labels)
    np.testing.assert_array_equal(ranks, [0, 0, 1, 0, 3, 3])
    assert metrics["top5"] == 1.0


def test_top5_hand_computed() -> None:
    logits = np.array([[6.0, 5, 4, 3, 2, 1], [1.0, 2, 3, 4, 5, 6]])
    metrics = classification_metrics(logits, np.array([4, 0]))
    assert metrics["top5"] == 0.5  # rank 4 is in the top 5, rank 5 is not
    assert metrics["top1"] == 0.0


def test_class_ranks_match_a_stable_sort_on_tied_scores() -> None:
    rng = np.random.default_rng(1)
    logits = rng.integers(0, 4, size=(200, 7)).astype(np.float64)
    labels = rng.integers(0, 7, size=200)
    expected = [stable_rank(row, t) for row, t in zip(logits, labels, strict=True)]
    np.testing.assert_array_equal(class_ranks(logits, labels), expected)
    metrics = classification_metrics(logits, labels)
    assert metrics["top5"] == pytest.approx(np.mean(np.array(expected) < 5))


def test_classification_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="NaN"):
        classification_metrics(np.array([[np.nan, 1.0]]), np.array([0]))
    with pytest.raises(ValueError, match=r"labels holds values outside 0\.\.1"):
        classification_metrics(np.zeros((1, 2)), np.array([2]))
    with pytest.raises(ValueError, match="2 labels for 1 rows"):
        classification_metrics(np.zeros((1, 2)), np.array([0, 1]))
    with pytest.raises(ValueError, match="zero rows"):
        l2_normalise(np.array([[1.0, 0.0], [0.0, 0.0]]), "error")


# ---------------------------------------------------------------- retrieval


def test_retrieval_hand_computed_with_several_captions_per_image() -> None:
    caption_image = np.array([0, 0, 1, 1, 2])
    scores = np.array(
        [
            [0.1, 0.9, 0.8, 0.2, 0.0],  # image 0: its 2nd caption is first -> rank 0
            [0.1, 0.2, 0.3, 0.9, 0.5],  # image 1: its 2nd caption is first -> rank 0
            [0.9, 0.8, 0.7, 0.6, 0.5],  # image 2: its only caption is last -> rank 4
        ]
    )
    np.testing.assert_array_equal(image_to_text_ranks(scores, caption_image), [0, 0, 4])
    # caption 0: image 2 scores higher, image 1 ties and loses on index -> rank 1;
    # caption 4: image 1 ties image 2 (0.5) and wins on index -> rank 1
    np.testing.assert_array_equal(text_to_image_ranks(scores, caption_image), [1, 0, 2, 0, 1])
    metrics = retrieval_metrics(scores, caption_image, ks=(1, 5))
    assert metrics == {
        "i2t_recall@1": pytest.approx(2 / 3),
        "i2t_recall@5": 1.0,
        "t2i_recall@1": pytest.approx(2 / 5),
        "t2i_recall@5": 1.0,
    }


def test_retrieval_constant_scores_rank_by_index() -> None:
    caption_image = np.array([0, 0, 1, 1, 2, 2])
    metrics = retrieval_metrics(np.zeros((3, 6)), caption_image, ks=(1, 2, 3))
    # i2t ranks are each image's first caption index (0, 2, 4); t2i ranks are the image rows
    assert metrics["i2t_recall@1"] == pytest.approx(1 / 3)
    assert metrics["i2t_recall@3"] == pytest.approx(2 / 3)
    assert metrics["t2i_recall@1"] == pytest.approx(1 / 3)
    assert metrics["t2i_recall@2"] == pytest.approx(2 / 3)
    assert metrics["t2i_recall@3"] == 1.0


@pytest.mark.parametrize("block_size", [1, 3, None])
def test_retrieval_ranks_match_brute_force(block_size: int | None) -> None:
    rng = np.random.default_rng(2)
    n_images, per_image = 23, rng.integers(1, 6, size=23)
    caption_image = rng.permutation(np.repeat(np.arange(n_images), per_image))
    scores = rng.integers(0, 5, size=(n_images, len(caption_image))).astype(np.float32)
    i2t = [
        min(stable_rank(scores[i], j) for j in np.flatnonzero(caption_image == i))
        for i in range(n_images)
    ]
    t2i = [stable_rank(scores[:, j], caption_image[j]) for j in range(len(caption_image))]
    np.testing.assert_array_equal(image_to_text_ranks(scores, caption_image, block_size), i2t)
    np.testing.assert_array_equal(text_to_image_ranks(scores, caption_image, block_size), t2i)
    metrics = retrieval_metrics(scores, caption_image, block_size=block_size)
    for k in (1, 5, 10):
        assert metrics[f"i2t_recall@{k}"] == pytest.approx(np.mean(np.array(i2t) < k))
        assert metrics[f"t2i_recall@{k}"] == pytest.approx(np.mean(np.array(t2i) < k))


def test_target_ranks_hand_computed() -> None:
    scores = np.array([[3.0, 1.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(target_ranks(scores, np.array([2, 3])), [1, 3])


def test_retrieval_scores_use_the_aligner_similarity() -> None:
    aligner = identity_aligner(2, np.array([1.0, 0.0]))
    scores = retrieval_scores(aligner, np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[0.0, 3.0]]))
    np.testing.assert_allclose(scores, [[0.0], [0.0]])


def test_retrieval_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"image rows have no caption \(first: \[1\]\)"):
        retrieval_metrics(np.zeros((2, 2)), np.array([0, 0]))
    with pytest.raises(ValueError, match=r"caption_image has shape \(3,\), expected \(2,\)"):
        retrieval_metrics(np.zeros((2, 2)), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match=r"outside 0\.\.1"):
        retrieval_metrics(np.zeros((2, 2)), np.array([0, 2]))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[0.0, np.nan], [0.0, 0.0]]), np.array([0, 1]))
