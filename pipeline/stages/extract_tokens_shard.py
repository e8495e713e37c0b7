"""The ``extract_tokens_shard`` stage (``pipeline.jobs.extract_tokens_shard``): one run of the
blocks of every chosen layer's token store (``pipeline.extraction.run_shard``)."""

from pipeline.extraction import Tokens, job_layers, run_shard
from pipeline.jobs import Job


def run(job: Job) -> None:
    run_shard(job, Tokens(job.spec["tokens"]), job_layers(job))
