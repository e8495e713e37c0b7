"""Segmentation scores what the encoder saw: a label map goes back onto the mask through the
exact geometry of the vision preprocessing (docs/pal.md, "Segmentation geometry").

The oracle: each patch's class scores are read from the very pixels the encoder's transform
produced (the distance of the patch's mean colour to each class colour), so a decode that
puts a patch anywhere but where it came from shows up as wrong pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.encoders import build_encoder
from pipeline.evaluate.segmentation import (
    IGNORE_INDEX,
    _decode_batch,
    class_iou,
    decode,
    segment,
    segmentation_metrics,
    upsample_scores,
    view_positions,
)

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent

PATCH = 8
TINY_VIT = dict(img_size=64, patch_size=PATCH, depth=1, embed_dim=16, num_heads=2)
COLOURS = np.array([[128, 128, 128], [220, 30, 30], [30, 30, 220]], dtype=np.float64)  # 3 classes


def vit(**overrides) -> dict:
    return {
        "source": "timm",
        "name": "vit_tiny_patch16_224",
        "pretrained": False,
        "init_seed": 0,
        "image_size": 64,
        "model_kwargs": TINY_VIT,
        **overrides,
    }


def scene() -> tuple[Image.Image, np.ndarray]:
    """A 2:1 image (240 x 120): a red object filling the left 60 columns, which a centre crop
    of the shorter side drops, and a blue one in the middle."""
    mask = np.zeros((120, 240), dtype=np.uint8)
    mask[:, :60] = 1
    mask[30:90, 104:152] = 2
    return Image.fromarray(COLOURS[mask].astype(np.uint8)), mask


class PixelTokens:
    """A vision token store whose patch 'tokens' are the mean colours of the patches of the
    encoder's own input tensor (no prefix token), with the encoder's layout."""

    where = "pixel tokens"

    def __init__(self, encoder, images: list[Image.Image]) -> None:
        pixels = encoder.collate(images)["pixel_values"]  # (B, 3, S, S), normalised
        mean = torch.tensor(encoder.data_config["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(encoder.data_config["std"]).view(1, 3, 1, 1)
        rgb = (pixels * std + mean) * 255
        patches = torch.nn.functional.avg_pool2d(rgb, PATCH)  # (B, 3, h, w)
        self.tokens = patches.flatten(2).transpose(1, 2).double().numpy()  # (B, h * w, 3)
        self.attrs = {"layout": {**encoder.token_layout(), "prefix_tokens": 0}}

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.tokens[rows], np.ones(self.tokens[rows].shape[:2], dtype=bool)


class ColourOracle:
    """Scores a 'token' (a mean colour) by its negative distance to each class colour."""

    scores_patches = False  # a pooled aligner: the patch baseline

    def embed_image(self, x: np.ndarray) -> np.ndarray:
        return x

    def similarity(self, colours: np.ndarray, classes: np.ndarray) -> np.ndarray:
        return -np.linalg.norm(colours[:, None, :] - classes[None, :, :], axis=-1)


def run(spec: dict) -> tuple[np.ndarray, np.ndarray]:
    image, mask = scene()
    encoder = build_encoder("v", spec)
    confusion, kept = segment(
        ColourOracle(), PixelTokens(encoder, [image]), COLOURS, np.arange(1), [mask], keep=1
    )
    return confusion, kept[0]


def test_the_centre_crop_is_mapped_back_and_its_margins_count_nowhere() -> None:
    """The encoder's own eval transform (shorter side resized, centre crop): the red object
    lies in the dropped margin, so its pixels are ignored, and the seen middle is labelled
    where it is. (Upsampling the grid over the whole mask gets a quarter of the image wrong.)"""
    confusion, labels = run(vit())
    assert segmentation_metrics(confusion)["pixel_accuracy"] > 0.97
    assert confusion[1].sum() < 0.05 * confusion.sum()  # the margin's red is (almost) unseen
    assert class_iou(confusion)[2] > 0.85
    unseen = labels == IGNORE_INDEX
    assert unseen[:, :50].all() and unseen[:, -50:].all() and not unseen[12:-12, 90:150].any()
    assert unseen[:5].all()  # the crop drops a few rows too: 120 -> 71 rows, 64 kept


def test_a_square_resize_sees_and_scores_every_pixel() -> None:
    """``view: square`` (PAL's segmentation transform): the whole image resized to the square
    input, so the margin's object is seen and scored in place."""
    confusion, labels = run(vit(view="square"))
    assert confusion.sum() == 120 * 240 and not (labels == IGNORE_INDEX).any()
    iou = class_iou(confusion)
    assert iou[1] > 0.9 and iou[2] > 0.8


@pytest.mark.parametrize("size", [(120, 240), (375, 500), (500, 333), (64, 64), (7, 300)])
def test_view_positions_follow_torchvision_resize_and_centre_crop(size) -> None:
    """Where each mask pixel's centre lands in the input (in units of its side): the crop's
    first and last seen pixel columns agree with torchvision's Resize + CenterCrop."""
    from torchvision.transforms import CenterCrop, Resize

    encoder = build_encoder("v", vit())
    view = encoder.token_layout()["view"]
    rows, cols = view_positions(view, size)
    h, w = size
    resized = Resize(view["resize"])(Image.new("L", (w, h)))
    rw, rh = resized.size
    columns = np.tile(np.arange(rw, dtype=np.uint8 if rw < 256 else np.uint16), (rh, 1))
    cropped = np.asarray(CenterCrop(view["crop"])(Image.fromarray(columns.astype(np.int32))))
    left = int(cropped[0, 0])  # the resized column the crop starts at
    expected = ((np.arange(w) + 0.5) * rw / w - left) / view["crop"][1]
    np.testing.assert_allclose(cols, expected, rtol=0, atol=1e-9)
    assert rows.shape == (h,) and cols.shape == (w,)


def test_without_a_view_the_grid_covers_the_image_as_torch_interpolates() -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(3, 5, 4))
    maps = torch.from_numpy(scores).permute(2, 0, 1)[None]
    for size in ((30, 50), (17, 41), (3, 5), (2, 9)):
        expected = torch.nn.functional.interpolate(maps, size, mode="bilinear", align_corners=False)
        got = upsample_scores(scores, (3, 5), size)
        np.testing.assert_allclose(got, expected[0].permute(1, 2, 0).numpy(), rtol=0, atol=1e-12)


