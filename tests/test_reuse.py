"""Identical runs once (docs/architecture.md): the fit_aligners and evaluate_aligners stages on a
tiny prepared world with fake feature stores, cells that share a run key (``best`` on the
``last`` layers, two method entries alike) fitting and evaluating each key once, and the run
store (``pipeline.reuse``) under a changed choice, a kill, a forced job and concurrent claims."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from pipeline import jobs, layout, verify
from pipeline.align import grid
from pipeline.align.artifacts import DONE, WEIGHTS, read_params
from pipeline.align.grid import CELL_META, run_key
from pipeline.config import validate_config
from pipeline.data import load_prompts, load_split, prepare_dataset, read_manifest
from pipeline.evaluate.tables import read_metrics, read_outcomes
from pipeline.pairs import GridRun
from pipeline.reuse import KeyedFolders
from pipeline.similarity.selection import write_layer_choice
from pipeline.stages import evaluate_aligners, fit_aligners
from pipeline.stores.features import FeatureWriter

DIMS = {"vit": [8, 8, 8], "minilm": [6, 6, 6, 6]}  # layers per encoder of the fake stores
RIDGE = {"aligner": "ridge", "alpha": 0.5}
CONFIG = {
    "datasets": {
        "tiny": {
            "source": "synthetic",
            "seed": 3,
            "image_size": 32,
            "splits": {"train": 20, "val": 8, "test": 12},
            "captions_per_image": 2,
        }
    },
    "encoders": {
        "vit": {
            "source": "timm",
            "name": "vit_tiny_patch16_224",
            "pretrained": False,
            "init_seed": 0,
        },
        "minilm": {"source": "bundled", "name": "all-MiniLM-L6-v2"},
    },
    "experiment": {
        "pairs": [{"vision": "vit", "text": "minilm"}],
        "train": {"dataset": "tiny", "split": "train"},
        "val": {"dataset": "tiny", "split": "val"},
        "evaluate": [{"dataset": "tiny", "split": "test", "tasks": ["shape", "retrieval"]}],
    },
    "align": {
        "n_pairs": [10, "full"],
        "seeds": [0, 1],
        "layer_choices": ["last", "best"],
        "methods": {"ridge": RIDGE, "ridge_again": RIDGE, "ridge_other": {**RIDGE, "alpha": 2}},
    },
}
RUNS = 4  # the grid: 2 sizes x 2 seeds
LAST = {"vision_layer": 2, "text_layer": 3, "score": 0.5}
OTHER = {"vision_layer": 1, "text_layer": 2, "score": 0.75}


def rooted(job: jobs.Job, root: Path) -> jobs.Job:
    """The job with its layout paths under ``root`` instead of the working directory."""

    def under(paths):
        return {
            k: [str(root / p) for p in v] if isinstance(v, list) else str(root / v)
            for k, v in paths.items()
        }

    return dataclasses.replace(job, inputs=under(job.inputs), outputs=under(job.outputs))


class World:
    """A prepared dataset, fake feature stores, a ``layers.json`` and the cells' jobs under
    ``root``; counts every fit and every evaluation the stages make."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root, self.config = root, validate_config(CONFIG)
        prepare_dataset("tiny", self.config["datasets"]["tiny"], root / layout.dataset_dir("tiny"))
        written: set[str] = set()
        for cell in ("ridge", "last"), ("ridge", "best"):
            for job in (self.fit_job(*cell), self.evaluate_job(*cell)):
                self.write_stores(job, written)
        self.choose(best=LAST)
        self.fits = self.evaluations = 0

        def counted(function, counter):
            def call(*args, **kwargs):
                setattr(self, counter, getattr(self, counter) + 1)
                return function(*args, **kwargs)

            return call

        monkeypatch.setattr(grid, "fit_run", counted(grid.fit_run, "fits"))
        evaluate = counted(evaluate_aligners.evaluate_aligner, "evaluations")
        monkeypatch.setattr(evaluate_aligners, "evaluate_aligner", evaluate)

    def fit_job(self, method: str, choice: str) -> jobs.Job:
        return rooted(jobs.fit_aligners(self.config, "vit", "minilm", method, choice), self.root)

    def evaluate_job(self, method: str, choice: str) -> jobs.Job:
        job = jobs.evaluate_aligners(self.config, "vit", "minilm", method, choice)
        return rooted(job, self.root)

    def choose(self, best: dict) -> None:
        """``layers.json`` whose ``best`` is ``best`` (``last`` stays the last layers)."""
        choice = {"metric": "mutual_knn", "scope": "pool", "choices": {"last": LAST, "best": best}}
        write_layer_choice(self.root / layout.layers_json("vit", "minilm"), choice)

    def write_stores(self, job: jobs.Job, written: set[str]) -> None:
        """A complete fake feature store behind every feature marker of ``job``."""
        rng = np.random.default_rng(len(written))
        for name, marker in job.inputs.items():
            if not marker.endswith(".zarr.done") or marker in written:
                continue
            written.add(marker)
            path = Path(layout.store_of_marker(marker))
            dataset, split, encoder = path.parent.parent.name, path.parent.name, path.stem
            dataset_dir = self.root / layout.dataset_dir(dataset)
            if split == jobs.PROMPTS_SPLIT:
                ids = load_prompts(dataset_dir)["prompt_id"].to_list()
            else:
                data = load_split(dataset_dir, split)
                vision = name.startswith("vision")
                table, column = (
                    (data.images, "image_id") if vision else (data.captions, "caption_id")
                )
                ids = table[column].to_list()
            dims = DIMS[encoder]
            writer = FeatureWriter.create_or_resume(
                path,
                fingerprint=f"{encoder}-{split}",
                sample_ids=ids,
                layer_names=[f"layer.{i}" for i in range(len(dims))],
                dims=dims,
                attrs={
                    "encoder": {"name": encoder},
                    "dataset": {"content_hash": read_manifest(dataset_dir)["content_hash"]},
                    "request": jobs.store_request(self.config, dataset, split, encoder),
                },
            )
            layers = [rng.standard_normal((len(ids), d)).astype(np.float32) for d in dims]
            for block, start, stop in writer.pending_blocks():
                writer.write_block(block, [values[start:stop] for values in layers])
            writer.finalize()

    def fit(self, method: str, choice: str) -> Path:
        """Run the cell's align job as Snakemake would (its declared output removed first);
        returns its folder."""
        job = self.fit_job(method, choice)
        Path(job.output("runs")).unlink(missing_ok=True)
        fit_aligners.run(job)
        return Path(job.output("runs")).parent

    def evaluate(self, method: str, choice: str) -> pl.DataFrame:
        job = self.evaluate_job(method, choice)
        evaluate_aligners.run(job)
        return read_metrics(job.output("metrics"))

    def runs(self, method: str, choice: str) -> dict[str, dict]:
        folder = self.root / layout.aligner_dir("vit", "minilm", method, choice)
        return {run.name: read_params(run) for run in sorted(folder.glob("n*_s*"))}


