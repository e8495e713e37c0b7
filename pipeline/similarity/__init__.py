"""Cross-modal similarity of every layer pair, and the layer choice it drives.

The math lives in ``metrics`` (one pair) and ``matrix`` (all pairs), the permutation null
and bootstrap in ``calibration``, feature preprocessing in ``preprocess``, reading the stores
and building the table in ``compute``, the scoring sample and the ``layers.json`` format in
``selection``, the figures in ``plots``; the stage is ``pipeline.stages.compare_layers``.
"""

from pipeline.similarity.compute import METRICS, StoreRows, compute_similarity, similarity_table
from pipeline.similarity.selection import (
    chosen_layers,
    read_layer_choice,
    scoring_pairs,
    select_layers,
    write_layer_choice,
)

__all__ = [
    "METRICS",
    "StoreRows",
    "chosen_layers",
    "compute_similarity",
    "read_layer_choice",
    "scoring_pairs",
    "select_layers",
    "similarity_table",
    "write_layer_choice",
]