def test_batched_decoding_through_a_crop_equals_decoding_each_image() -> None:
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(5, 6, 4))
    view = {"resize": 9, "crop": [8, 8]}
    for masks in (
        [np.zeros((7, 11), np.uint8)] * 5,
        [np.zeros((7, 11), np.uint8)] * 4 + [np.zeros((12, 9), np.uint8)],
    ):
        for image, mask, labels in zip(
            scores, masks, _decode_batch(scores, (2, 3), masks, view), strict=True
        ):
            assert np.array_equal(labels, decode(image, (2, 3), mask.shape, view))
            assert (labels == IGNORE_INDEX).any() and (labels != IGNORE_INDEX).any()


def test_every_extraction_of_a_segmentation_split_uses_the_segmentation_view() -> None:
    """The default config with ``view: square``: shapes/test has a segmentation task,
    shapes/train has none. (The default is ``crop``: there the test split also holds the
    retrieval and classification tasks of aligners trained on the crop view.)"""
    from pipeline import jobs
    from pipeline.config import load_config, validate_config
    from pipeline.stores import keys

    assert load_config(ROOT / "config.yaml")["segmentation"]["view"] == "crop"
    config = {**load_config(ROOT / "config.yaml"), "segmentation": {"view": "square"}}
    config = validate_config(config)

    def views(config: dict) -> dict[tuple[str, str], str]:
        seen = {}
        for split in ("train", "test"):
            for job in (
                jobs.extract_features(config, "shapes", split, "vit_tiny"),
                jobs.extract_tokens(config, "shapes", split, "vit_tiny"),
            ):
                seen[(job.stage, split)] = job.spec["encoder"]["view"]
            assert (
                "view" not in jobs.extract_tokens(config, "shapes", split, "minilm").spec["encoder"]
            )
        return seen

    assert set(views(config).items()) == {
        (("extract_features", "train"), "crop"),
        (("extract_tokens", "train"), "crop"),
        (("extract_features", "test"), "square"),
        (("extract_tokens", "test"), "square"),
    }
    # what a reading job expects is what the extraction job is told
    spec = jobs.extract_tokens(config, "shapes", "test", "vit_tiny").spec["encoder"]
    assert jobs.token_request(config, "shapes", "test", "vit_tiny") == keys.request_hash(
        keys.TOKENS,
        "vit_tiny",
        spec,
        "shapes",
        "test",
        config["runtime"]["precision"],
        dtype=config["tokens"]["dtype"],
    )
    assert set(views(load_config(ROOT / "config.yaml")).values()) == {"crop"}
