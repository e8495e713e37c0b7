"""The ``pretrain_encoder`` stage (``pipeline.jobs.pretrain_encoder``): a timm encoder trained
self-supervised on unpaired synthetic images (docs/pretrain.md)."""

from __future__ import annotations

from pathlib import Path

from pipeline.jobs import Job
from pipeline.pretrain.simclr import run_pretrain


def run(job: Job) -> None:
    spec = job.spec
    run_pretrain(
        spec["encoder_name"],
        spec["encoder"],
        spec["dataset"],
        Path(job.output("weights")),
        Path(job.output("record")),
        threads=job.threads or 1,
    )
