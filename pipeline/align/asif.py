"""``asif`` (Norelli et al. 2023): relative representations on the training pairs; training free.

The anchors are the training pairs (kept L2-normalised in float32; scores computed in float64).
A query's representation is its cosine similarity to every anchor of its own modality, keeping
the top ``k`` (capped at the number of anchors; the rest set to 0), raised to the power ``p``
with the sign kept (sign(s) |s|^p, so an even p never turns a dissimilar anchor into a similar
one), then L2-normalised. Image and text representations share the anchor axis, so the score
of a pair is the inner product of its two representations.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.align.base import ClosedFormAligner, check_features
from pipeline.align.params import ASIFParams
from pipeline.linalg import l2_normalise

QUERY_CHUNK = 1024  # query rows per block, bounding the dense (queries x anchors) block


def relative_representation(
    queries: np.ndarray, anchors: np.ndarray, k: int, p: float
) -> np.ndarray:
    """Top-k, signed-power, L2-normalised cosine similarities of queries (rows) to anchors."""
    sims = l2_normalise(queries) @ l2_normalise(anchors).T
    if k < sims.shape[1]:
        dropped = np.argpartition(-sims, k, axis=1)[:, k:]
        np.put_along_axis(sims, dropped, 0.0, axis=1)
    return l2_normalise(np.sign(sims) * np.abs(sims) ** p)


class ASIFAligner(ClosedFormAligner):
    """Relative representations against the training pairs as anchors."""

    kind = "asif"
    STATE_KEYS = ("image_anchors", "text_anchors")
    params: ASIFParams

    def solve(self, x: np.ndarray, y: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {
            "image_anchors": l2_normalise(x).astype(np.float32),
            "text_anchors": l2_normalise(y).astype(np.float32),
        }
        return arrays, {"k": min(self.params.k, len(x)), "n_anchors": len(x)}

    def embed(self, a: np.ndarray, side: str) -> np.ndarray:
        anchors = self.fitted()[f"{side}_anchors"]
        a = check_features(f"{side} features", a, anchors.shape[1])
        k = min(self.params.k, len(anchors))
        blocks = [
            relative_representation(a[start : start + QUERY_CHUNK], anchors, k, self.params.p)
            for start in range(0, len(a), QUERY_CHUNK)
        ]
        out = np.concatenate(blocks) if blocks else np.zeros((0, len(anchors)))
        return out.astype(np.float32)
