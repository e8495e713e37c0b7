"""The ``extract_features`` stage (``pipeline.jobs.extract_features``)."""

from pipeline.extract import run_extract as run

__all__ = ["run"]
