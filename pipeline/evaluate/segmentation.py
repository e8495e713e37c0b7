"""Zero-shot semantic segmentation: decoding patch scores into label maps, and mIoU (docs/pal.md).

Patch scores (P, C) of a (h, w) patch grid (row-major) are reshaped to the grid, upsampled
bilinearly to the mask size (H, W) (``align_corners=False``, as torch and most segmentation
code), and the label map is their argmax over classes (ties to the lower class index).

Metrics come from a confusion matrix (rows: target class, columns: predicted class) summed over
all the images of a set. The IoU of class c is tp / (tp + fp + fn); classes whose union is empty
(neither in the targets nor predicted) are left out of the means. ``miou`` averages every other
class, background included; ``miou_fg`` leaves the background class out; ``pixel_accuracy``
is the fraction of counted pixels predicted right; ``miou_all_background``, the floor a method
must clear, is the ``miou`` of predicting the background class at every pixel (the background's
pixel fraction over the number of classes in the targets). Pixels labelled ``ignore_index``
count nowhere.

``segment`` runs this over a split: the patch tokens of a vision token store, scored by PAL's
anchors or, for every pooled aligner, by the patch baseline (``patch_class_scores``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = 255


def confusion_matrix(
    pred: np.ndarray, target: np.ndarray, n_classes: int, ignore_index: int | None = IGNORE_INDEX
) -> np.ndarray:
    """(n_classes, n_classes) int64 counts of (target, predicted) over every pixel of label
    maps of any (equal) shape; sum the matrices of several images to accumulate a set."""
    pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
    if pred.shape != target.shape:
        raise ValueError(f"{pred.size} predicted pixels but {target.size} target pixels")
    keep = target != ignore_index if ignore_index is not None else np.ones(len(target), bool)
    pred, target = pred[keep].astype(np.int64), target[keep].astype(np.int64)
    for name, labels in (("pred", pred), ("target", target)):
        if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
            raise ValueError(f"{name} holds labels outside [0, {n_classes}) (and not ignored)")
    counts = np.bincount(target * n_classes + pred, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes)


def class_iou(confusion: np.ndarray) -> np.ndarray:
    """Per-class IoU tp / (tp + fp + fn), NaN where the union is empty."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def segmentation_metrics(confusion: np.ndarray, background: int | None = 0) -> dict[str, float]:
    """``miou`` (all classes with a non-empty union), ``miou_fg`` (the same without class
    ``background``; equal to ``miou`` when it is None), ``pixel_accuracy`` and (with a
    background class) ``miou_all_background``; NaN if undefined."""
    iou = class_iou(confusion)
    foreground = np.ones(len(iou), dtype=bool)
    if background is not None:
        foreground[background] = False
    total = np.asarray(confusion).sum()
    metrics = {
        "miou": _nanmean(iou),
        "miou_fg": _nanmean(iou[foreground]),
        "pixel_accuracy": float(np.trace(confusion) / total) if total else float("nan"),
    }
    if background is not None:
        metrics["miou_all_background"] = all_background_miou(confusion, background)
    return metrics


def all_background_miou(confusion: np.ndarray, background: int = 0) -> float:
    """The ``miou`` of a label map that is ``background`` everywhere, on the same targets:
    the background's IoU is its share of the pixels, every other class in the targets has
    IoU 0, and classes absent from the targets have an empty union (left out)."""
    targets = np.asarray(confusion).sum(axis=1)
    everywhere = np.zeros_like(confusion)
    everywhere[:, background] = targets
    return _nanmean(class_iou(everywhere))


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


