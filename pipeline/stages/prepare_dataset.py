"""The ``prepare_dataset`` stage (``pipeline.jobs.prepare_dataset``): one dataset's manifest,
captions, tasks and prompts (and the synthetic world's images)."""

from __future__ import annotations

from pathlib import Path

from pipeline import layout
from pipeline.data import prepare_dataset
from pipeline.jobs import Job


def run(job: Job) -> None:
    out_dir = Path(layout.dataset_of_manifest(job.output("manifest")))
    prepare_dataset(job.spec["name"], job.spec["dataset"], out_dir)
