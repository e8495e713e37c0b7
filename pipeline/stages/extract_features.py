"""The ``extract_features`` stage (``pipeline.jobs.extract_features``): the feature store of one
(dataset, split, encoder), or with ``runtime.extract_shards`` > 1 only its completion, after
the shard jobs (``pipeline.extraction``)."""

from pipeline.extraction import Features, Source, extract, finish
from pipeline.jobs import Job


def run(job: Job) -> None:
    kind = Features()
    target = kind.target(job.output("marker"))
    if "shards" in job.inputs:
        finish(kind, target, job.input_list("shards"))
    else:
        extract(kind, Source.of_job(job), target)