def view_positions(view: dict[str, Any] | None, size: tuple[int, int]) -> tuple[np.ndarray, ...]:
    """Where the centre of each row and each column of an (H, W) image lands in the model's
    input, as a fraction of the input's height / width: in [0, 1) where the input saw it.

    ``view`` is the token layout's (``pipeline.encoders.vision.image_view``): the image resized
    (an int: the shorter side to it, the longer to ``int(side * long / short)``, as torchvision's
    ``Resize``; [h, w]: exactly), then centre-cropped to ``crop`` (offsets rounded as torchvision's
    ``CenterCrop``). None: the input is the whole image. Resizing keeps pixel centres aligned:
    pixel x of the image is at (x + 0.5) * resized / W in the resized image."""
    height, width = size
    if view is None:
        resized, crop, offset = (height, width), (height, width), (0, 0)
    else:
        resize = view["resize"]
        if isinstance(resize, int):
            short, long = sorted((height, width))
            scaled = (resize, int(resize * long / short))
            resized = scaled if height <= width else scaled[::-1]
        else:
            resized = (int(resize[0]), int(resize[1]))
        crop = tuple(view["crop"] or resized)
        if crop[0] > resized[0] or crop[1] > resized[1]:
            raise ValueError(f"a {crop} crop of a {resized} resized image pads it: not supported")
        offset = tuple(round((r - c) / 2.0) for r, c in zip(resized, crop, strict=True))
    return tuple(
        ((np.arange(n) + 0.5) * r / n - o) / c
        for n, r, c, o in zip(size, resized, crop, offset, strict=True)
    )


def upsample_scores(
    scores: np.ndarray | torch.Tensor,
    grid: tuple[int, int],
    size: tuple[int, int],
    view: dict[str, Any] | None = None,
) -> np.ndarray:
    """(H, W, C) bilinear upsampling of patch scores (P, C) or (h, w, C) of a row-major (h, w)
    patch grid onto an (H, W) image through ``view`` (``view_positions``; None: the grid
    covers the whole image, as ``F.interpolate(..., align_corners=False)``). Pixels the input
    did not see take the nearest edge's values (``seen`` tells them apart). Keeps float64."""
    scores = torch.as_tensor(scores)
    h, w = grid
    if scores.ndim not in (2, 3) or scores.shape[:-1] not in ((h * w,), (h, w)):
        raise ValueError(f"scores {tuple(scores.shape)} do not fit a {h} x {w} patch grid")
    return _upsample(scores.reshape(1, h, w, -1), size, view)[0].permute(1, 2, 0).numpy()


def _upsample(
    maps: torch.Tensor, size: tuple[int, int], view: dict[str, Any] | None
) -> torch.Tensor:
    """(B, C, H, W) from (B, h, w, C): torch's bilinear sampler at each pixel's position in the
    input (``align_corners=False``, edges clamped: with no crop, ``F.interpolate``'s numbers)."""
    if not maps.is_floating_point():
        maps = maps.to(torch.float32)
    rows, cols = (torch.as_tensor(2 * p - 1, dtype=maps.dtype) for p in view_positions(view, size))
    y, x = torch.meshgrid(rows, cols, indexing="ij")
    grid = torch.stack([x, y], dim=-1).expand(len(maps), -1, -1, -1)
    return F.grid_sample(
        maps.permute(0, 3, 1, 2).contiguous(),
        grid,
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )


