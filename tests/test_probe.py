"""Linear probes of a frozen encoder (pipeline.probe): pooled attribute probes, the patch
probe scored as segmentation, its ceiling, and the pixel-to-patch map they share."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluate.segmentation import pixel_patches
from pipeline.probe import patch_ceiling, patch_probe, patch_targets, probe_layers

CROP = {"resize": 71, "crop": [64, 64]}  # the default ViT's view of a 64 px image


def test_probes_score_a_linearly_coded_layer_high_and_a_noise_layer_at_chance() -> None:
    rng = np.random.default_rng(0)
    labels = {"shape": rng.integers(0, 4, size=600)}
    coded = np.eye(4)[labels["shape"]] * 3.0 + rng.normal(size=(600, 4)) * 0.3
    noise = rng.normal(size=(600, 4))
    train = ([coded[:400], noise[:400]], {"shape": labels["shape"][:400]})
    test = ([coded[400:], noise[400:]], {"shape": labels["shape"][400:]})
    table = probe_layers(train, test, ("shape",))
    assert table["layer"].to_list() == [0, 1] and table["attribute"].to_list() == ["shape"] * 2
    coded_accuracy, noise_accuracy = table["score"].to_list()
    assert coded_accuracy > 0.95 and noise_accuracy < 0.45  # chance is 0.25


def test_pixel_patches_follow_the_view() -> None:
    whole = pixel_patches(None, (64, 64), (8, 8))
    ys, xs = np.mgrid[:64, :64]
    assert np.array_equal(whole, (ys // 8) * 8 + xs // 8)
    cropped = pixel_patches(CROP, (64, 64), (8, 8))
    # 64 -> 71 px, centre crop 64 (offset 4): 4 pixels unseen before, 3 after, on each axis
    assert (cropped[:4] == -1).all() and (cropped[:, -3:] == -1).all()
    assert (cropped[4:-3, 4:-3] >= 0).all() and (cropped[4:-3, 4:-3] < 64).all()
    assert cropped[4, 4] == 0 and cropped[-4, -4] == 63
    assert set(np.bincount(cropped[cropped >= 0]).tolist()) <= {49, 56, 64}  # 7-8 px a side


def test_patch_targets_take_each_patchs_majority_class() -> None:
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[0:8, 0:5] = 2  # 40 of 64 pixels: class 2
    mask[8:16, 8:11] = 1  # 24 of 64: background wins
    mask[0, 15] = 255  # ignored pixels count nowhere
    assert patch_targets(mask, (2, 2), None, 3).tolist() == [2, 0, 0, 0]


def masks_and_tokens(n: int, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """n 32 x 32 masks of one patch-aligned 8 x 8 block of class 1 or 2 (a 4 x 4 grid), and
    tokens that code each patch's class with noise."""
    masks, tokens = [], []
    for _ in range(n):
        mask = np.zeros((32, 32), dtype=np.uint8)
        r, c, k = rng.integers(4), rng.integers(4), rng.integers(1, 3)
        mask[8 * r : 8 * r + 8, 8 * c : 8 * c + 8] = k
        masks.append(mask)
        classes = patch_targets(mask, (4, 4), None, 3)
        tokens.append(np.eye(3)[classes] * 2.0 + rng.normal(size=(16, 3)) * 0.2)
    return masks, np.stack(tokens)


def test_the_patch_probe_reaches_the_ceiling_on_coded_tokens_and_not_on_noise() -> None:
    rng = np.random.default_rng(0)
    train_masks, train_tokens = masks_and_tokens(60, rng)
    test_masks, test_tokens = masks_and_tokens(40, rng)
    targets = np.stack([patch_targets(m, (4, 4), None, 3) for m in train_masks])
    ceiling, floor = patch_ceiling(test_masks, (4, 4), None, 3)
    assert 0.5 < ceiling < 1.0  # bilinear decoding blurs a block's border
    coded = patch_probe(train_tokens, targets, test_tokens, test_masks, (4, 4), None, 3)
    assert coded == pytest.approx(ceiling, abs=0.02)
    noise = rng.normal(size=test_tokens.shape)
    assert patch_probe(train_tokens, targets, noise, test_masks, (4, 4), None, 3) < 0.5 * ceiling
    # background everywhere: IoU 15/16 for the background, 0 for the one object class
    # each mask holds (both classes occur in the set, so both count)
    assert floor == pytest.approx(15 / 16 / 3)
