"""Fitting the runs of the data-size x seed grid that share one pair of feature arrays.

Each run (``pipeline.pairs.GridRun``) fits on its nested subset of the training pairs and
saves into ``out_dir / run.name``. A run is skipped when its ``done.json`` carries the same
fingerprint: a hash of the aligner kind, its resolved params, the meta, the run and the
feature arrays themselves, so a killed job resumes and a run is never reused for other data
or settings.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from pipeline.align.artifacts import read_done, save_run
from pipeline.align.base import aligner_params, build_aligner, params_to_dict
from pipeline.fingerprint import arrays_digest, spec_hash
from pipeline.pairs import GridRun


def available_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def compute_threads(threads: int | None) -> Iterator[int]:
    """Run the block with ``threads`` torch intra-op and BLAS threads (default: the available
    cores); a job given fewer cores than the machine has then does not oversubscribe them."""
    previous = torch.get_num_threads()
    threads = threads or available_cores()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield threads
    finally:
        torch.set_num_threads(previous)


def run_fingerprint(
    kind: str, resolved: dict[str, Any], meta: dict[str, Any], run: GridRun, data: str
) -> str:
    """Hash of everything that determines a run's artifacts (``data``: the features' digest)."""
    return spec_hash(
        {"aligner": kind, "params": resolved, "meta": meta, "run": run.name, "data": data}
    )


def fit_runs(
    kind: str,
    params: dict[str, Any],
    features: tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None],
    runs: list[GridRun],
    out_dir: Path,
    meta: dict[str, Any],
    *,
    threads: int | None = None,
    progress: Callable[[], None] | None = None,
    fresh: bool = False,
) -> list[Path]:
    """Fit and save each run on its nested subset of the training pairs in ``features``
    (x, y, x_val, y_val); a run whose ``done.json`` has the same fingerprint is kept unless
    ``fresh`` (a forced job refits every run). Returns the run directories."""
    x, y, x_val, y_val = features
    if len(x) != len(y):
        raise ValueError(f"grid pairs: {len(x)} image rows but {len(y)} text rows")
    resolved = params_to_dict(aligner_params(kind, params))
    data = arrays_digest(*features)  # once for all the runs on these features
    paths = []
    with compute_threads(threads):
        for run in runs:
            run_dir = Path(out_dir) / run.name
            fingerprint = run_fingerprint(kind, resolved, meta, run, data)
            done = read_done(run_dir)
            if fresh or done is None or done.get("fingerprint") != fingerprint:
                rows = run.rows(len(x))
                aligner = build_aligner(kind, params)
                start = time.perf_counter()
                report = aligner.fit(x[rows], y[rows], x_val, y_val, run.seed)
                report.extra["fit_seconds"] = time.perf_counter() - start
                run_meta = {**meta, "n_pairs": run.n_pairs, "seed": run.seed}
                save_run(run_dir, aligner, report, run_meta, fingerprint=fingerprint)
            paths.append(run_dir)
            if progress is not None:
                progress()
    return paths
