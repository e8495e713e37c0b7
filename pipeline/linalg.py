"""Small array helpers shared by the stages."""

from __future__ import annotations

from typing import Literal

import numpy as np


def l2_normalise(a: np.ndarray, zero_rows: Literal["keep", "error"] = "keep") -> np.ndarray:
    """Rows scaled to unit L2 norm, in ``a``'s float dtype (float64 for other dtypes).

    An all-zero row has no direction: it stays zero (``zero_rows="keep"``) or is a
    ValueError naming the rows (``"error"``, where a zero row means broken input).
    """
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    if zero_rows == "error" and zero.any():
        raise ValueError(f"cannot L2-normalise zero rows {np.flatnonzero(zero)[:5].tolist()}")
    return a / np.where(zero[:, None], 1.0, norms)