@pytest.fixture
def world(tmp_path, monkeypatch) -> World:
    return World(tmp_path, monkeypatch)


def values(metrics: pl.DataFrame) -> pl.DataFrame:
    """A metrics table without the columns that label its cell."""
    return metrics.drop("method", "layer_choice")


def test_identical_runs_are_fitted_and_evaluated_once(world):
    last = world.fit("ridge", "last")
    assert world.fits == RUNS
    world.fit("ridge", "best")  # best chose the last layers: the same runs
    world.fit("ridge_again", "last")  # a method entry like ridge: the same runs
    assert world.fits == RUNS
    world.fit("ridge_other", "last")  # another alpha: other runs
    assert world.fits == 2 * RUNS

    fitted = world.runs("ridge", "last")
    assert all(params["fit"]["reused_from"] is None for params in fitted.values())
    for cell in ("ridge", "best"), ("ridge_again", "last"):
        for name, params in world.runs(*cell).items():
            assert params["fit"]["reused_from"] == str(last / name)
            assert params["fit"]["run_key"] == fitted[name]["fit"]["run_key"]
            assert params["meta"]["method"] == cell[0]  # its own labels...
            assert params["meta"]["layer_choice"] == cell[1]
            own = world.root / layout.aligner_dir("vit", "minilm", *cell) / name / WEIGHTS
            assert own.read_bytes() == (last / name / WEIGHTS).read_bytes()  # ...the same fit
    assert all(p["fit"]["reused_from"] is None for p in world.runs("ridge_other", "last").values())

    tables = {cell: world.evaluate(*cell) for cell in [("ridge", "last"), ("ridge", "best")]}
    assert world.evaluations == RUNS
    tables["again"] = world.evaluate("ridge_again", "last")
    tables["other"] = world.evaluate("ridge_other", "last")
    assert world.evaluations == 2 * RUNS
    for cell, table in tables.items():  # every cell keeps its rows, under its own labels
        assert len(table) > 0 and table["seed"].n_unique() == 2, cell
    assert set(tables[("ridge", "best")]["layer_choice"]) == {"best"}
    assert set(tables["again"]["method"]) == {"ridge_again"}
    assert values(tables[("ridge", "best")]).equals(values(tables[("ridge", "last")]))
    assert values(tables["again"]).equals(values(tables[("ridge", "last")]))
    assert not values(tables["other"]).equals(values(tables[("ridge", "last")]))

    # the reused rows are the rows evaluating gives: evaluate best again without the store
    job = world.evaluate_job("ridge", "best")
    reused = {name: Path(path).read_bytes() for name, path in job.outputs.items()}
    store = Path(layout.evaluation_store(job.output("metrics")))
    for entry in KeyedFolders(store).entries():
        for path in entry.iterdir():
            path.unlink()
        entry.rmdir()
    world.evaluate("ridge", "best")
    assert world.evaluations == 3 * RUNS
    assert {name: Path(path).read_bytes() for name, path in job.outputs.items()} == reused
    assert len(read_outcomes(job.output("outcomes"))) > 0


