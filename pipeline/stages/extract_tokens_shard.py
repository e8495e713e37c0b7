"""The ``extract_tokens_shard`` stage (``pipeline.jobs.extract_tokens_shard``)."""

from pipeline.extract_tokens import run_extract_tokens_shard as run

__all__ = ["run"]
