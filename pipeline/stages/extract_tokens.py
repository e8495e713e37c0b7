"""The ``extract_tokens`` stage (``pipeline.jobs.extract_tokens``)."""

from pipeline.extract_tokens import run_extract_tokens as run

__all__ = ["run"]
