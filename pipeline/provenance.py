"""Which spec made each job's outputs, kept under ``results/`` rather than in Snakemake's
``.snakemake/`` records (docs/architecture.md, "Rerun semantics").

Two small files per job, both under ``results/specs/<rule>/<wildcards>``:

- the spec record (``layout.spec_record``): the job's spec as the config asks for it now,
  written when the workflow is read. It is an input of the job;
- the made record (``layout.made_record``): the hash of the spec the job's outputs were made
  with, written by ``pipeline.cli`` after the stage returned.

When the two agree the spec record's mtime is set to the epoch, so it never makes the job
look out of date; when they disagree (or the job never finished) it is set to now, so
Snakemake reruns the job by modification time alone, with or without ``.snakemake/``. A dry
run of another config therefore leaves nothing behind that a later run would mistake for a
change.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pipeline import atomic, layout
from pipeline.fingerprint import spec_hash

EPOCH = 0.0


def spec_text(spec: dict[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True, indent=1) + "\n"


def made_with(record: Path) -> str | None:
    """The spec hash a job's outputs were made with (None: never finished, or unreadable)."""
    try:
        return json.loads(Path(layout.made_record(str(record))).read_text())["spec_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def request(record: Path, spec: dict[str, Any]) -> bool:
    """Write the spec record of a job asking for ``spec`` (when its text changed) and date it:
    the epoch when the job's outputs were made with this very spec, now otherwise. Returns
    whether the outputs are stale (made with another spec, or never finished)."""
    text = spec_text(spec)
    if not record.is_file() or record.read_text() != text:
        atomic.write_text(record, text)
    stale = made_with(record) != spec_hash(spec)
    dated = record.stat().st_mtime
    if stale and dated == EPOCH:
        stamp = time.time()
        os.utime(record, (stamp, stamp))
    elif not stale and dated != EPOCH:  # already the epoch: no write on every parse
        os.utime(record, (EPOCH, EPOCH))
    return stale


def record_made(record: Path, spec: dict[str, Any]) -> None:
    """After a job finished: its outputs were made with ``spec``."""
    atomic.write_json(Path(layout.made_record(str(record))), {"spec_hash": spec_hash(spec)})
