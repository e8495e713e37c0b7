"""Check what ``results/`` holds: every feature store, token store and aligner run, read in full.

``verify_results(results_dir, configfiles)`` returns one ``Problem`` per thing found wrong, each
with what is wrong, where, and a shell command (run from the workflow root, with the same
``--configfile``) that repairs it;
``print_report`` prints them and returns the exit code. Feature stores and token stores are
checked alike (``check_store``), each by its layout's own reader (``integrity_problems``):
marker present and agreeing with the store, attributes, block flags, sample ids, and every
chunk present, matching its checksum and finite. Aligner runs: ``done.json`` present with a
fingerprint and the SHA-256 of every file of the run, each file matching it, ``params.json``
consistent with it and with the run's folder name, the weights
loadable into the aligner, the curve readable, and the features it was fitted on still the
ones in ``results/features``. The run store's fits (``results/by_key/runs``, ``pipeline.reuse``)
are checked as runs, and as filed under their key; the evaluation store's tables are read
back; a damaged entry's repair removes it (the next job that needs it does its work again).
Spec records (``pipeline.provenance``): a job whose outputs were
made with another spec than its rule last asked for is stale. Encoder weights
(``pipeline.encoders.weights``): every file under ``results/pretrained`` must have the SHA-256
its record holds, and a store extracted from local weights that have changed since is stale.
Tables (``check_tables``):
every parquet file under ``results/tables`` read in full, and validated against its schema
where it is one of the aggregate's (``TABLE_SCHEMAS``); ``verify_tables`` checks only them
(the ``report`` rule and the Makefile do, before the HTML report embeds them). The
aggregate's inputs: every evaluation table read against its schema, and the staged outputs of
the last aggregate present (a failed one leaves the tables it published before).
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import layout, provenance
from pipeline.align import artifacts, grid
from pipeline.encoders.weights import WeightsIntegrityError, check_weights, pretrained_here
from pipeline.evaluate import tables
from pipeline.evaluate.tables import METRICS_SCHEMA, OUTCOMES_SCHEMA, read_table
from pipeline.fingerprint import spec_hash
from pipeline.pairs import is_run_name, run_name
from pipeline.reuse import KeyedFolders
from pipeline.stores.core import (
    StoreIntegrityError,
    StoreReader,
    marked_fingerprint,
    marker_path,
    weights_changed,
)
from pipeline.stores.features import FeatureStore
from pipeline.stores.tokens import TokenStore

SNAKEMAKE = "snakemake --cores all --workflow-profile workflow/profiles/default"
TABLE_SCHEMAS: dict[str, pa.Schema] = {  # the aggregate's tables, by file name
    Path(layout.METRICS_TABLE).name: tables.METRICS_SCHEMA,
    Path(layout.SUMMARY_TABLE).name: tables.SUMMARY_SCHEMA,
    Path(layout.COMPARISONS_TABLE).name: tables.COMPARISONS_SCHEMA,
    Path(layout.SWEEP_TABLE).name: tables.SWEEP_SCHEMA,
    Path(layout.SWEEP_RHO_TABLE).name: tables.SWEEP_RHO_SCHEMA,
}
# An evaluate job's tables by suffix: outcomes, examples (read, no table schema), metrics.
EVALUATION_SCHEMAS = {".outcomes": OUTCOMES_SCHEMA, ".examples": None, "": METRICS_SCHEMA}


@dataclass(frozen=True)
class Problem:
    """One thing wrong in ``results/``: what, where (a path), and the command that repairs it."""

    what: str
    where: str
    repair: str


def snakemake(configfiles: list[Path] | None = None) -> str:
    """The Snakemake command line of a repair, with the config files the results were made
    with (none: the default ``config.yaml``)."""
    return " ".join([SNAKEMAKE, *(f"--configfile {path}" for path in configfiles or [])])


def verify_results(results_dir: Path, configfiles: list[Path] | None = None) -> list[Problem]:
    """Every problem of the feature stores, token stores, aligner runs, spec records and
    pretrained weights under ``results_dir``; repairs name ``configfiles``."""
    results_dir = Path(results_dir)
    command = snakemake(configfiles)
    problems: list[Problem] = []
    known: dict[str, set[str] | None] = {}
    for reader, folder in ((FeatureStore, "features"), (TokenStore, "tokens")):
        fingerprints: set[str] = set()
        for path in zarr_stores(results_dir / folder):
            found, fingerprint = check_store(reader(path), results_dir, command)
            problems += found + check_store_weights(reader(path), results_dir, command)
            if fingerprint:
                fingerprints.add(fingerprint)
        known[folder] = fingerprints if (results_dir / folder).is_dir() else None
    for run_dir in aligner_runs(results_dir):
        problems += check_run(run_dir, results_dir, known["features"], known["tokens"], command)
    for entry in KeyedFolders(results_dir / layout.RUN_STORE).entries():
        problems += check_filed_run(entry, results_dir, known["features"], known["tokens"])
    for entry in KeyedFolders(results_dir / layout.EVALUATION_STORE).entries():
        problems += check_filed_evaluation(entry, results_dir)
    return [
        *problems,
        *check_tables(results_dir, command),
        *stale_jobs(results_dir, command),
        *check_pretrained(results_dir, command),
        *aggregate_problems(results_dir, command),
    ]


def check_pretrained(results_dir: Path, command: str) -> list[Problem]:
    """Weights pretrained here whose bytes are not those their record's SHA-256 names (or with
    no readable record): extraction refuses them (``weights.check_weights``) until their
    pretrain_encoder job runs again."""
    problems = []
    pattern = Path(layout.pretrained_weights("*")).name
    for path in sorted((results_dir / "pretrained").glob(pattern)):
        try:
            check_weights(pretrained_here(path.stem, path))
        except WeightsIntegrityError as error:
            repair = f"{command} --force {target(path, results_dir)}"
            problems.append(Problem(str(error), str(path), repair))
    return problems


def check_store_weights(reader: StoreReader, results_dir: Path, command: str) -> list[Problem]:
    """A store whose encoder's local weights changed since it was extracted: stale (the next
    ``snakemake`` plans with the new weights and extracts it again)."""
    try:
        changed = weights_changed(reader.attrs, results_dir.parent)
    except StoreIntegrityError:  # check_store names it
        return []
    return [Problem(f"{changed}: stale", str(reader.path), command)] if changed else []


def verify_tables(results_dir: Path, configfiles: list[Path] | None = None) -> list[Problem]:
    """Only the tables' problems (``check_tables``): what the HTML report embeds."""
    return check_tables(Path(results_dir), snakemake(configfiles))


