"""The ``extract_features_shard`` stage (``pipeline.jobs.extract_features_shard``): one run of
a feature store's blocks (``pipeline.extraction.run_shard``)."""

from pipeline.extraction import Features, run_shard
from pipeline.jobs import Job


def run(job: Job) -> None:
    run_shard(job, Features())
