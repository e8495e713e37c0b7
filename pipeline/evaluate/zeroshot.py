"""Zero-shot classification through an aligner (docs/protocols.md).

Class embeddings follow open_clip: embed every prompt (one per class and template) with the
text side of the aligner, L2-normalise, average over the templates of each class, and
re-normalise. Logits are 100 x the aligner's own ``similarity`` (never a plain inner product:
CSA weights coordinates by canonical correlations).

Ties in the logits are broken towards the lower class index, exactly as ``np.argmax`` does:
the rank of the true class is the number of classes scoring strictly higher plus the number
scoring equally with a lower index, and top-k counts a hit when that rank is below k. Constant
logits therefore predict class 0 for every image.

Balanced accuracy is the mean recall over the classes present in the labels; a class never
predicted has recall 0, and a class absent from the labels is left out (its recall is undefined).
"""

from __future__ import annotations

import numpy as np

from pipeline.evaluate.intervals import Hits
from pipeline.evaluate.retrieval import SharedSpace, target_ranks
from pipeline.linalg import l2_normalise

LOGIT_SCALE = 100.0
TOP5_MIN_CLASSES = 5


def average_by_class(embeddings: np.ndarray, class_index: np.ndarray, n_classes: int) -> np.ndarray:
    """Mean embedding of each class over its rows (its prompt templates)."""
    class_index = _check_labels(class_index, n_classes, "class_index")
    if len(class_index) != len(embeddings):
        raise ValueError(
            f"class_index has {len(class_index)} entries but there are {len(embeddings)} prompts"
        )
    counts = np.bincount(class_index, minlength=n_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise ValueError(f"classes {empty[:5].tolist()} have no prompt")
    sums = np.zeros((n_classes, embeddings.shape[1]), dtype=np.float64)
    np.add.at(sums, class_index, embeddings)
    return sums / counts[:, None]


def class_embeddings(
    aligner: SharedSpace, prompt_features: np.ndarray, class_index: np.ndarray, n_classes: int
) -> np.ndarray:
    """(n_classes, k) unit class embeddings; ``class_index[p]`` is the class of prompt ``p``.
    ``prompt_features`` is whatever the aligner's text side embeds (a token source for PAL)."""
    prompt_emb = np.asarray(aligner.embed_text(prompt_features), np.float64)
    return class_embeddings_of(prompt_emb, class_index, n_classes)


def class_embeddings_of(
    prompt_emb: np.ndarray, class_index: np.ndarray, n_classes: int
) -> np.ndarray:
    """(n_classes, k) unit class embeddings from the prompts' text embeddings: each normalised,
    averaged over the templates of its class, renormalised."""
    prompt_emb = l2_normalise(np.asarray(prompt_emb, np.float64), "error")
    return l2_normalise(average_by_class(prompt_emb, class_index, n_classes), "error")


def zero_shot_logits(
    aligner: SharedSpace, image_features: np.ndarray, class_emb: np.ndarray
) -> np.ndarray:
    """(n_images, n_classes) logits: 100 x similarity of the aligned images and the classes."""
    return logits_of(aligner, aligner.embed_image(image_features), class_emb)


def logits_of(aligner: SharedSpace, image_emb: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    """(n_images, n_classes) logits from image embeddings already in the shared space."""
    return LOGIT_SCALE * np.asarray(aligner.similarity(image_emb, class_emb), dtype=np.float64)


def class_ranks(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0-based rank of the true class in each row (descending logits, ties to lower index)."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (n_images, n_classes), got shape {logits.shape}")
    labels = _check_labels(labels, logits.shape[1], "labels")
    if len(labels) != len(logits):
        raise ValueError(f"{len(labels)} labels for {len(logits)} rows of logits")
    if not np.isfinite(logits).all():
        raise ValueError("logits contain NaN or infinite values")
    return target_ranks(logits, labels)


def classification_outcomes(
    logits: np.ndarray, labels: np.ndarray, images: np.ndarray | None = None
) -> dict[str, Hits]:
    """Per-image hits of ``top1``, ``top5`` (only with at least 5 classes) and
    ``balanced_accuracy`` (top-1 hits by class); ``images``: each row's image (default its
    index), the unit the bootstrap resamples."""
    ranks = class_ranks(logits, labels)
    images = np.arange(len(ranks)) if images is None else np.asarray(images)
    outcomes = {"top1": Hits(ranks < 1, images)}
    if logits.shape[1] >= TOP5_MIN_CLASSES:
        outcomes["top5"] = Hits(ranks < 5, images)
    outcomes["balanced_accuracy"] = Hits(ranks == 0, images, labels)
    return outcomes


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``top1``, ``top5`` (only with at least 5 classes) and ``balanced_accuracy``, in [0, 1]."""
    return {name: hits.value() for name, hits in classification_outcomes(logits, labels).items()}


def zero_shot_classification(
    aligner: SharedSpace,
    image_features: np.ndarray,
    labels: np.ndarray,
    prompt_features: np.ndarray,
    class_index: np.ndarray,
    n_classes: int,
) -> dict[str, float]:
    """Classification metrics of an aligner on one labelled image set and its class prompts."""
    class_emb = class_embeddings(aligner, prompt_features, class_index, n_classes)
    return classification_metrics(zero_shot_logits(aligner, image_features, class_emb), labels)


def _check_labels(labels: np.ndarray, n_classes: int, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if len(labels) == 0:
        raise ValueError(f"{name} is empty")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(f"{name} holds values outside 0..{n_classes - 1}")
    return labels
