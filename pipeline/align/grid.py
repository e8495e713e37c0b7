"""Fitting the runs of the data-size x seed grid that share one pair of features.

Each run (``pipeline.pairs.GridRun``) fits on its nested subset of the training pairs and
saves into ``out_dir / run.name``. A run is skipped when its ``done.json`` carries the same
fingerprint: a hash of the aligner kind, its resolved params, the meta, the run and the
features themselves, so a killed job resumes and a run is never reused for other data or
settings. Features are pooled arrays (``ArrayPairs``: their digest is their bytes) or token
caches (``TokenPairs``: the stores' fingerprints, which key their content, and the pairs'
rows), read batch by batch.

Identical runs once (docs/architecture.md): a run's *key* (``run_key``) is its fingerprint
without the meta that only labels its cell (method name, layer choice, its score), plus the
code version. With a run store (``pipeline.reuse.KeyedFolders``) every fit is filed there
under its key, and a run of another cell with the same key (``best`` choosing the ``last``
layers, two method entries alike) copies that fit instead of fitting, recording which run it
reused (``fit.reused_from`` in its ``params.json``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from threadpoolctl import threadpool_limits

from pipeline.align.artifacts import (
    CURVE,
    damaged_files,
    load_aligner,
    read_done,
    read_params,
    save_run,
)
from pipeline.align.base import FitReport
from pipeline.align.kinds import aligner_params, build_aligner
from pipeline.align.params import params_to_dict
from pipeline.atomic import write_json
from pipeline.fingerprint import arrays_digest, spec_hash
from pipeline.pairs import GridRun
from pipeline.reuse import KeyedFolders, link_files
from pipeline.versions import code_version

log = logging.getLogger(__name__)
CELL_META = (
    "vision_encoder",
    "text_encoder",
    "method",
    "layer_choice",
    "layer_score",
    "selection_metric",
)
"""Meta entries that label a run's cell (its stores' fingerprints and layers say what it is
fitted on): left out of the run's key."""
ENTRY = "entry.json"  # in a run store's folder: {"key", "run": the run folder it was filed from}


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


def run_key(
    kind: str, resolved: dict[str, Any], meta: dict[str, Any], run: GridRun, data: str
) -> str:
    """The content key of a run: ``run_fingerprint`` without the ``CELL_META`` labels, with
    the code version (``versions.code_version``). Two runs with one key are the same fit."""
    inputs = {key: value for key, value in meta.items() if key not in CELL_META}
    return spec_hash(
        {
            "aligner": kind,
            "params": resolved,
            "inputs": inputs,
            "run": run.name,
            "data": data,
            "code": code_version(),
        }
    )


def run_label(kind: str, run: GridRun, meta: dict[str, Any]) -> str:
    """``method run n.._s.. (vision encoder layer i, text encoder layer j)``, from what ``meta``
    holds of it."""
    sides = [
        f"{meta[f'{side}_encoder']} layer {meta[f'{side}_layer']}"
        for side in ("vision", "text")
        if f"{side}_encoder" in meta and f"{side}_layer" in meta
    ]
    where = f" ({', '.join(sides)})" if sides else ""
    return f"{meta.get('method', kind)} run {run.name}{where}"


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
    store: KeyedFolders | None = None,
) -> list[Path]:
    """Fit and save each run on its nested subset of the training pairs in ``features``
    (``ArrayPairs``, ``TokenPairs``, or the tuple x, y, x_val, y_val); a run whose
    ``done.json`` has the same fingerprint and whose files match it is kept unless ``fresh`` (a
    forced job refits every run). With a run ``store``, each other run copies the store's fit
    of its key when another run folder filed it (``reuse_run``), under the key's lock; each fit
    is filed. Returns the run directories."""
    if isinstance(features, tuple):
        features = ArrayPairs(*features)
    resolved = params_to_dict(aligner_params(kind, params))
    data = features.digest()  # once for all the runs on these features
    paths = []
    with compute_threads(threads):
        for run in runs:
            run_dir = Path(out_dir) / run.name
            fingerprint = run_fingerprint(kind, resolved, meta, run, data)
            key = run_key(kind, resolved, meta, run, data)
            run_meta = {**meta, "n_pairs": run.n_pairs, "seed": run.seed}
            done = read_done(run_dir)
            kept = done is not None and done.get("fingerprint") == fingerprint
            kept = kept and not damaged_files(run_dir, done)  # a damaged run is refitted
            saved = (run_dir, run_meta, fingerprint, key)
            if kept and not fresh:  # resumed after a kill: file it if the kill came first
                if store is not None:
                    with store.claim(key) as entry:
                        if entry is None:
                            file_run(store, key, run_dir)
            elif store is None:
                fit_run(kind, params, features, run, *saved)
            else:
                with store.claim(key) as entry:
                    # a forced job refits what it holds; its own filed fit is not another's
                    others = (
                        entry is not None and not kept and filed_from(entry) != run_dir.resolve()
                    )
                    if not (others and reuse_run(entry, *saved)):
                        fit_run(kind, params, features, run, *saved)
                        file_run(store, key, run_dir)
            paths.append(run_dir)
            if progress is not None:
                progress()
    return paths


