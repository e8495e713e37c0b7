"""Evaluation: zero-shot classification, retrieval, segmentation and the metrics tables.

The figures live in ``pipeline.evaluate.plots``, imported on demand (matplotlib and scipy are
slow to import and the evaluation stage does not need them).
"""

from pipeline.evaluate.retrieval import SharedSpace, retrieval_metrics, retrieval_scores
from pipeline.evaluate.tables import (
    METRICS_SCHEMA,
    SUMMARY_SCHEMA,
    RunKey,
    concat_metrics,
    metric_rows,
    read_metrics,
    read_summary,
    summarise,
    write_metrics,
    write_summary,
)
from pipeline.evaluate.zeroshot import (
    class_embeddings,
    classification_metrics,
    zero_shot_classification,
    zero_shot_logits,
)

__all__ = [
    "METRICS_SCHEMA",
    "SUMMARY_SCHEMA",
    "RunKey",
    "SharedSpace",
    "class_embeddings",
    "classification_metrics",
    "concat_metrics",
    "metric_rows",
    "read_metrics",
    "read_summary",
    "retrieval_metrics",
    "retrieval_scores",
    "summarise",
    "write_metrics",
    "write_summary",
    "zero_shot_classification",
    "zero_shot_logits",
]
