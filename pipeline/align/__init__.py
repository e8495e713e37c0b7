"""Aligners: maps of frozen image and text features into a shared space (docs/methods.md).

``kinds.KINDS`` is the table of aligner kinds; ``kinds.build_aligner(kind, params)`` makes one
from its config section (``kinds.aligner_params`` only checks the section, without importing
torch), ``grid.fit_runs`` fits the (n_pairs x seed) runs of one method, and
``artifacts.save_run`` / ``artifacts.load_aligner`` handle its artifacts. Kinds: ``linear``,
``mlp`` (trained heads, optional STRUCTURE regulariser), ``csa``, ``asif``, ``procrustes``,
``ridge``, and ``pal`` (token-level anchors, fitted on token caches).
"""