def test_a_changed_choice_refits_and_the_link_does_not_survive(world):
    world.fit("ridge", "last")
    world.fit("ridge", "best")
    assert world.fits == RUNS
    world.choose(best=OTHER)  # compare_layers ran again: best now takes other layers
    best = world.fit("ridge", "best")
    assert world.fits == 2 * RUNS
    for params in world.runs("ridge", "best").values():
        assert params["fit"]["reused_from"] is None
        assert (params["meta"]["vision_layer"], params["meta"]["text_layer"]) == (1, 2)
    assert set(world.evaluate("ridge", "best")["vision_layer"]) == {1}
    world.choose(best=LAST)  # and back to the last layers: last's fits serve again
    world.fit("ridge", "best")
    assert world.fits == 2 * RUNS
    for name, params in world.runs("ridge", "best").items():
        assert params["fit"]["reused_from"] == str(best.parent / "last" / name)


def test_a_job_killed_between_a_fit_and_its_filing_resumes(world, monkeypatch):
    filed = grid.file_run

    def killed(*args):
        raise KeyboardInterrupt  # stands for SIGKILL: the job stops here, its mark stays

    monkeypatch.setattr(grid, "file_run", killed)
    with pytest.raises(KeyboardInterrupt):
        world.fit("ridge", "last")
    folder = world.root / layout.aligner_dir("vit", "minilm", "ridge", "last")
    assert (Path(layout.run_mark(str(folder)))).exists()
    assert world.fits == 1 and (folder / "n10_s0" / DONE).is_file()  # saved, not filed
    monkeypatch.setattr(grid, "file_run", filed)
    world.fit("ridge", "last")  # the rerun resumes: keeps the first run, files it, fits 3
    assert world.fits == RUNS
    world.fit("ridge", "best")  # every run of last was filed, the one before the kill too
    assert world.fits == RUNS
    assert all(p["fit"]["reused_from"] for p in world.runs("ridge", "best").values())


