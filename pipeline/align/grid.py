"""The data-size x seed grid of one method on one (encoder pair, layer choice).

For each seed and each n_pairs the run fits on the nested subset
``pipeline.pairs.nested_subset(len(x), n_pairs, seed)`` and saves into
``out_dir / f"n{n_pairs}_s{seed}"`` (n_pairs ``None`` means all pairs and is named by that
count). A run is skipped when its ``done.json`` carries the same fingerprint: a hash of the
method, its resolved params, the meta, n_pairs, seed and the feature arrays themselves, so a
killed job resumes and a run is never reused for other data or settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from pipeline.align.artifacts import read_done, save_run
from pipeline.align.base import build_aligner
from pipeline.pairs import grid_sizes, nested_subset


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


def arrays_digest(*arrays: np.ndarray | None) -> str:
    """SHA-256 over the shapes, dtypes and bytes of some arrays (None included as such)."""
    digest = hashlib.sha256()
    for a in arrays:
        if a is None:
            digest.update(b"none")
            continue
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(memoryview(a).cast("B"))
    return digest.hexdigest()


def run_fingerprint(
    method: str, resolved: dict[str, Any], meta: dict[str, Any], n_pairs: int, seed: int, data: str
) -> str:
    """Hash of everything that determines a run's artifacts."""
    record = {
        "method": method,
        "params": resolved,
        "meta": meta,
        "n_pairs": n_pairs,
        "seed": seed,
        "data": data,
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def fit_grid(
    method: str,
    params: dict[str, Any],
    x: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray | None,
    y_val: np.ndarray | None,
    sizes: list[int | None],
    seeds: list[int],
    out_dir: Path,
    meta: dict[str, Any],
    *,
    threads: int | None = None,
    progress: bool = True,
) -> list[Path]:
    """Fit ``method`` on every (n_pairs, seed) and save each run; returns the run directories."""
    if len(x) != len(y):
        raise ValueError(f"grid pairs: {len(x)} image rows but {len(y)} text rows")
    resolved = build_aligner(method, params).hyperparameters()
    resolved.pop("fitted")
    data = arrays_digest(x, y, x_val, y_val)
    runs = [(n, seed) for seed in seeds for n in grid_sizes(sizes, len(x))]
    out_dir = Path(out_dir)
    paths = []
    with compute_threads(threads), tqdm(runs, desc=f"align {method}", disable=not progress) as bar:
        for n_pairs, seed in bar:
            bar.set_postfix(n_pairs=n_pairs, seed=seed)
            run_dir = out_dir / f"n{n_pairs}_s{seed}"
            fingerprint = run_fingerprint(method, resolved, meta, n_pairs, seed, data)
            done = read_done(run_dir)
            if done is None or done.get("fingerprint") != fingerprint:
                rows = nested_subset(len(x), n_pairs, seed)
                aligner = build_aligner(method, params)
                start = time.perf_counter()
                report = aligner.fit(x[rows], y[rows], x_val, y_val, seed)
                report.extra["fit_seconds"] = time.perf_counter() - start
                run_meta = {**meta, "n_pairs": n_pairs, "seed": seed}
                save_run(run_dir, aligner, report, run_meta, fingerprint=fingerprint)
            paths.append(run_dir)
    return paths
