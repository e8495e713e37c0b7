"""The publish stage: the aggregate's staged tables and plots copied to where the report and the
user read them (``results/tables``, ``results/plots``), each atomically.

A separate job because Snakemake deletes a job's declared outputs before it runs it and again
when it fails: the aggregate's are staged copies (``layout.staged``), so only a successful
aggregate replaces what was published.
"""

from __future__ import annotations

from pipeline.atomic import copy
from pipeline.jobs import Job


def run(job: Job) -> None:
    for name, target in job.outputs.items():
        copy(job.input(name), str(target))
