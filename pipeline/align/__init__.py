"""Aligners: maps of frozen image and text features into a shared space (DESIGN.md section 7).

``build_aligner(method, params)`` makes one from its config section, ``fit_grid`` runs the
data-size x seed grid of one method, ``save_run`` / ``load_aligner`` handle its artifacts.
Methods: ``linear``, ``mlp`` (trained heads, optional STRUCTURE regulariser), ``csa``, ``asif``,
``procrustes``, ``ridge``.
"""

from pipeline.align import asif, csa, heads, linear_maps  # noqa: F401  (register the methods)
from pipeline.align.artifacts import load_aligner, save_run
from pipeline.align.base import ALIGNERS, Aligner, FitReport, build_aligner
from pipeline.align.grid import fit_grid

__all__ = [
    "ALIGNERS",
    "Aligner",
    "FitReport",
    "build_aligner",
    "fit_grid",
    "load_aligner",
    "save_run",
]
