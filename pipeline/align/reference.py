"""The reference row (``aligner: none``): a pair already aligned by its own training (a CLIP
model's two towers, ``pipeline.encoders.clip``) scored as it is, through the same protocol as
every post-hoc method: the ceiling both papers compare with.

Nothing is learned: both sides are only L2-normalised, so the similarity is the cosine of the
pair's own embeddings (CLIP's zero-shot logits up to its temperature, which no ranking
metric sees). Fitting checks that both sides have one width, and keeps it as the state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.align.base import ClosedFormAligner, FitReport, check_features, check_pairs, register
from pipeline.linalg import l2_normalise


@dataclass(frozen=True)
class NoneParams:
    """No hyper-parameters."""


@register
class IdentityAligner(ClosedFormAligner):
    kind = "none"
    Params = NoneParams
    STATE_KEYS = ("dim",)

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        x_val: np.ndarray | None,
        y_val: np.ndarray | None,
        seed: int,
    ) -> FitReport:
        """Checks the pairs share one space (one width); validation pairs and seed unused."""
        x, y = check_pairs(x, y)
        if x.shape[1] != y.shape[1]:
            raise ValueError(
                f"aligner 'none' scores an already-aligned pair as it is: image features are "
                f"{x.shape[1]} wide, text features {y.shape[1]}; pair the two towers of one "
                "model (e.g. open_clip_vision and open_clip_text)"
            )
        self.arrays = {"dim": np.asarray(x.shape[1])}
        return FitReport(chosen_epoch=None, extra={"n_train": len(x)})

    def _embed(self, a: np.ndarray, name: str) -> np.ndarray:
        a = check_features(name, a, int(self.fitted()["dim"]))
        return l2_normalise(a).astype(np.float32)

    def embed_image(self, x: np.ndarray) -> np.ndarray:
        return self._embed(x, "image features")

    def embed_text(self, y: np.ndarray) -> np.ndarray:
        return self._embed(y, "text features")