def check_tables(results_dir: Path, command: str) -> list[Problem]:
    """Every ``*.parquet`` under ``results_dir/tables`` that does not read in full (pyarrow:
    every page decoded) or, for the aggregate's tables, does not hold its schema's columns,
    types, nulls and finite values (``tables.validate``). The repair runs the aggregate again:
    it writes every table (Snakemake sees nothing to do for a damaged table whose date is
    right)."""
    repair = f"{command} --forcerun aggregate"
    problems = []
    for path in sorted((results_dir / "tables").rglob("*.parquet")):
        try:
            table = pq.read_table(path)
        except Exception as error:
            what = f"table {path.name} cannot be read ({type(error).__name__}: {error})"
            problems.append(Problem(what, str(path), repair))
            continue
        try:
            if (schema := TABLE_SCHEMAS.get(path.name)) is not None:
                tables.validate(pl.from_arrow(table), schema)
        except ValueError as error:
            what = f"table {path.name} does not hold its schema ({error})"
            problems.append(Problem(what, str(path), repair))
    return problems


def stale_jobs(results_dir: Path, command: str) -> list[Problem]:
    """Jobs whose outputs were made with another spec than their rule last asked for (a config
    edit not run yet: ``snakemake`` reruns them, with or without ``.snakemake/``)."""
    problems = []
    for record in sorted((results_dir / "specs").rglob("*.json")):
        if record.name.endswith(".made.json"):
            continue
        made = provenance.made_with(record)
        try:
            asked = spec_hash(json.loads(record.read_text()))
        except (OSError, ValueError) as error:
            problems.append(Problem(f"spec record unreadable ({error})", str(record), command))
            continue
        if made is not None and made != asked:
            what = "outputs made with another spec than the config now asks for: stale"
            problems.append(Problem(what, str(record.relative_to(results_dir)), command))
    return problems


def aggregate_problems(results_dir: Path, command: str) -> list[Problem]:
    """The evaluation tables the aggregate reads, each read in full against its schema (the
    repair re-evaluates its job), and whether the last aggregate finished: its staged outputs
    are gone after a failure, and the published tables are then the ones from before."""
    problems = []
    for path in sorted((results_dir / "evaluation").rglob("*.parquet")):
        kind = next((k for k in EVALUATION_SCHEMAS if path.name.endswith(f"{k}.parquet")), "")
        job = path.with_name(path.name.removesuffix(f"{kind}.parquet") + ".parquet")
        try:
            read_table(path, EVALUATION_SCHEMAS[kind])
        except ValueError as error:
            repair = f"{command} --force {target(job, results_dir)}"
            problems.append(Problem(str(error), str(path), repair))
    published = [layout.METRICS_TABLE, layout.SUMMARY_TABLE, layout.COMPARISONS_TABLE]
    missing = [
        layout.staged(path)
        for path in [*published, layout.PLOTS_DIR]
        if not (results_dir / Path(layout.staged(path)).relative_to(layout.RESULTS)).exists()
    ]
    if (results_dir / "tables").is_dir() and missing:
        what = (
            f"the last aggregate did not finish ({', '.join(missing)} missing): results/tables "
            "and results/plots are what it published before, not of the evaluation tables now"
        )
        problems.append(Problem(what, str(results_dir / "tables"), command))
    return problems


