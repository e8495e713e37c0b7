"""Aligners: maps of frozen image and text features into a shared space (docs/methods.md).

``build_aligner(kind, params)`` makes one from its config section (``aligner_params`` only
checks the section, without importing torch), ``pipeline.align.grid.fit_runs`` fits the
(n_pairs x seed) runs of one method, ``save_run`` / ``load_aligner`` handle its artifacts.
Kinds: ``linear``, ``mlp`` (trained heads, optional STRUCTURE regulariser), ``csa``, ``asif``,
``procrustes``, ``ridge``, and ``pal`` (token-level anchors, fitted on token caches).
"""

from pipeline.align.artifacts import load_aligner, save_run
from pipeline.align.base import ALIGNERS, Aligner, FitReport, aligner_params, build_aligner

__all__ = [
    "ALIGNERS",
    "Aligner",
    "FitReport",
    "aligner_params",
    "build_aligner",
    "load_aligner",
    "save_run",
]
