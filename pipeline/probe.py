"""Linear probes of a frozen vision encoder on the synthetic world, block by block.

Pooled probes: for each attribute (colour, shape, count, size, position) and each block, a
multinomial logistic regression is fitted on the standardised pooled features of the first
``n_train`` images of one split and scored (accuracy) on the first ``n_test`` images of
another. The features are exactly what the extract stage stores: ``Encoder.collate`` then
``Encoder.pooled_layers``.

Patch probe: the same regression from each patch token of a block to its patch's mask class
(the class most of the pixels under the patch hold, background included), scored the way
zero-shot segmentation is: the regression's class probabilities of every patch of a test
image are decoded into a label map at the mask's size
(``pipeline.evaluate.segmentation.decode``: the encoder's view, bilinear upsampling, argmax)
and the confusion over the whole test set gives the mIoU. It tells how far the tokens alone
can segment, before any aligner; ``patch_ceiling`` is what a perfect patch classifier reaches.

The world's labels and masks are used here only, never for pretraining.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from pipeline.data import synthetic
from pipeline.encoders import Encoder
from pipeline.evaluate.segmentation import (
    IGNORE_INDEX,
    confusion_matrix,
    decode,
    pixel_patches,
    segmentation_metrics,
)

ATTRIBUTES = ("colour", "shape", "count", "size", "position")


@dataclass(frozen=True, eq=False)
class WorldSplit:
    """The first images of a split of the world: PIL images, label columns, masks."""

    images: list[Image.Image]
    labels: dict[str, np.ndarray]  # attribute -> class index per image (``scene_labels``)
    masks: list[np.ndarray]  # (H, W) uint8: background 0, then the shapes


def world_split(dataset: Mapping[str, Any], split: str, n: int) -> WorldSplit:
    """The first ``n`` images of ``split`` of a normalized synthetic spec."""
    holdout = synthetic.holdout_combinations(dataset["seed"], dataset["holdout_combinations"])
    images, labels, masks = [], [], []
    for index in range(n):
        example = synthetic.generate_example(dataset, split, index, holdout)
        images.append(Image.fromarray(example.image))
        labels.append(synthetic.scene_labels(example.scene, holdout))
        masks.append(example.mask)
    columns = {
        key.removesuffix("_label"): np.array([row[key] for row in labels]) for key in labels[0]
    }
    return WorldSplit(images, columns, masks)


def encode_layers(
    encoder: Encoder, images: Sequence[Any], batch_size: int = 128
) -> list[np.ndarray]:
    """Pooled features of every layer, (n, dim) float32 each, in eval mode without gradients."""
    parts: list[list[np.ndarray]] = [[] for _ in encoder.layer_names]
    batches = range(0, len(images), batch_size)
    with torch.inference_mode():
        for start in tqdm(batches, desc=f"encode {encoder.name}", unit="batch", leave=False):
            batch = encoder.collate(list(images[start : start + batch_size]))
            for layer, pooled in enumerate(encoder.pooled_layers(batch)):
                parts[layer].append(pooled.float().numpy())
    return [np.concatenate(chunks) for chunks in parts]


def encode_patches(
    encoder: Encoder, images: Sequence[Any], batch_size: int = 128
) -> list[np.ndarray]:
    """Patch tokens of every layer, (n, patches, dim) float32 each (prefix tokens dropped)."""
    layers = list(range(len(encoder.layer_names)))
    prefix = encoder.token_layout()["prefix_tokens"]
    parts: list[list[np.ndarray]] = [[] for _ in layers]
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = encoder.collate(list(images[start : start + batch_size]))
            for layer, (tokens, _) in enumerate(encoder.token_layers(batch, layers)):
                parts[layer].append(tokens[:, prefix:].float().numpy())
    return [np.concatenate(chunks) for chunks in parts]


def patch_targets(
    mask: np.ndarray, grid: tuple[int, int], view: dict[str, Any] | None, n_classes: int
) -> np.ndarray:
    """(h * w,) row-major: the class most pixels under each patch hold (ties to the lower
    class; ``pixel_patches`` says which patch a pixel lies under); pixels the input does not
    see, or ``IGNORE_INDEX``, count nowhere."""
    patches = pixel_patches(view, mask.shape, grid)
    keep = (patches >= 0) & (mask != IGNORE_INDEX)
    index = patches[keep] * n_classes + mask[keep].astype(np.int64)
    cells = grid[0] * grid[1]
    return np.bincount(index, minlength=cells * n_classes).reshape(cells, n_classes).argmax(1)


def linear_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    c: float = 1.0,
    max_iter: int = 2000,
) -> float:
    """Test accuracy of logistic regression on features standardised with train statistics."""
    scaler, model = fit_probe(x_train, y_train, c, max_iter)
    return float(model.score(scaler.transform(x_test), y_test))


def fit_probe(
    x: np.ndarray, y: np.ndarray, c: float = 1.0, max_iter: int = 2000
) -> tuple[StandardScaler, LogisticRegression]:
    scaler = StandardScaler().fit(x)
    return scaler, LogisticRegression(C=c, max_iter=max_iter).fit(scaler.transform(x), y)


def patch_probe(
    train_tokens: np.ndarray,
    train_targets: np.ndarray,
    test_tokens: np.ndarray,
    test_masks: Sequence[np.ndarray],
    grid: tuple[int, int],
    view: dict[str, Any] | None,
    n_classes: int,
) -> float:
    """Test mIoU of a logistic regression from patch tokens (n, P, D) to their patch targets
    (n, P) (``patch_targets``), decoded as segmentation decodes (module docstring)."""
    dim = train_tokens.shape[-1]
    scaler, model = fit_probe(train_tokens.reshape(-1, dim), train_targets.ravel())
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    for tokens, mask in zip(test_tokens, test_masks, strict=True):
        scores = np.zeros((len(tokens), n_classes))  # classes no train patch holds: 0
        scores[:, model.classes_] = model.predict_proba(scaler.transform(tokens))
        labels = decode(scores, grid, mask.shape, view)
        target = np.where(labels == IGNORE_INDEX, IGNORE_INDEX, mask)
        confusion += confusion_matrix(labels, target, n_classes)
    return segmentation_metrics(confusion)["miou"]


def patch_ceiling(
    masks: Sequence[np.ndarray],
    grid: tuple[int, int],
    view: dict[str, Any] | None,
    n_classes: int,
) -> tuple[float, float]:
    """(ceiling, floor) of patch-level segmentation of these masks on this grid, from one
    decoding. The ceiling is the mIoU of a perfect patch probe: each patch scored 1 for its
    own target class (``patch_targets``) and 0 for the others, decoded the same way (near
    enough the most it can reach: a soft score can do slightly better at borders). The floor
    is the mIoU of predicting the background (class 0) everywhere on the same pixels
    (``miou_all_background``), what a segmentation must clear."""
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    for mask in masks:
        scores = np.eye(n_classes)[patch_targets(mask, grid, view, n_classes)]
        labels = decode(scores, grid, mask.shape, view)
        target = np.where(labels == IGNORE_INDEX, IGNORE_INDEX, mask)
        confusion += confusion_matrix(labels, target, n_classes)
    metrics = segmentation_metrics(confusion)
    return metrics["miou"], metrics["miou_all_background"]


SCHEMA = {"layer": pl.Int64, "attribute": pl.String, "score": pl.Float64}
PATCH_PROBE = "patch_miou"  # the patch probe's row name in the ``attribute`` column


def probe_layers(
    train: tuple[list[np.ndarray], Mapping[str, np.ndarray]],
    test: tuple[list[np.ndarray], Mapping[str, np.ndarray]],
    attributes: Sequence[str] = ATTRIBUTES,
    threads: int = 1,
) -> pl.DataFrame:
    """One row per (layer, attribute): ``layer`` index, ``attribute``, test accuracy
    (``score``) of the pooled probe.

    BLAS runs with ``threads`` threads: lbfgs on a small problem is far slower with more
    threads than cores (as when torch's own pool is also alive).
    """
    (train_x, train_y), (test_x, test_y) = train, test
    rows = []
    with threadpool_limits(limits=threads):
        for layer, (x_tr, x_te) in enumerate(zip(train_x, test_x, strict=True)):
            for attribute in attributes:
                score = linear_probe(x_tr, train_y[attribute], x_te, test_y[attribute])
                rows.append({"layer": layer, "attribute": attribute, "score": score})
    return pl.DataFrame(rows, schema=SCHEMA)


def probe_patch_layers(
    encoder: Encoder, train: WorldSplit, test: WorldSplit, n_train: int, threads: int = 1
) -> pl.DataFrame:
    """One row per layer: attribute ``PATCH_PROBE``, the patch probe's test mIoU (``score``),
    fitted on the patches of the first ``n_train`` images of ``train``."""
    view, grid = encoder.token_layout()["view"], encoder.grid
    if grid is None:
        raise ValueError(f"encoder {encoder.name!r} reports no patch grid to probe")
    n_classes = len(synthetic.SEGMENTATION_CLASSES)
    masks = train.masks[:n_train]
    targets = np.stack([patch_targets(mask, grid, view, n_classes) for mask in masks])
    train_tokens = encode_patches(encoder, train.images[:n_train])
    test_tokens = encode_patches(encoder, test.images)
    rows = []
    with threadpool_limits(limits=threads):
        for layer, (x_tr, x_te) in enumerate(zip(train_tokens, test_tokens, strict=True)):
            miou = patch_probe(x_tr, targets, x_te, test.masks, grid, view, n_classes)
            rows.append({"layer": layer, "attribute": PATCH_PROBE, "score": miou})
    return pl.DataFrame(rows, schema=SCHEMA)
