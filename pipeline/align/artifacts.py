"""Aligner artifacts of one run (docs/formats.md): never pickles.

A run directory holds
- ``weights.safetensors``: ``aligner.state()``;
- ``params.json``: aligner kind, hyperparameters (resolved params + fitted choices), chosen epoch,
  the STRUCTURE divergence used (null without it), the fit's extra facts, the caller's meta
  (n_pairs, seed, layers...), library versions;
- ``curve.parquet``: the training curve (no rows for closed-form methods);
- ``done.json``: the completion marker, written last, with the run's fingerprint and the SHA-256
  of every other file (``files``): a run whose files no longer match is refused by every reader
  (``checked_done``), naming the file and the command that refits it.
Every file is written atomically; a rewrite first removes the marker.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from pipeline import layout
from pipeline.align.base import Aligner, FitReport
from pipeline.align.kinds import build_aligner
from pipeline.atomic import write_bytes, write_json, write_parquet
from pipeline.versions import library_versions

WEIGHTS, PARAMS, CURVE, DONE = "weights.safetensors", "params.json", "curve.parquet", "done.json"
FILES = (WEIGHTS, PARAMS, CURVE)  # every file of a run but its record, each checksummed there


class RunIntegrityError(ValueError):
    """A completed run whose files are not the ones its ``done.json`` records."""


def save_run(
    run_dir: Path,
    aligner: Aligner,
    report: FitReport,
    meta: dict[str, Any],
    fingerprint: str | None = None,
) -> Path:
    """Write a fitted aligner's artifacts into ``run_dir``, the ``done.json`` marker last."""
    run_dir = Path(run_dir)
    (run_dir / DONE).unlink(missing_ok=True)
    state = {key: np.ascontiguousarray(value) for key, value in aligner.state().items()}
    write_bytes(run_dir / WEIGHTS, save_safetensors(state, metadata={"aligner": aligner.kind}))
    hyperparameters = aligner.hyperparameters()
    structure = hyperparameters.get("structure")
    write_json(
        run_dir / PARAMS,
        {
            "aligner": aligner.kind,
            "hyperparameters": hyperparameters,
            "chosen_epoch": report.chosen_epoch,
            "divergence": structure["divergence"] if structure else None,
            "fit": report.extra,
            "meta": meta,
            "versions": library_versions(),
        },
    )
    write_parquet(report.curve, run_dir / CURVE)
    files = {name: _sha256(run_dir / name) for name in FILES}
    done = {"aligner": aligner.kind, "fingerprint": fingerprint, "files": files}
    write_json(run_dir / DONE, done)
    return run_dir


def read_done(run_dir: Path) -> dict[str, Any] | None:
    """The completion marker of a run, or None when the run is absent or incomplete."""
    path = Path(run_dir) / DONE
    return json.loads(path.read_text()) if path.is_file() else None


def damaged_files(run_dir: Path, done: dict[str, Any]) -> list[str]:
    """What is wrong with the files of a run against its record ``done``: one line per file
    missing or changed since it was written (none: the run is whole)."""
    files = done.get("files") if isinstance(done, dict) else None
    if not isinstance(files, dict) or set(files) != set(FILES):
        return [f"{DONE} of run {run_dir} records no checksums of {', '.join(FILES)}"]
    found = []
    for name in FILES:
        path = Path(run_dir) / name
        if not path.is_file():
            found.append(f"{name} of run {run_dir} is missing")
        elif _sha256(path) != files[name]:
            found.append(f"{name} of run {run_dir} does not match its record in {DONE}")
    return found


def checked_done(run_dir: Path) -> dict[str, Any]:
    """The completion marker of a run whose every file matches it; an error names the run, the
    file and the repair (refit the run's align job) otherwise."""
    run_dir = Path(run_dir)
    done = read_done(run_dir)
    if done is None:
        raise FileNotFoundError(f"aligner run {run_dir} is incomplete: no {DONE}")
    if damaged := damaged_files(run_dir, done):
        raise RunIntegrityError(
            f"{'; '.join(damaged)} (edited or damaged since it was fitted): refit it and rerun "
            f"what reads it with snakemake --forcerun {run_dir.parent / layout.RUNS_JSON} (and "
            "the --configfile the results were made with; python -m pipeline verify prints it)"
        )
    return done


def read_params(run_dir: Path) -> dict[str, Any]:
    """``params.json`` of a completed run, checked against its record."""
    checked_done(run_dir)
    return json.loads((Path(run_dir) / PARAMS).read_text())


def load_aligner(run_dir: Path) -> Aligner:
    """Rebuild the fitted aligner saved in ``run_dir`` (its files checked against the record);
    it embeds exactly as when saved."""
    params = read_params(run_dir)
    hyperparameters = dict(params["hyperparameters"])
    choices = hyperparameters.pop("fitted", {})
    aligner = build_aligner(params["aligner"], hyperparameters)
    aligner.load_state(load_safetensors((Path(run_dir) / WEIGHTS).read_bytes()))
    aligner.choices = choices
    return aligner


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