def print_report(problems: list[Problem], file: TextIO | None = None) -> int:
    """Print the problems and their repairs; 0 when there are none, else 1."""
    file = file or sys.stdout
    if not problems:
        print("verify: no problems found", file=file)
        return 0
    for problem in problems:
        print(
            f"PROBLEM {problem.where}\n  what:   {problem.what}\n  repair: {problem.repair}",
            file=file,
        )
    repairs = list(dict.fromkeys(problem.repair for problem in problems))
    print(f"\nverify: {len(problems)} problems; to repair, from the workflow root:", file=file)
    for repair in repairs:
        print(f"  {repair}", file=file)
    return 1


def zarr_stores(folder: Path) -> list[Path]:
    """Every ``*.zarr`` store under ``folder``, and the stores of orphan ``*.zarr.done``
    markers (the chunks inside a store are not walked)."""
    marker = layout.store_marker(layout.STORE_SUFFIX)
    found: set[Path] = set()
    for root, dirs, files in os.walk(folder):
        for name in list(dirs):
            if name.endswith(layout.STORE_SUFFIX):
                found.add(Path(root) / name)
                dirs.remove(name)
        found.update(
            Path(root) / f.removesuffix(layout.MARKER_SUFFIX) for f in files if f.endswith(marker)
        )
    return sorted(found)


def aligner_runs(results_dir: Path) -> list[Path]:
    """Every run folder ``n<N>_s<seed>`` under ``results/aligners``."""
    found = []
    for root, dirs, _ in os.walk(results_dir / "aligners"):
        for name in list(dirs):
            if is_run_name(name):
                found.append(Path(root) / name)
                dirs.remove(name)
    return sorted(found)


def target(path: Path, results_dir: Path) -> str:
    """``path`` as a Snakemake target: relative to the workflow root, under ``results/``."""
    return (Path("results") / Path(path).relative_to(results_dir)).as_posix()


def check_store(
    reader: StoreReader, results_dir: Path, command: str
) -> tuple[list[Problem], str | None]:
    """Problems of one store (feature or token store), and its fingerprint when it has one. The
    repair reruns the job that makes it (``reader.job_marker``)."""
    path, kind = reader.path, reader.fmt.kind
    marker, where = marker_path(path), str(path)
    job = target(reader.job_marker, results_dir)
    force = f"{command} --force {job}"
    if not path.is_dir():
        return [Problem(f"completion marker {marker.name} without its {kind}", where, force)], None
    try:
        fingerprint = reader.attrs.get("fingerprint")
    except StoreIntegrityError as error:
        return [Problem(str(error), where, force)], None
    problems = []
    complete = reader.attrs.get("complete")
    if not marker.is_file():
        what = (
            f"no completion marker {marker.name} though the store was finished"
            if complete
            else f"extraction unfinished (no {marker.name}): a killed run, it resumes"
        )
        resumes = not complete and not reader.job_marker.exists()  # its job runs again
        problems.append(Problem(what, where, f"{command} {job}" if resumes else force))
    else:
        try:
            marked = marked_fingerprint(path)
        except StoreIntegrityError as error:
            marked = f"unreadable ({error})"
        if marked != fingerprint:
            problems.append(
                Problem(
                    f"marker fingerprint {str(marked)[:12]} != store fingerprint "
                    f"{str(fingerprint)[:12]}",
                    where,
                    force,
                )
            )
    if not fingerprint:
        problems.append(Problem("no fingerprint attribute", where, force))
    if marker.is_file() or complete:  # an unfinished store has gaps anyway
        problems += [Problem(str(error), where, force) for error in reader.integrity_problems()]
    return problems, fingerprint