def seen(view: dict[str, Any] | None, size: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the pixels of an (H, W) image whose centre lies inside the model's input."""
    rows, cols = ((p >= 0) & (p < 1) for p in view_positions(view, size))
    return rows[:, None] & cols[None, :]


def pixel_patches(
    view: dict[str, Any] | None, size: tuple[int, int], grid: tuple[int, int]
) -> np.ndarray:
    """(H, W) int64: the row-major index of the patch of an (h, w) grid that each pixel's
    centre falls in through ``view`` (``view_positions``), -1 where the input did not see it."""
    rows, cols = view_positions(view, size)
    h, w = grid
    row = np.where((rows >= 0) & (rows < 1), np.floor(rows * h), -1).astype(np.int64)
    col = np.where((cols >= 0) & (cols < 1), np.floor(cols * w), -1).astype(np.int64)
    index = row[:, None] * w + col[None, :]
    return np.where((row[:, None] >= 0) & (col[None, :] >= 0), index, -1)


def decode(
    scores: np.ndarray | torch.Tensor,
    grid: tuple[int, int],
    size: tuple[int, int],
    view: dict[str, Any] | None = None,
) -> np.ndarray:
    """(H, W) int64 label map: the argmax over classes of the upsampled patch scores, and
    ``IGNORE_INDEX`` where the input did not see the image (``seen``)."""
    labels = np.argmax(upsample_scores(scores, grid, size, view), axis=-1).astype(np.int64)
    labels[~seen(view, size)] = IGNORE_INDEX
    return labels


# ---- zero-shot segmentation of a split through an aligner ----------------------------------------

IMAGES_PER_BATCH = 32


def patch_class_scores(aligner: Any, patches: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    """(N, C) scores of patch tokens (N, D) against unit class embeddings (C, k).

    PAL (``aligner.scores_patches``): the patch-anchor cosines times the class profiles
    (docs/pal.md). Any pooled aligner, the standard patch baseline: each patch token through
    the image map (``embed_image``) as if it were a pooled feature, scored by the aligner's own
    ``similarity``."""
    if aligner.scores_patches:
        return np.asarray(aligner.patch_scores(patches), np.float64) @ class_emb.T
    return np.asarray(aligner.similarity(aligner.embed_image(patches), class_emb), np.float64)


def segment(
    aligner: Any,
    tokens: Any,
    class_emb: np.ndarray,
    rows: np.ndarray,
    masks: list[np.ndarray],
    keep: int = 0,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The confusion matrix of images ``rows`` of a token store (``stores.tokens.TokenStore``
    of a vision layer) against their ``masks``, and the label maps of the first ``keep``.

    Each image's patch tokens (the prefix tokens dropped, the row-major grid from the store's
    layout) are scored against the classes (``patch_class_scores``) and decoded at its mask's
    size (``decode``); one matrix accumulates the whole set."""
    layout = tokens.attrs.get("layout") or {}
    prefix, grid = int(layout.get("prefix_tokens", 0)), layout.get("grid")
    view = layout.get("view")  # absent: the grid covers the whole image
    if "view" in layout and view is None:
        raise ValueError(
            f"{tokens.where}: the encoder's preprocessing moves pixels in a way segmentation "
            "cannot map back (only a resize and a centre crop are known; see docs/pal.md)"
        )
    if grid is None:
        raise ValueError(f"{tokens.where}: the encoder reports no patch grid to segment with")
    n_classes = len(class_emb)
    confusion = np.zeros((n_classes, n_classes), dtype=np.int64)
    kept: list[np.ndarray] = []
    for start in range(0, len(rows), IMAGES_PER_BATCH):
        batch = np.asarray(rows[start : start + IMAGES_PER_BATCH], dtype=np.int64)
        values, _ = tokens.read(batch)
        patches = values[:, prefix:]
        if patches.shape[1] != grid[0] * grid[1]:
            raise ValueError(
                f"{tokens.where}: {patches.shape[1]} patch tokens do not fill a {grid} grid"
            )
        scores = patch_class_scores(aligner, patches.reshape(-1, patches.shape[2]), class_emb)
        scores = scores.reshape(len(batch), patches.shape[1], n_classes)
        batch_masks = masks[start : start + len(batch)]
        for b, labels in enumerate(_decode_batch(scores, tuple(grid), batch_masks, view)):
            unseen = labels == IGNORE_INDEX  # outside the input: counts nowhere
            target = np.where(unseen, IGNORE_INDEX, batch_masks[b])
            confusion += confusion_matrix(labels, target, n_classes)
            if len(kept) < keep:
                kept.append(labels.astype(np.uint8))
    return confusion, kept


def _decode_batch(
    scores: np.ndarray,
    grid: tuple[int, int],
    masks: list[np.ndarray],
    view: dict[str, Any] | None = None,
) -> list[np.ndarray]:
    """``decode`` of each image's (P, C) scores at its mask's size; images whose masks share a
    size are upsampled together (the same numbers as one by one)."""
    if len({mask.shape for mask in masks}) != 1:
        return [decode(s, grid, m.shape, view) for s, m in zip(scores, masks, strict=True)]
    size = masks[0].shape
    maps = torch.as_tensor(scores).reshape(len(scores), *grid, -1)
    labels = _upsample(maps, size, view).max(dim=1).indices.numpy()  # ties: the first, as argmax
    labels[:, ~seen(view, size)] = IGNORE_INDEX
    return list(labels)