def fit_run(
    kind: str,
    params: dict[str, Any],
    features: ArrayPairs | TokenPairs,
    run: GridRun,
    run_dir: Path,
    meta: dict[str, Any],
    fingerprint: str,
    key: str,
) -> None:
    """Fit one run on its nested subset and save it (``fit.reused_from``: null, fitted here)."""
    aligner = build_aligner(kind, params)
    start = time.perf_counter()
    training = features.training(run.rows(len(features)))
    try:
        report = aligner.fit(*training, *features.validation(), run.seed)
    except ValueError as err:  # bad data for this kind: say which run and layers
        raise ValueError(f"{run_label(kind, run, meta)}: {err}") from err
    elapsed = time.perf_counter() - start
    report.extra |= {"fit_seconds": elapsed, "run_key": key, "reused_from": None}
    save_run(run_dir, aligner, report, meta, fingerprint=fingerprint)


def file_run(store: KeyedFolders, key: str, run_dir: Path) -> None:
    """File the run in ``run_dir`` as the store's fit of ``key`` (hard links: no bytes copied)."""

    def fill(folder: Path) -> None:
        link_files(run_dir, folder)
        write_json(folder / ENTRY, {"key": key, "run": str(run_dir)})

    store.put(key, fill)


def filed_from(entry: Path) -> Path | None:
    """The run folder a store entry was filed from, resolved (None: unreadable)."""
    try:
        return Path(json.loads((entry / ENTRY).read_text())["run"]).resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return None


def reuse_run(entry: Path, run_dir: Path, meta: dict[str, Any], fingerprint: str, key: str) -> bool:
    """Save the store entry's fit of ``key`` as the run in ``run_dir`` with this run's own
    ``meta`` and fingerprint, ``fit.reused_from`` naming the run that was fitted; False (and
    nothing written) when the entry cannot be read back, whatever the reason."""
    try:
        params = read_params(entry)
        if params["fit"].get("run_key") != key:
            raise ValueError(f"the entry holds the fit of key {params['fit'].get('run_key')}")
        aligner = load_aligner(entry)
        curve = pl.read_parquet(entry / CURVE)
        origin = json.loads((entry / ENTRY).read_text())["run"]
    except Exception as error:  # a damaged or replaced entry is only a cache miss
        log.warning("%s: the run store's %s is unusable (%s); fitting", run_dir, entry, error)
        return False
    fitted = params["fit"].get("reused_from") or origin
    report = FitReport(params["chosen_epoch"], curve, {**params["fit"], "reused_from": fitted})
    save_run(run_dir, aligner, report, meta, fingerprint=fingerprint)
    log.info("%s: reused the fit of %s (key %s)", run_dir, fitted, key[:12])
    return True
