"""Zero-shot segmentation: confusion matrix and mIoU by hand, bilinear upsampling, decoding,
and a split through a pooled aligner (the patch baseline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.evaluate.segmentation import (
    _decode_batch,
    class_iou,
    confusion_matrix,
    decode,
    patch_class_scores,
    segment,
    segmentation_metrics,
    upsample_scores,
)

# 4 classes (0 = background); class 3 is neither in the target nor predicted; 255 = ignore
TARGET = np.array([[0, 0, 1, 1], [0, 2, 2, 255], [1, 1, 255, 255]])
PRED = np.array([[0, 1, 1, 1], [0, 2, 0, 0], [1, 2, 2, 2]])


def test_confusion_matrix_by_hand() -> None:
    # counted pixels (target -> predicted): class 0: 0, 1, 0; class 1: 1, 1, 1, 2;
    # class 2: 2, 0; the three 255 pixels are ignored whatever was predicted there
    expected = np.array(
        [
            [2, 1, 0, 0],
            [0, 3, 1, 0],
            [1, 0, 1, 0],
            [0, 0, 0, 0],
        ]
    )
    confusion = confusion_matrix(PRED, TARGET, 4)
    assert confusion.dtype == np.int64
    assert np.array_equal(confusion, expected)
    # accumulating over images: the matrix of a stack is the sum of the per-image matrices
    per_image = sum(confusion_matrix(p, t, 4) for p, t in zip(PRED, TARGET, strict=True))
    assert np.array_equal(per_image, expected)


def test_miou_leaves_out_absent_classes_and_background_for_fg() -> None:
    metrics = segmentation_metrics(confusion_matrix(PRED, TARGET, 4), background=0)
    iou = [2 / (3 + 3 - 2), 3 / (4 + 4 - 3), 1 / (2 + 2 - 1)]  # tp / (row + column - tp)
    np.testing.assert_allclose(class_iou(confusion_matrix(PRED, TARGET, 4))[:3], iou)
    assert np.isnan(class_iou(confusion_matrix(PRED, TARGET, 4))[3])
    assert metrics["miou"] == pytest.approx(np.mean(iou))
    assert metrics["miou_fg"] == pytest.approx(np.mean(iou[1:]))
    assert metrics["pixel_accuracy"] == pytest.approx(6 / 9)  # 9 counted pixels, 6 on the diagonal
    no_background = segmentation_metrics(confusion_matrix(PRED, TARGET, 4), background=None)
    assert no_background["miou_fg"] == pytest.approx(no_background["miou"])
    assert "miou_all_background" not in no_background  # no background class: no such floor


def test_the_floor_is_the_miou_of_background_everywhere() -> None:
    """``miou_all_background`` is what a label map of class 0 at every counted pixel scores:
    here 3 of the 9 counted pixels are background and 3 classes are in the targets."""
    metrics = segmentation_metrics(confusion_matrix(PRED, TARGET, 4), background=0)
    assert metrics["miou_all_background"] == pytest.approx((3 / 9) / 3)
    everywhere = np.where(TARGET == 255, 255, 0)  # class 0 wherever a pixel counts
    brute = segmentation_metrics(confusion_matrix(everywhere, TARGET, 4), background=0)
    assert metrics["miou_all_background"] == pytest.approx(brute["miou"])
    assert brute["miou_all_background"] == pytest.approx(brute["miou"])  # the targets decide
    # another background index: its share of the pixels over the classes present
    assert segmentation_metrics(confusion_matrix(PRED, TARGET, 4), background=1)[
        "miou_all_background"
    ] == pytest.approx((4 / 9) / 3)


def test_a_class_predicted_but_absent_counts_zero() -> None:
    target = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])
    iou = class_iou(confusion_matrix(pred, target, 3))
    np.testing.assert_allclose(iou, [0.5, 1.0, 0.0])
    assert segmentation_metrics(confusion_matrix(pred, target, 3))["miou"] == pytest.approx(0.5)


def test_bad_labels_are_rejected() -> None:
    with pytest.raises(ValueError, match="target holds labels outside"):
        confusion_matrix(np.array([0, 1]), np.array([0, 7]), 3)
    with pytest.raises(ValueError, match="pred holds labels outside"):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="3 predicted pixels but 2"):
        confusion_matrix(np.array([0, 1, 1]), np.array([0, 1]), 3)


def test_upsampling_shapes_for_non_square_grids_and_masks() -> None:
    rng = np.random.default_rng(0)
    flat = rng.normal(size=(15, 4))  # a 3 x 5 grid, row-major
    up = upsample_scores(flat, (3, 5), (30, 50))
    assert up.shape == (30, 50, 4) and up.dtype == np.float64
    assert np.array_equal(up, upsample_scores(flat.reshape(3, 5, 4), (3, 5), (30, 50)))
    assert upsample_scores(torch.from_numpy(flat).float(), (3, 5), (17, 41)).shape == (17, 41, 4)
    assert decode(flat, (3, 5), (31, 47)).shape == (31, 47)
    with pytest.raises(ValueError, match="do not fit a 4 x 4 patch grid"):
        upsample_scores(flat, (4, 4), (8, 8))


def test_bilinear_values_match_half_pixel_centres() -> None:
    # align_corners=False: output pixel x samples input (x + 0.5) * 2 / 4 - 0.5, clamped
    up = upsample_scores(np.array([[0.0], [1.0]]), (1, 2), (1, 4))
    np.testing.assert_allclose(up[0, :, 0], [0.0, 0.25, 0.75, 1.0], rtol=0, atol=1e-12)


def test_decode_recovers_the_patch_of_each_block() -> None:
    """One-hot scores of 15 classes, one per patch of a 3 x 5 grid: at every 10 x 10 block's
    central pixels the patch under it has weight >= 0.9, so the label is its class."""
    labels = decode(np.eye(15), (3, 5), (30, 50))
    centres = labels[5::10, 5::10], labels[4::10, 4::10]
    for centre in centres:
        assert np.array_equal(centre, np.arange(15).reshape(3, 5))
    stripes = np.zeros((2, 3, 2))  # class 1 in the middle column: a sharp boundary at 10, 20
    stripes[:, 1, 1] = 1.0
    stripes[:, [0, 2], 0] = 1.0
    expected = np.zeros((20, 30), dtype=np.int64)
    expected[:, 10:20] = 1
    assert np.array_equal(decode(stripes, (2, 3), (20, 30)), expected)


# ---- a split through an aligner: the patch baseline of a pooled method ----


class PooledIdentity:
    """A pooled aligner whose image map is the identity (rows normalised), scored by cosine."""

    scores_patches = False

    def embed_image(self, x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    def similarity(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        return image_emb @ text_emb.T


class VisionTokens:
    """The reading side of a vision token store: CLS then a row-major 2 x 3 patch grid."""

    where = "test tokens"

    def __init__(self, tokens: np.ndarray) -> None:
        self.tokens = tokens
        self.attrs = {"layout": {"prefix_tokens": 1, "grid": [2, 3]}}

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.tokens[rows], np.ones(self.tokens[rows].shape[:2], dtype=bool)


def test_segment_maps_every_patch_through_the_image_map_and_pools_one_matrix() -> None:
    rng = np.random.default_rng(0)
    layouts = [np.array([[1, 0, 2], [1, 0, 2]]), np.array([[2, 1, 0], [2, 1, 0]])]  # stripes
    tokens = np.zeros((2, 7, 3))
    for i, layout in enumerate(layouts):
        tokens[i, 0] = rng.normal(size=3)  # the CLS token plays no part
        tokens[i, 1:] = np.eye(3)[layout.ravel()] + 0.01 * rng.normal(size=(6, 3))
    masks = [np.kron(layout, np.ones((5, 5), dtype=np.uint8)) for layout in layouts]
    masks[1][0, :4] = 255  # ignored pixels count nowhere
    confusion, kept = segment(
        PooledIdentity(), VisionTokens(tokens), np.eye(3), np.arange(2), masks, keep=1
    )
    assert confusion.sum() == 2 * 10 * 15 - 4 and np.trace(confusion) == confusion.sum()
    metrics = segmentation_metrics(confusion)
    assert metrics.pop("miou_all_background") < 1.0  # background is not everywhere
    assert metrics == {"miou": 1.0, "miou_fg": 1.0, "pixel_accuracy": 1.0}
    assert len(kept) == 1 and np.array_equal(kept[0], np.kron(layouts[0], np.ones((5, 5))))
    scores = patch_class_scores(PooledIdentity(), tokens[0, 1:], np.eye(3))
    assert scores.shape == (6, 3) and np.array_equal(scores.argmax(1), layouts[0].ravel())


def test_batched_decoding_equals_decoding_each_image() -> None:
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(5, 6, 4))
    same = [np.zeros((7, 11), np.uint8)] * 5
    mixed = [np.zeros((7, 11), np.uint8), np.zeros((4, 9), np.uint8)] * 2 + [same[0]]
    for masks in (same, mixed):
        batched = _decode_batch(scores, (2, 3), masks)
        for image, mask, labels in zip(scores, masks, batched, strict=True):
            assert np.array_equal(labels, decode(image, (2, 3), mask.shape))