def test_a_damaged_or_half_filed_entry_is_fitted_again(world):
    last = world.fit("ridge", "last")
    world.evaluate("ridge", "last")
    results = world.root / "results"
    assert verify.verify_results(results) == []
    store = KeyedFolders(layout.run_store(str(last / layout.RUNS_JSON)))
    entries = store.entries()
    assert len(entries) == RUNS
    (entries[0] / WEIGHTS).unlink()  # damaged: the copy fails, the run is fitted instead
    [evaluation, *_] = KeyedFolders(results / layout.EVALUATION_STORE).entries()
    (evaluation / "metrics.parquet").write_bytes(b"not parquet")
    found = {Path(problem.where): problem.repair for problem in verify.verify_results(results)}
    assert found.keys() == {entries[0], evaluation}
    assert found[entries[0]] == f"rm -r results/{layout.RUN_STORE}/{entries[0].name}"
    half = store.root / f".{entries[0].name}.killed"  # a killed filing's temporary
    half.mkdir()
    world.fit("ridge", "best")
    assert world.fits == RUNS + 1
    assert not half.exists()  # removed when that key was filed next
    world.evaluate("ridge", "best")  # the damaged evaluation is evaluated and filed again
    assert world.evaluations == RUNS + 1
    assert verify.verify_results(results) == []  # every entry and run intact again


def test_forcing_one_cell_refits_it_alone(world):
    last = world.fit("ridge", "last")
    best = world.fit("ridge", "best")
    stamps = {run: (run / WEIGHTS).stat().st_mtime_ns for run in last.glob("n*_s*")}
    world.fit("ridge", "best")  # --forcerun: no mark, and its runs are there: it refits them
    assert world.fits == 2 * RUNS
    assert all(p["fit"]["reused_from"] is None for p in world.runs("ridge", "best").values())
    assert {run: (run / WEIGHTS).stat().st_mtime_ns for run in stamps} == stamps  # untouched
    world.fit("ridge_again", "last")  # a new cell copies the latest fit of each key: best's
    assert world.fits == 2 * RUNS
    for name, params in world.runs("ridge_again", "last").items():
        assert params["fit"]["reused_from"] == str(best / name)
    assert values(world.evaluate("ridge", "best")).equals(values(world.evaluate("ridge", "last")))


def test_distinct_inputs_never_share_a_key():
    meta = {
        "vision_layer": 2,
        "text_layer": 3,
        "feature_fingerprints": {"vision_train": "a", "text_train": "b"},
        **dict.fromkeys(CELL_META, "label"),
    }
    base = ("ridge", {"alpha": 0.5}, meta, GridRun(10, 0), "data")
    key = run_key(*base)
    relabelled = {**meta, **dict.fromkeys(CELL_META, "another cell")}
    assert run_key("ridge", {"alpha": 0.5}, relabelled, GridRun(10, 0), "data") == key
    others = [
        ("procrustes", *base[1:]),
        ("ridge", {"alpha": 1.0}, *base[2:]),
        ("ridge", base[1], {**meta, "vision_layer": 1}, *base[3:]),
        ("ridge", base[1], {**meta, "feature_fingerprints": {"vision_train": "c"}}, *base[3:]),
        (*base[:3], GridRun(10, 1), "data"),
        (*base[:3], GridRun(20, 0), "data"),
        (*base[:4], "other data"),
    ]
    assert len({key, *(run_key(*other) for other in others)}) == len(others) + 1


def test_a_key_claimed_twice_at_once_is_worked_once(tmp_path):
    store, key = KeyedFolders(tmp_path / "store"), "ab" * 32
    work: list[str] = []

    def job(name: str) -> None:
        with store.claim(key) as entry:
            if entry is None:
                time.sleep(0.3)  # the other job waits on the lock meanwhile
                work.append(name)
                store.put(key, lambda folder: (folder / "result").write_text(name))

    threads = [threading.Thread(target=job, args=(name,)) for name in ("first", "second")]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert len(work) == 1
    assert (store.folder(key) / "result").read_text() == work[0]
    with pytest.raises(ValueError, match="not a content key"):
        store.folder("../escape")
