"""Cross-modal retrieval: image-to-text and text-to-image Recall@k (standard CLIP protocol).

``scores[i, j]`` is the similarity of image ``i`` and caption ``j``; ``caption_image[j]`` is the
image row of caption ``j``. Image-to-text: a query image hits at k when ANY of its ground-truth
captions ranks in the top k. Text-to-image: a query caption hits at k when its image ranks in
the top k.

Ties are broken deterministically by candidate index, as a stable sort of descending scores
would: the rank of a target is the number of candidates scoring strictly higher plus the
number scoring equally with a lower index. A constant score matrix therefore ranks every
candidate by its index, so degenerate scores get chance-level recall rather than full marks.

Queries are processed in blocks, so only the scores (never a ranking of all candidates) are
held in memory: 5k images x 25k captions needs the float32 score matrix and a few blocks of
about four million elements.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from pipeline.evaluate.intervals import Hits

RECALL_KS = (1, 5, 10)
BLOCK_ELEMENTS = 1 << 22


class SharedSpace(Protocol):
    """What evaluation needs of a fitted aligner: embed both sides and score them."""

    def embed_image(self, x: np.ndarray) -> np.ndarray: ...

    def embed_text(self, y: np.ndarray) -> np.ndarray: ...

    def similarity(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray: ...


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of column ``targets[q]`` in row ``q`` (scores descending, ties by index)."""
    target_score = np.take_along_axis(scores, targets[:, None], axis=1)
    tied_before = (scores == target_score) & (np.arange(scores.shape[1]) < targets[:, None])
    return ((scores > target_score) | tied_before).sum(axis=1)


def best_ground_truth(scores: np.ndarray, is_ground_truth: np.ndarray) -> np.ndarray:
    """Per row, the ground-truth column ranked first (highest score, ties to lower index)."""
    return np.argmax(np.where(is_ground_truth, scores, -np.inf), axis=1)


def image_to_text_ranks(
    scores: np.ndarray, caption_image: np.ndarray, block_size: int | None = None
) -> np.ndarray:
    """Per image, the best rank among its ground-truth captions."""
    caption_image = _check_retrieval_inputs(scores, caption_image)
    n_images, n_captions = scores.shape
    block = block_size or _block_rows(n_captions)
    ranks = np.empty(n_images, dtype=np.int64)
    for start in range(0, n_images, block):
        stop = min(start + block, n_images)
        block_scores = _finite_block(scores[start:stop])
        is_ground_truth = caption_image[None, :] == np.arange(start, stop)[:, None]
        best = best_ground_truth(block_scores, is_ground_truth)
        ranks[start:stop] = target_ranks(block_scores, best)
    return ranks


def text_to_image_ranks(
    scores: np.ndarray, caption_image: np.ndarray, block_size: int | None = None
) -> np.ndarray:
    """Per caption, the rank of its image among all images."""
    caption_image = _check_retrieval_inputs(scores, caption_image)
    n_images, n_captions = scores.shape
    block = block_size or _block_rows(n_images)
    ranks = np.empty(n_captions, dtype=np.int64)
    for start in range(0, n_captions, block):
        stop = min(start + block, n_captions)
        block_scores = np.ascontiguousarray(_finite_block(scores[:, start:stop]).T)
        ranks[start:stop] = target_ranks(block_scores, caption_image[start:stop])
    return ranks


def retrieval_outcomes(
    scores: np.ndarray,
    caption_image: np.ndarray,
    ks: Sequence[int] = RECALL_KS,
    block_size: int | None = None,
) -> dict[str, Hits]:
    """Per-query hits of ``i2t_recall@k`` (per image) and ``t2i_recall@k`` (per caption, its
    unit its image: the bootstrap resamples images with all their captions)."""
    i2t = image_to_text_ranks(scores, caption_image, block_size)
    t2i = text_to_image_ranks(scores, caption_image, block_size)
    if len(i2t) == 0 or len(t2i) == 0:
        raise ValueError("recall needs at least one query")
    images = np.arange(len(i2t))
    return {f"i2t_recall@{k}": Hits(i2t < k, images) for k in ks} | {
        f"t2i_recall@{k}": Hits(t2i < k, np.asarray(caption_image)) for k in ks
    }


def retrieval_metrics(
    scores: np.ndarray,
    caption_image: np.ndarray,
    ks: Sequence[int] = RECALL_KS,
    block_size: int | None = None,
) -> dict[str, float]:
    """``i2t_recall@k`` and ``t2i_recall@k`` (fractions in [0, 1]) for each k."""
    outcomes = retrieval_outcomes(scores, caption_image, ks, block_size)
    return {name: hits.value() for name, hits in outcomes.items()}


def retrieval_scores(
    aligner: SharedSpace, image_features: np.ndarray, caption_features: np.ndarray
) -> np.ndarray:
    """The (n_images, n_captions) score matrix of an aligner, by its own ``similarity``."""
    return aligner.similarity(
        aligner.embed_image(image_features), aligner.embed_text(caption_features)
    )


def _block_rows(n_columns: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(n_columns, 1))


def _check_retrieval_inputs(scores: np.ndarray, caption_image: np.ndarray) -> np.ndarray:
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (n_images, n_captions), got shape {scores.shape}")
    n_images, n_captions = scores.shape
    caption_image = np.asarray(caption_image)
    if caption_image.shape != (n_captions,):
        raise ValueError(
            f"caption_image has shape {caption_image.shape}, expected ({n_captions},): "
            "one image row per caption column of scores"
        )
    if not np.issubdtype(caption_image.dtype, np.integer):
        raise ValueError(f"caption_image must hold integer image rows, got {caption_image.dtype}")
    if n_captions and (caption_image.min() < 0 or caption_image.max() >= n_images):
        raise ValueError(f"caption_image holds image rows outside 0..{n_images - 1}")
    uncaptioned = np.flatnonzero(np.bincount(caption_image, minlength=n_images) == 0)
    if len(uncaptioned):
        raise ValueError(
            f"{len(uncaptioned)} image rows have no caption (first: {uncaptioned[:5].tolist()}); "
            "image-to-text recall needs at least one ground-truth caption per image"
        )
    return caption_image


def _finite_block(block: np.ndarray) -> np.ndarray:
    block = np.asarray(block)
    if not np.isfinite(block).all():
        raise ValueError("scores contain NaN or infinite values")
    return block
