"""Aligner artifacts of one run (docs/formats.md): never pickles.

A run directory holds
- ``weights.safetensors``: ``aligner.state()``;
- ``params.json``: aligner kind, hyperparameters (resolved params + fitted choices), chosen epoch,
  the STRUCTURE divergence used (null without it), the fit's extra facts, the caller's meta
  (n_pairs, seed, layers...), library versions;
- ``curve.parquet``: the training curve (no rows for closed-form methods);
- ``done.json``: the completion marker, written last, with the run's fingerprint.
Every file is written atomically; a rewrite first removes the marker.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from pipeline.align.base import Aligner, FitReport
from pipeline.align.kinds import build_aligner
from pipeline.atomic import write_bytes, write_json, write_parquet
from pipeline.versions import library_versions

WEIGHTS, PARAMS, CURVE, DONE = "weights.safetensors", "params.json", "curve.parquet", "done.json"


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
    write_json(run_dir / DONE, {"aligner": aligner.kind, "fingerprint": fingerprint})
    return run_dir


def read_done(run_dir: Path) -> dict[str, Any] | None:
    """The completion marker of a run, or None when the run is absent or incomplete."""
    path = Path(run_dir) / DONE
    return json.loads(path.read_text()) if path.is_file() else None


def read_params(run_dir: Path) -> dict[str, Any]:
    """``params.json`` of a completed run."""
    run_dir = Path(run_dir)
    if read_done(run_dir) is None:
        raise FileNotFoundError(f"aligner run {run_dir} is incomplete: no {DONE}")
    return json.loads((run_dir / PARAMS).read_text())


def load_aligner(run_dir: Path) -> Aligner:
    """Rebuild the fitted aligner saved in ``run_dir``; it embeds exactly as when saved."""
    params = read_params(run_dir)
    hyperparameters = dict(params["hyperparameters"])
    choices = hyperparameters.pop("fitted", {})
    aligner = build_aligner(params["aligner"], hyperparameters)
    aligner.load_state(load_safetensors((Path(run_dir) / WEIGHTS).read_bytes()))
    aligner.choices = choices
    return aligner