def check_run(
    run_dir: Path,
    results_dir: Path,
    fingerprints: set[str] | None,
    token_fingerprints: set[str] | None,
    command: str,
    repair: str | None = None,
) -> list[Problem]:
    """Problems of one aligner run; ``fingerprints``: the feature stores' and
    ``token_fingerprints`` the token stores' (None: not checked). ``repair``: instead of
    forcing the align job of a grid cell's run (a run store's entry is removed)."""
    where = str(run_dir)
    job = target(run_dir.parent / layout.RUNS_JSON, results_dir)
    # a forced align job refits every run; --forcerun also reruns what reads them (its outputs
    # may be gone: Snakemake deletes a failed job's, and rebuilds none under up-to-date tables)
    refit = repair or f"{command} --forcerun {job}"

    def problem(what: str) -> list[Problem]:
        return [Problem(what, where, refit)]

    try:
        done = artifacts.read_done(run_dir)
    except (OSError, ValueError) as error:
        return problem(f"{artifacts.DONE} cannot be read ({error})")
    if done is None:
        return problem(f"unfinished run: no {artifacts.DONE}")
    fingerprint = done.get("fingerprint") if isinstance(done, dict) else None
    if not isinstance(fingerprint, str) or not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
        return problem(f"{artifacts.DONE} has no valid fingerprint ({fingerprint!r})")
    if damaged := artifacts.damaged_files(run_dir, done):  # edited or damaged since it was fitted
        return [Problem(what, where, refit) for what in damaged]
    try:
        params = artifacts.read_params(run_dir)
    except (OSError, ValueError) as error:
        return problem(f"{artifacts.PARAMS} cannot be read ({error})")
    problems = []
    if params.get("aligner") != done.get("aligner"):
        problems += problem(
            f"{artifacts.DONE} is of aligner {done.get('aligner')!r}, "
            f"{artifacts.PARAMS} of {params.get('aligner')!r}"
        )
    meta = params.get("meta") or {}
    named = is_run_name(run_dir.name)  # a grid cell's run, not a run store's entry
    if named and run_dir.name != run_name(meta.get("n_pairs"), meta.get("seed")):
        problems += problem(
            f"{artifacts.PARAMS} is of n_pairs {meta.get('n_pairs')}, seed {meta.get('seed')}"
        )
    try:
        aligner = artifacts.load_aligner(run_dir)
        state = aligner.state()
    except Exception as error:
        problems += problem(
            f"{artifacts.WEIGHTS} cannot be loaded ({type(error).__name__}: {error})"
        )
    else:
        bad = [key for key, value in state.items() if not np.isfinite(np.asarray(value)).all()]
        if bad:
            problems += problem(f"{artifacts.WEIGHTS}: NaN or infinite values in {bad}")
    try:
        import pyarrow.parquet as pq

        pq.read_metadata(run_dir / artifacts.CURVE)
    except Exception as error:
        problems += problem(f"{artifacts.CURVE} cannot be read ({type(error).__name__}: {error})")
    for key, known, folder in (
        ("feature_fingerprints", fingerprints, "features"),
        ("token_fingerprints", token_fingerprints, "tokens"),
    ):
        used = meta.get(key) or {}
        if known is None or not used:
            continue
        stale = sorted(role for role, value in used.items() if value not in known)
        if stale:
            problems += problem(
                f"fitted on {folder} that are no longer in results/{folder} ({', '.join(stale)})"
            )
    return problems


def check_filed_run(
    entry: Path,
    results_dir: Path,
    fingerprints: set[str] | None,
    token_fingerprints: set[str] | None,
) -> list[Problem]:
    """Problems of a run store's fit (``align.grid.file_run``): those of a run, and a record
    and ``params.json`` that agree it is filed under its own key."""
    remove = f"rm -r {target(entry, results_dir)}"
    problems = check_run(entry, results_dir, fingerprints, token_fingerprints, "", remove)
    if problems:
        return problems
    try:
        record = json.loads((entry / grid.ENTRY).read_text())
    except (OSError, ValueError) as error:
        return [Problem(f"{grid.ENTRY} cannot be read ({error})", str(entry), remove)]
    keys = {record.get("key"), artifacts.read_params(entry)["fit"].get("run_key")}
    if keys != {entry.name}:
        what = f"filed under its key, but {grid.ENTRY} and params.json say {sorted(map(str, keys))}"
        return [Problem(what, str(entry), remove)]
    return []


def check_filed_evaluation(entry: Path, results_dir: Path) -> list[Problem]:
    """Problems of an evaluation store's entry: its tables must read back with their schemas."""
    from pipeline.stages import evaluate_aligners

    try:
        evaluate_aligners.read_evaluation(entry, None)
    except Exception as error:
        what = f"filed evaluation unreadable ({type(error).__name__}: {error})"
        return [Problem(what, str(entry), f"rm -r {target(entry, results_dir)}")]
    return []
