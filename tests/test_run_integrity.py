"""Every file of an aligner run is covered by its completion record (``done.json``): a flipped
byte in the weights or an edited ``params.json`` is refused by evaluation and named by
``verify`` with the command that refits the run (issue 22, finding 4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as load_safetensors

from pipeline import layout
from pipeline.align.artifacts import (
    CURVE,
    DONE,
    PARAMS,
    WEIGHTS,
    RunIntegrityError,
    load_aligner,
    read_params,
    save_run,
)
from pipeline.align.grid import fit_runs
from pipeline.align.kinds import build_aligner
from pipeline.pairs import grid_runs
from pipeline.stages.evaluate_aligners import evaluate_run
from pipeline.verify import check_run, print_report, verify_results

CELL = ("vit", "minilm", "asif", "last")
FINGERPRINT = "ab" * 32


def pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))
    return (z @ rng.normal(size=(4, 12))).astype(np.float32), (z @ rng.normal(size=(4, 8))).astype(
        np.float32
    )


def meta(n_pairs: int, seed: int) -> dict:
    vision, text, method, choice = CELL
    return {
        "vision_encoder": vision,
        "text_encoder": text,
        "method": method,
        "layer_choice": choice,
        "vision_layer": 2,
        "text_layer": 5,
        "n_pairs": n_pairs,
        "seed": seed,
    }


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """A results folder holding one fitted ASIF run of the cell ``CELL``."""
    x, y = pairs(40, 0)
    aligner = build_aligner("asif", {"k": 10})
    report = aligner.fit(x, y, None, None, seed=0)
    save_run(the_run(tmp_path / "results"), aligner, report, meta(40, 0), FINGERPRINT)
    return tmp_path / "results"


def the_run(results: Path) -> Path:
    return results.parent / layout.aligner_dir(*CELL) / "n40_s0"


def edit_params(run_dir: Path, edit) -> None:
    params = json.loads((run_dir / PARAMS).read_text())
    edit(params)
    (run_dir / PARAMS).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")


def flip_byte(path: Path, offset_from_end: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01  # inside the last tensor: still loads, other numbers
    path.write_bytes(bytes(data))


def test_the_record_holds_the_sha256_of_every_file_the_run_wrote(results: Path) -> None:
    import hashlib

    run_dir = the_run(results)
    done = json.loads((run_dir / DONE).read_text())
    written = sorted(p.name for p in run_dir.iterdir() if p.name != DONE)
    assert sorted(done["files"]) == written == sorted([WEIGHTS, PARAMS, CURVE])
    for name, digest in done["files"].items():
        assert hashlib.sha256((run_dir / name).read_bytes()).hexdigest() == digest
    assert done["fingerprint"] == FINGERPRINT and done["aligner"] == "asif"
    assert verify_results(results) == []


def test_a_flipped_byte_in_the_weights_is_refused_and_named(results: Path) -> None:
    run_dir = the_run(results)
    flip_byte(run_dir / WEIGHTS)
    assert load_safetensors((run_dir / WEIGHTS).read_bytes())  # loads: only the record tells
    with pytest.raises(RunIntegrityError) as refused:
        load_aligner(run_dir)
    message = str(refused.value)
    assert f"{WEIGHTS} of run {run_dir} does not match its record" in message
    assert f"snakemake --forcerun {run_dir.parent / layout.RUNS_JSON}" in message
    problems = verify_results(results, [Path("workflow/configs/structure.yaml")])
    assert [p.where for p in problems] == [str(run_dir)]
    assert WEIGHTS in problems[0].what and "does not match its record" in problems[0].what
    assert problems[0].repair.endswith(
        "--configfile workflow/configs/structure.yaml --forcerun "
        "results/aligners/vit/minilm/asif/last/runs.json"
    )


@pytest.mark.parametrize("key", ["p", "k"])
def test_an_edited_asif_parameter_is_refused_and_named(results: Path, key: str) -> None:
    run_dir = the_run(results)
    edit_params(run_dir, lambda params: params["hyperparameters"].update({key: 3}))
    with pytest.raises(RunIntegrityError, match=f"{PARAMS} of run .* does not match its record"):
        read_params(run_dir)
    with pytest.raises(RunIntegrityError, match=PARAMS):
        load_aligner(run_dir)
    [problem] = check_run(run_dir, results, None, None, "snakemake")
    assert PARAMS in problem.what and "does not match its record" in problem.what
    assert problem.repair == "snakemake --forcerun results/aligners/vit/minilm/asif/last/runs.json"


class Untouchable:
    """Evaluation inputs that fail the test when anything is read from them."""

    def __getattr__(self, name: str):
        raise AssertionError(f"evaluation read {name!r} of its inputs before checking the run")


def test_an_edited_vision_layer_is_the_runs_record_not_a_token_set(results: Path) -> None:
    """Before, the edited layer reached the token set, which said to extract it again."""
    run_dir = the_run(results)
    edit_params(run_dir, lambda params: params["meta"].update({"vision_layer": 1}))
    with pytest.raises(RunIntegrityError, match=f"{PARAMS} of run .* does not match its record"):
        evaluate_run(run_dir, Untouchable())


def test_a_deleted_curve_and_a_record_without_checksums_are_named(results: Path) -> None:
    run_dir = the_run(results)
    (run_dir / CURVE).unlink()
    [problem] = check_run(run_dir, results, None, None, "snakemake")
    assert f"{CURVE} of run {run_dir} is missing" in problem.what
    done = json.loads((run_dir / DONE).read_text())
    del done["files"]
    (run_dir / DONE).write_text(json.dumps(done))
    with pytest.raises(RunIntegrityError, match="records no checksums"):
        load_aligner(run_dir)
    [problem] = check_run(run_dir, results, None, None, "snakemake")
    assert "records no checksums" in problem.what


def test_print_report_gives_the_refit_of_a_damaged_run(results: Path, capsys) -> None:
    flip_byte(the_run(results) / WEIGHTS)
    assert print_report(verify_results(results)) == 1
    out = capsys.readouterr().out
    assert "does not match its record" in out and "--forcerun results/aligners/" in out


def test_a_resumed_grid_refits_a_damaged_run(tmp_path: Path) -> None:
    """After a kill, the align job keeps runs with the right fingerprint: not a damaged one."""
    x, y = pairs(60, 1)
    grid = grid_runs([30, 60], [0], len(x))
    runs = fit_runs("asif", {"k": 10}, (x, y, None, None), grid, tmp_path, {"layer": 1})
    stamps = {run: (run / DONE).stat().st_mtime_ns for run in runs}
    flip_byte(runs[0] / WEIGHTS)
    assert fit_runs("asif", {"k": 10}, (x, y, None, None), grid, tmp_path, {"layer": 1}) == runs
    assert (runs[0] / DONE).stat().st_mtime_ns != stamps[runs[0]]  # refitted...
    assert (runs[1] / DONE).stat().st_mtime_ns == stamps[runs[1]]  # ...the intact one kept
    load_aligner(runs[0])  # and whole again
