"""Fitting the runs of the data-size x seed grid that share one pair of features.

Each run (``pipeline.pairs.GridRun``) fits on its nested subset of the training pairs and
saves into ``out_dir / run.name``. A run is skipped when its ``done.json`` carries the same
fingerprint: a hash of the aligner kind, its resolved params, the meta, the run and the
features themselves, so a killed job resumes and a run is never reused for other data or
settings. Features are pooled arrays (``ArrayPairs``: their digest is their bytes) or token
caches (``TokenPairs``: the stores' fingerprints, which key their content, and the pairs'
rows), read batch by batch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from pipeline.align.artifacts import damaged_files, read_done, save_run
from pipeline.align.kinds import aligner_params, build_aligner
from pipeline.align.params import params_to_dict
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


@dataclass(frozen=True)
class ArrayPairs:
    """Pooled features of the training pairs (x, y) and of the validation pairs (or None)."""

    x: np.ndarray
    y: np.ndarray
    x_val: np.ndarray | None
    y_val: np.ndarray | None

    def __len__(self) -> int:
        if len(self.x) != len(self.y):
            raise ValueError(f"grid pairs: {len(self.x)} image rows but {len(self.y)} text rows")
        return len(self.x)

    def digest(self) -> str:
        return arrays_digest(self.x, self.y, self.x_val, self.y_val)

    def training(self, rows: np.ndarray) -> tuple[Any, Any]:
        return self.x[rows], self.y[rows]

    def validation(self) -> tuple[Any, Any]:
        return self.x_val, self.y_val


@dataclass(frozen=True)
class TokenPairs:
    """Token sources (``pipeline.stores.tokens.StoreTokens``) of the training and validation pairs:
    pair i is image row ``image.rows[i]`` with caption row ``text.rows[i]``."""

    image: Any
    text: Any
    image_val: Any
    text_val: Any

    def __len__(self) -> int:
        if len(self.image) != len(self.text):
            raise ValueError(f"grid pairs: {len(self.image)} image rows but {len(self.text)} text")
        return len(self.image)

    def digest(self) -> str:
        parts = [
            (source.store.fingerprint, arrays_digest(source.rows))
            for source in (self.image, self.text, self.image_val, self.text_val)
        ]
        return spec_hash(parts)

    def training(self, rows: np.ndarray) -> tuple[Any, Any]:
        return self.image.subset(rows), self.text.subset(rows)

    def validation(self) -> tuple[Any, Any]:
        return self.image_val, self.text_val


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
    features: ArrayPairs | TokenPairs | tuple[np.ndarray, ...],
    runs: list[GridRun],
    out_dir: Path,
    meta: dict[str, Any],
    *,
    threads: int | None = None,
    progress: Callable[[], None] | None = None,
    fresh: bool = False,
) -> list[Path]:
    """Fit and save each run on its nested subset of the training pairs in ``features``
    (``ArrayPairs``, ``TokenPairs``, or the tuple x, y, x_val, y_val); a run whose
    ``done.json`` has the same fingerprint and whose files match it is kept unless ``fresh`` (a
    forced job refits every run). Returns the run directories."""
    if isinstance(features, tuple):
        features = ArrayPairs(*features)
    n_pairs = len(features)
    resolved = params_to_dict(aligner_params(kind, params))
    data = features.digest()  # once for all the runs on these features
    paths = []
    with compute_threads(threads):
        for run in runs:
            run_dir = Path(out_dir) / run.name
            fingerprint = run_fingerprint(kind, resolved, meta, run, data)
            done = read_done(run_dir)
            kept = done is not None and done.get("fingerprint") == fingerprint
            if fresh or not kept or damaged_files(run_dir, done):
                rows = run.rows(n_pairs)
                aligner = build_aligner(kind, params)
                start = time.perf_counter()
                report = aligner.fit(*features.training(rows), *features.validation(), run.seed)
                report.extra["fit_seconds"] = time.perf_counter() - start
                run_meta = {**meta, "n_pairs": run.n_pairs, "seed": run.seed}
                save_run(run_dir, aligner, report, run_meta, fingerprint=fingerprint)
            paths.append(run_dir)
            if progress is not None:
                progress()
    return paths
