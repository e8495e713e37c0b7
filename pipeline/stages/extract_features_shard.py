"""The ``extract_features_shard`` stage (``pipeline.jobs.extract_features_shard``)."""

from pipeline.extract import run_extract_shard as run

__all__ = ["run"]
