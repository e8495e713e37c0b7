"""The reference row (``aligner: none``): a pair already aligned by its own training (a CLIP
model's two towers, ``pipeline.encoders.clip``) scored as it is, through the same protocol as
every post-hoc method: the ceiling both papers compare with.

Nothing is learned: both sides are only L2-normalised, so the similarity is the cosine of the
pair's own embeddings (CLIP's zero-shot logits up to its temperature, which no ranking
metric sees). Fitting checks that both sides have one width, and keeps it as the state.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.align.base import ClosedFormAligner, check_features
from pipeline.align.params import NoneParams
from pipeline.linalg import l2_normalise


class IdentityAligner(ClosedFormAligner):
    """Both sides as they are, L2-normalised (kind ``none``)."""

    kind = "none"
    params: NoneParams
    STATE_KEYS = ("dim",)

    def solve(self, x: np.ndarray, y: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Checks the pairs share one space (one width)."""
        if x.shape[1] != y.shape[1]:
            raise ValueError(
                f"aligner 'none' scores an already-aligned pair as it is: image features are "
                f"{x.shape[1]} wide, text features {y.shape[1]}; pair the two towers of one "
                "model (e.g. open_clip_vision and open_clip_text)"
            )
        return {"dim": np.asarray(x.shape[1])}, {}

    def embed(self, a: np.ndarray, side: str) -> np.ndarray:
        a = check_features(f"{side} features", a, int(self.fitted()["dim"]))
        return l2_normalise(a).astype(np.float32)
