"""End to end: the whole Snakemake DAG on a tiny config, run as a user would run it."""

import copy
import filecmp
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
import yaml

from pipeline import layout
from pipeline.evaluate.tables import read_comparisons, read_metrics, read_summary
from pipeline.stores.features import FeatureStore
from pipeline.stores.tokens import TokenStore

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

HEAD = {"aligner": "linear", "dim": 16, "lr": 1.0e-2, "max_epochs": 3, "patience": 2}
TINY = {
    "runtime": {"device": "cpu", "batch_size": 32},
    "datasets": {
        "tiny": {
            "source": "synthetic",
            "seed": 3,
            "image_size": 32,
            "splits": {"train": 48, "val": 16, "test": 24},
            "captions_per_image": 2,
        }
    },
    "encoders": {
        "vit": {
            "source": "timm",
            "name": "vit_tiny_patch16_224",
            "image_size": 32,
            # pretrained inside the DAG (rule pretrain_encoder) on unpaired images, briefly
            "pretrain": {
                "dataset": "tiny",
                "images": 64,
                "steps": 3,
                "batch_size": 16,
                "warmup_steps": 1,
            },
            "model_kwargs": {
                "img_size": 32,
                "patch_size": 8,
                "depth": 3,
                "embed_dim": 32,
                "num_heads": 2,
            },
        },
        "minilm": {"source": "bundled", "name": "all-MiniLM-L6-v2", "max_tokens": 32},
    },
    "experiment": {
        "pairs": [{"vision": "vit", "text": "minilm"}],
        "train": {"dataset": "tiny", "split": "train"},
        "val": {"dataset": "tiny", "split": "val"},
        "evaluate": [{"dataset": "tiny", "split": "test"}],
    },
    "similarity": {"metrics": ["linear_cka", "mutual_knn"], "pool_size": 40},
    "align": {
        "n_pairs": [24, "full"],
        "seeds": [0, 1],
        "layer_choices": ["last", "best"],
        "methods": {
            "linear": HEAD,
            "linear_structure": {**HEAD, "structure": {"lambda": 1.0, "warmup_steps": 2}},
            "csa": {"aligner": "csa", "sim_dim": 4},
            "asif": {"aligner": "asif", "k": 16},
            "procrustes": {"aligner": "procrustes"},
            "procrustes_again": {"aligner": "procrustes"},  # procrustes' runs, fitted once
            "pal": {
                "aligner": "pal",
                "anchors": 8,
                "batch_size": 32,
                "max_epochs": 3,
                "patience": 2,
            },
        },
    },
    # the run of the grid's n24_s0: its `last` layer pair must give procrustes/last's numbers
    "sweep": {"method": "procrustes", "n_pairs": 24, "seed": 0},
}
METHODS = sorted(TINY["align"]["methods"])
TOKEN_SETS = 7  # vit on train/val/test, minilm on train/val/test/prompts


def run(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command of this environment's interpreter with the environment NOT activated: its
    bin folder is off PATH, so jobs must find the interpreter without a bare ``python``."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != bin_dir)
    result = subprocess.run(
        [sys.executable, *command],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": path},
        cwd=cwd,
        check=False,
    )
    result.output = result.stdout + result.stderr
    return result


def snakemake(workdir: Path, *args: str, configfile: Path | None = None):
    return run(
        [
            "-m",
            "snakemake",
            "--snakefile",
            str(ROOT / "Snakefile"),
            "--directory",
            str(workdir),
            "--configfile",
            str(configfile or workdir / "config.yaml"),
            "--cores",
            "2",
            *args,
        ]
    )


def planned_jobs(workdir: Path, *args: str, configfile: Path | None = None) -> dict[str, int]:
    """Job counts per rule of a dry run."""
    result = snakemake(workdir, "--dry-run", *args, configfile=configfile)
    assert result.returncode == 0, result.output[-3000:]
    stats = result.output.split("Job stats:")[-1] if "Job stats:" in result.output else ""
    return {
        rule: int(n)
        for rule, n in re.findall(r"^(\w+)\s+(\d+)$", stats, re.MULTILINE)
        if rule != "total"
    }


def write_config(workdir: Path, config: dict) -> None:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny")
    write_config(workdir, TINY)
    result = snakemake(workdir)
    assert result.returncode == 0, result.output[-6000:]
    return workdir


@pytest.fixture
def copy_of_run(tiny_run, tmp_path):
    """A copy of the complete tiny run (timestamps and Snakemake's records kept) to damage."""
    workdir = tmp_path / "copy"
    shutil.copytree(tiny_run, workdir, symlinks=True)
    return workdir


def test_every_artefact_of_the_dag(tiny_run):
    results = tiny_run / "results"
    data = results / "datasets" / "tiny"
    record = json.loads((results / "pretrained/vit.json").read_text())
    assert (results / "pretrained/vit.safetensors").stat().st_size > 0
    assert len(record["losses"]) == 3
    for split in ("train", "val", "test"):
        images = pl.read_parquet(data / split / "images.parquet")
        captions = pl.read_parquet(data / split / "captions.parquet")
        vision = FeatureStore.open(results / f"features/tiny/{split}/vit.zarr")
        text = FeatureStore.open(results / f"features/tiny/{split}/minilm.zarr")
        assert vision.sample_ids().tolist() == images["image_id"].to_list()
        assert text.sample_ids().tolist() == captions["caption_id"].to_list()
        assert vision.num_layers == 3 and text.num_layers == 7
        assert record["weights_sha256"] in json.dumps(
            vision.attrs
        )  # made with the pretrained weights
    prompts = FeatureStore.open(results / "features/tiny/prompts/minilm.zarr")
    assert prompts.n_samples == len(pl.read_parquet(data / "prompts.parquet"))

    similarity = pl.read_parquet(results / "similarity/vit/minilm/similarity.parquet")
    assert len(similarity) == 2 * 3 * 7
    for metric in ("linear_cka", "mutual_knn"):
        assert (results / f"similarity/vit/minilm/heatmaps/{metric}.png").stat().st_size > 0

    for method in METHODS:
        for choice in ("last", "best"):
            runs = sorted(
                p.name for p in (results / f"aligners/vit/minilm/{method}/{choice}").glob("n*_s*")
            )
            assert runs == ["n24_s0", "n24_s1", "n96_s0", "n96_s1"]
            run = results / f"aligners/vit/minilm/{method}/{choice}/n24_s0"
            assert {"weights.safetensors", "params.json", "curve.parquet", "done.json"} <= {
                p.name for p in run.iterdir()
            }
            assert not list(run.glob("*.pkl")) and not list(run.glob("*.pt"))

    metrics = read_metrics(results / "tables/metrics.parquet")
    assert set(metrics["method"]) == set(METHODS)
    assert set(metrics["layer_choice"]) == {"last", "best"}
    assert set(metrics["task_kind"]) == {"classification", "retrieval", "segmentation"}
    for method in METHODS:  # PAL and every global method (its patch baseline) on every task
        rows = metrics.filter(pl.col("method") == method)
        assert set(rows["task"]) == set(metrics["task"]), method
        segmentation = rows.filter(pl.col("task") == "tiny.segmentation")
        assert set(segmentation["metric"]) == {
            "miou",
            "miou_fg",
            "pixel_accuracy",
            "miou_all_background",
        }, method
        assert len(segmentation) == 4 * 2 * 4  # metrics x layer choices x runs
    floor = metrics.filter(pl.col("metric") == "miou_all_background")["value"]
    assert floor.n_unique() == 1 and 0 < floor[0] < 1  # one test split, one floor for all
    assert list((results / "plots" / "segmentation").glob("tiny.segmentation__*.png"))
    assert {"tiny.shape", "tiny.colour", "tiny.novel_combination", "tiny.retrieval"} <= set(
        metrics["task"]
    )
    assert {"top1", "balanced_accuracy", "i2t_recall@1", "t2i_recall@10"} <= set(metrics["metric"])
    assert metrics["value"].is_between(0, 1).all()
    summary = read_summary(results / "tables/summary.parquet")
    assert summary["count"].max() == 2  # two seeds
    baseline = summary.filter((pl.col("method") == "linear") & (pl.col("layer_choice") == "last"))
    assert (baseline["relative_improvement"].fill_null(0) == 0).all()
    scored = summary.filter(pl.col("task_kind") != "segmentation")
    assert (scored["item_ci_low"] <= scored["mean"]).all()
    assert (scored["mean"] <= scored["item_ci_high"]).all()
    assert summary["seed_ci_low"].is_not_null().all()  # two seeds everywhere
    comparisons = read_comparisons(results / "tables/comparisons.parquet")
    assert {("linear_structure", "linear"), ("csa", "linear")} <= set(
        comparisons.select("method", "baseline_method").unique().rows()
    )
    best_over_last = comparisons.filter(
        (pl.col("method") == pl.col("baseline_method")) & (pl.col("baseline_choice") == "last")
    )
    assert set(best_over_last["layer_choice"]) == {"best"} and (best_over_last["seeds"] == 2).all()
    sweep = read_metrics(results / "similarity/vit/minilm/sweep.parquet")
    assert sweep.select("vision_layer", "text_layer").unique().height == 3 * 7  # every pair
    assert set(sweep["task_kind"]) == {"classification", "retrieval"}
    assert sweep.select("method", "layer_choice", "n_pairs", "seed").unique().rows() == [
        ("procrustes", "sweep", 24, 0)
    ]
    last = metrics.filter(
        (pl.col("method") == "procrustes")
        & (pl.col("layer_choice") == "last")
        & (pl.col("n_pairs") == 24)
        & (pl.col("seed") == 0)
        & (pl.col("task_kind") != "segmentation")
    )
    [(vision_layer, text_layer)] = last.select("vision_layer", "text_layer").unique().rows()
    swept = sweep.filter(
        (pl.col("vision_layer") == vision_layer) & (pl.col("text_layer") == text_layer)
    )
    key = ["task", "metric"]
    assert swept.sort(key).select(key).equals(last.sort(key).select(key))
    np.testing.assert_allclose(swept.sort(key)["value"], last.sort(key)["value"], atol=1e-9)
    joined = pl.read_parquet(results / "tables/sweep.parquet")
    assert len(joined) == 2 * len(sweep)  # once per similarity metric
    rho = pl.read_parquet(results / "tables/sweep_rho.parquet")
    assert set(rho["similarity_metric"]) == {"linear_cka", "mutual_knn"}
    assert (rho["layer_pairs"] == 3 * 7).all()
    figures = list((results / "plots/layers").glob("sweep__vit__minilm__*.png"))
    assert len(figures) == len(rho)
    query = f"select count(*) from '{results / 'tables/metrics.parquet'}'"
    assert duckdb.sql(query).fetchall() == [(len(metrics),)]
    assert list((results / "plots").glob("*__vs_n_pairs.png"))
    assert (tiny_run / layout.log("aggregate", "tables")).exists()
    assert (tiny_run / layout.benchmark("aggregate", "tables")).exists()


def test_token_stores_hold_only_the_chosen_layers(tiny_run):
    results = tiny_run / "results"
    choices = json.loads((results / "similarity/vit/minilm/layers.json").read_text())["choices"]
    for encoder, side, splits in (
        ("vit", "vision", ("train", "val", "test")),
        ("minilm", "text", ("train", "val", "test", "prompts")),
    ):
        chosen = {str(choices[c][f"{side}_layer"]) for c in ("last", "best")}
        for split in splits:
            marker = tiny_run / layout.tokens_marker("tiny", split, encoder)
            assert set(json.loads(marker.read_text())["layers"]) == chosen
            for layer in chosen:
                directory = layout.tokens_dir("tiny", split, encoder)
                store = TokenStore.open(tiny_run / layout.token_store(directory, int(layer)))
                assert store.attrs["dtype"] == "float16" and store.layer == int(layer)
    run = json.loads((results / "aligners/vit/minilm/pal/best/n96_s0/params.json").read_text())
    assert run["aligner"] == "pal" and set(run["meta"]["token_fingerprints"]) == {
        "vision_train",
        "text_train",
        "vision_val",
        "text_val",
    }


def test_identical_runs_were_fitted_and_evaluated_once(tiny_run):
    """Each run key fitted by one run folder; the others (procrustes_again, ``best`` where it
    chose the ``last`` layers) copied that fit and its evaluation: same weights, same rows."""
    results = tiny_run / "results"
    runs = sorted((results / "aligners").glob("*/*/*/*/n*_s*"))
    params = {run: json.loads((run / "params.json").read_text()) for run in runs}
    fitted = {p["fit"]["run_key"]: run for run, p in params.items() if not p["fit"]["reused_from"]}
    assert len(fitted) == len({p["fit"]["run_key"] for p in params.values()})  # one fit per key
    assert len(fitted) < len(runs)
    metrics = read_metrics(results / "tables/metrics.parquet")
    labels = ["method", "layer_choice"]

    def rows(run: Path) -> pl.DataFrame:
        meta = params[run]["meta"]
        n_pairs, seed = meta["n_pairs"], meta["seed"]
        of_run = (pl.col("method") == meta["method"]) & (
            pl.col("layer_choice") == meta["layer_choice"]
        )
        of_run &= (pl.col("n_pairs") == n_pairs) & (pl.col("seed") == seed)
        return metrics.filter(of_run).drop(labels).sort(pl.all())

    reused = [run for run, p in params.items() if p["fit"]["reused_from"]]
    assert {params[run]["meta"]["method"] for run in reused} >= {"procrustes_again"}
    for run in reused:
        original = fitted[params[run]["fit"]["run_key"]]
        assert tiny_run / params[run]["fit"]["reused_from"] == original
        assert (run / "weights.safetensors").read_bytes() == (
            original / "weights.safetensors"
        ).read_bytes()
        assert len(rows(run)) > 0 and rows(run).equals(rows(original))


def test_verify_finds_every_store_and_run_intact(tiny_run):
    result = run(["-m", "pipeline", "verify", "--results", "results"], cwd=tiny_run)
    assert result.returncode == 0, result.output[-3000:]
    assert "no problems found" in result.output


def test_second_run_does_nothing(tiny_run):
    result = snakemake(tiny_run)
    assert result.returncode == 0, result.output[-3000:]
    assert "Nothing to be done" in result.output


def test_html_report(tiny_run):
    result = snakemake(tiny_run, "--report", "results/report.html")
    assert result.returncode == 0, result.output[-3000:]
    assert (tiny_run / "results/report.html").stat().st_size > 10_000
    assert "sweep__vit__minilm__" in (tiny_run / "results/report.html").read_text()


def test_forcerun_of_a_stage_reruns_only_what_depends_on_it(tiny_run):
    jobs = planned_jobs(tiny_run, "--forcerun", "compare_layers")
    assert "extract_features" not in jobs and "prepare_dataset" not in jobs
    assert jobs["compare_layers"] == 1
    assert jobs["extract_tokens"] == TOKEN_SETS  # the layer choice is read when they run
    assert jobs["fit_aligners"] == jobs["evaluate_aligners"] == 2 * len(METHODS)


def test_changing_one_methods_hyperparameter_reruns_only_that_method(tiny_run, tmp_path):
    changed = copy.deepcopy(TINY)
    changed["align"]["methods"]["csa"]["sim_dim"] = 3
    write_config(tiny_run, changed)
    try:
        jobs = planned_jobs(tiny_run)
    finally:
        write_config(tiny_run, TINY)
    assert jobs == {
        "fit_aligners": 2,
        "evaluate_aligners": 2,
        "aggregate": 1,
        "publish": 1,
        "all": 1,
    }


def test_without_snakemakes_records_a_changed_hyperparameter_still_reruns(copy_of_run):
    """Results copied without .snakemake/ (a new clone, a cluster's scratch disk): Snakemake
    cannot compare params, but each job's spec record is an input, rewritten when its spec
    changes, so only what the edit changes reruns."""
    shutil.rmtree(copy_of_run / ".snakemake")
    assert planned_jobs(copy_of_run) == {}
    changed = copy.deepcopy(TINY)
    changed["align"]["methods"]["asif"]["k"] = 3
    write_config(copy_of_run, changed)
    assert planned_jobs(copy_of_run) == {
        "fit_aligners": 2,
        "evaluate_aligners": 2,
        "aggregate": 1,
        "publish": 1,
        "all": 1,
    }
    record = copy_of_run / layout.spec_record("fit_aligners", "vit", "minilm", "asif", "best")
    assert json.loads(record.read_text())["params"]["k"] == 3


def test_a_second_run_from_scratch_gives_the_same_bytes(tiny_run, tmp_path):
    """Another folder, another process (another hash seed): the chain through every kind of
    stage (pretraining, preparation, feature and token extraction, the layer comparison, a
    trained head with STRUCTURE, its evaluation on every task) gives the same files. Only one
    method's chain is run again: each method's fit is deterministic for its seed
    (tests/test_align_methods.py, test_pal.py) and the aggregate reads the evaluations only."""
    write_config(tmp_path, TINY)
    evaluation = layout.evaluation("vit", "minilm", "linear_structure", "last")
    outcomes = layout.outcomes("vit", "minilm", "linear_structure", "last")
    result = snakemake(tmp_path, evaluation, outcomes)
    assert result.returncode == 0, result.output[-3000:]
    assert result.output.count("rule fit_aligners:") == 1  # the one chain, not the grid
    assert read_metrics(tiny_run / evaluation).equals(read_metrics(tmp_path / evaluation))
    for path in (layout.pretrained_weights("vit"), evaluation, outcomes):
        assert filecmp.cmp(tiny_run / path, tmp_path / path, shallow=False), path


def test_invalid_config_fails_before_any_job(tmp_path):
    write_config(tmp_path, {**TINY, "runtime": {"device": "cpu", "batch_size": -1}})
    result = snakemake(tmp_path)
    assert result.returncode != 0
    assert "config key 'runtime.batch_size'" in result.output
    assert not (tmp_path / "results").exists()


def test_a_stage_by_hand_gives_what_its_rule_gave(copy_of_run):
    """``python -m pipeline <stage> --config ... <wildcards>`` derives the rule's very job."""
    output = copy_of_run / layout.evaluation("vit", "minilm", "csa", "best")
    from_rule = output.read_bytes()
    output.unlink()
    result = run(
        [
            "-m",
            "pipeline",
            "evaluate_aligners",
            "--config",
            "config.yaml",
            "--pair",
            "vit/minilm",
            "--method",
            "csa",
            "--choice",
            "best",
        ],
        cwd=copy_of_run,
    )
    assert result.returncode == 0, result.output[-3000:]
    assert output.read_bytes() == from_rule


def test_a_configfile_replaces_the_default_config(tmp_path):
    """--configfile in the repository root, beside the default config.yaml: its two methods
    run, not the default's seven merged in (a dry run: nothing is written)."""
    config = copy.deepcopy(TINY)
    config["align"]["methods"] = {m: TINY["align"]["methods"][m] for m in ("linear", "csa")}
    config["sweep"]["method"] = "csa"
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(config))
    command = ["-m", "snakemake", "--dry-run", "--cores", "1", "--configfile", str(other)]
    result = run(command, cwd=ROOT)
    assert result.returncode == 0, result.output[-3000:]
    assert re.search(r"^fit_aligners\s+4$", result.output, re.MULTILINE), result.output[-2000:]
    assert re.search(r"^sweep_layers\s+1$", result.output, re.MULTILINE), result.output[-2000:]


def test_a_missing_chunk_fails_the_stage_that_reads_it(copy_of_run):
    store = "results/features/tiny/train/vit.zarr"
    (copy_of_run / store / "layers/0/c/0/0").unlink()
    result = snakemake(copy_of_run, "--forcerun", "compare_layers")
    assert result.returncode != 0
    log = (copy_of_run / layout.log("compare_layers", "vit", "minilm")).read_text()
    assert "MissingChunkError" in log and store in log and "layers/0" in log


def test_an_emptied_token_shard_fails_the_evaluation_that_reads_it(copy_of_run):
    """Issue 22: a 0-byte shard of a full block (the tiny test split is one block) read as
    zeros, and a forced evaluation exited 0 with changed segmentation rows."""
    token_set = copy_of_run / layout.tokens_dir("tiny", "test", "vit")
    last = max(token_set.glob("layer_*.zarr"), key=lambda path: int(path.stem.split("_")[1]))
    shard = f"{layout.tokens_dir('tiny', 'test', 'vit')}/{last.name}/tokens/c/0/0"
    (copy_of_run / shard).write_bytes(b"")
    # the evaluation store would hand the forced job the rows computed before the damage (the
    # same key: same weights and inputs); without it the job reads the shard
    shutil.rmtree(copy_of_run / layout.RESULTS / layout.EVALUATION_STORE)
    result = snakemake(copy_of_run, "--force", layout.evaluation("vit", "minilm", "csa", "last"))
    assert result.returncode != 0
    log = (
        copy_of_run / layout.log("evaluate_aligners", "vit", "minilm", "csa", "last")
    ).read_text()
    assert f"shard {shard} is 0 bytes" in log, log[-3000:]
    verified = run(["-m", "pipeline", "verify", "--results", "results"], cwd=copy_of_run)
    assert verified.returncode == 1 and f"shard {shard} is 0 bytes" in verified.output


def test_the_report_refuses_a_truncated_table(copy_of_run):
    """Issue 22: Snakemake goes by dates, so a truncated table was embedded in the report."""
    metrics = copy_of_run / layout.METRICS_TABLE
    metrics.write_bytes(metrics.read_bytes()[:-200])
    assert "Nothing to be done" in snakemake(copy_of_run).output  # Snakemake alone: no
    result = snakemake(copy_of_run, "report")
    assert result.returncode != 0
    assert f"PROBLEM {layout.METRICS_TABLE}" in result.output, result.output[-3000:]
    assert "metrics.parquet cannot be read" in result.output
    assert "--forcerun aggregate" in result.output


def test_forcing_an_align_job_refits_its_runs(copy_of_run):
    job = layout.aligner_runs("vit", "minilm", "csa", "best")
    weights = copy_of_run / Path(job).parent / "n24_s0" / "weights.safetensors"
    before = (weights.stat().st_mtime_ns, weights.read_bytes())
    result = snakemake(copy_of_run, "--force", job)
    assert result.returncode == 0, result.output[-3000:]
    assert weights.stat().st_mtime_ns != before[0]  # rewritten...
    assert weights.read_bytes() == before[1]  # ...to the same, deterministic weights


def test_a_deleted_run_is_noticed(copy_of_run):
    run = copy_of_run / layout.aligner_dir("vit", "minilm", "asif", "last") / "n96_s1"
    (run / "done.json").unlink()
    jobs = planned_jobs(copy_of_run, "align")
    assert jobs == {"fit_aligners": 1, "align": 1}


def test_an_absent_device_fails_before_any_job(copy_of_run):
    config = copy.deepcopy(TINY)
    config["runtime"]["device"] = "cuda:99"
    write_config(copy_of_run, config)
    marker = copy_of_run / layout.feature_marker("tiny", "train", "vit")
    result = snakemake(copy_of_run)
    assert result.returncode != 0
    assert "config key 'runtime.device'" in result.output
    assert marker.exists()  # nothing was deleted to make room for a job


def test_settings_that_cannot_change_numbers_rerun_nothing(copy_of_run):
    config = copy.deepcopy(TINY)
    config["runtime"]["num_workers"] = 3  # image loaders only
    config["align"]["threads"] = 2  # CPU threads only
    write_config(copy_of_run, config)
    assert planned_jobs(copy_of_run) == {}


def test_sharded_extraction_gives_the_same_stores(copy_of_run):
    """runtime.extract_shards = 2 (and blocks of a few rows): each store and token set of a
    dataset split is written by two shard jobs and completed by its own job; the values are
    the one-job stores' and sets'."""
    config = copy.deepcopy(TINY)
    config["runtime"] |= {"extract_shards": 2, "chunk_mb": 0.001}  # blocks of a few rows
    write_config(copy_of_run, config)
    planned = planned_jobs(copy_of_run, "extract")
    assert planned == {"extract_features_shard": 2 * 6, "extract_features": 6 + 1, "extract": 1}
    stores = [copy_of_run / f"results/features/tiny/train/{e}.zarr" for e in ("vit", "minilm")]
    before = [
        [FeatureStore.open(s).read(layer) for layer in range(FeatureStore.open(s).num_layers)]
        for s in stores
    ]
    token_set = copy_of_run / "results/tokens/tiny/train/vit"
    token_stores = sorted(token_set.glob("layer_*.zarr"))
    rows = np.arange(TokenStore.open(token_stores[0]).n_samples)
    tokens_before = [TokenStore.open(path).read(rows)[0] for path in token_stores]
    targets = [f"{s.relative_to(copy_of_run)}.done" for s in stores]
    targets.append(f"{token_set.relative_to(copy_of_run)}.done")
    result = snakemake(copy_of_run, *targets)
    assert result.returncode == 0, result.output[-3000:]
    assert result.output.count("rule extract_features_shard:") == 4
    assert result.output.count("rule extract_tokens_shard:") == 2
    for path, values in zip(token_stores, tokens_before, strict=True):
        made = TokenStore.open(path)
        assert made.integrity_problems() == []
        np.testing.assert_allclose(made.read(rows)[0], values, rtol=1e-3, atol=1e-3)
    assert json.loads((token_set.parent / "vit.done").read_text())["layers"]
    for path, layers in zip(stores, before, strict=True):
        made = FeatureStore.open(path)
        assert json.loads((path.parent / f"{path.name}.done").read_text())["shards"] == 2
        assert made.group["block_complete"].shape[0] >= 2 and made.integrity_problems() == []
        for layer, values in enumerate(layers):
            # other blocks, so other batches: equal up to float32 rounding (the unit test
            # tests/test_extract.py shows 3 shards bit-identical to 1 at the same blocks)
            np.testing.assert_allclose(made.read(layer), values, rtol=1e-5, atol=1e-6)


def published(results: Path) -> dict[str, bytes]:
    """Every table and figure the user and the report read, by path."""
    return {
        str(path.relative_to(results)): path.read_bytes()
        for folder in ("tables", "plots")
        for path in sorted((results / folder).rglob("*"))
        if path.is_file() and path.name != ".snakemake_timestamp"
    }


def test_a_bad_evaluation_table_keeps_the_published_tables(copy_of_run):
    """A NaN in one evaluation table: the aggregate fails naming the file and row; every table
    (the sweep's too) and plot published before is still there, unchanged (Snakemake deletes
    only the aggregate's staged outputs), and the next run tries the aggregate again."""
    results = copy_of_run / "results"
    before = published(results)
    assert {"tables/sweep.parquet", "tables/sweep_rho.parquet"} <= set(before)
    assert sum(name.startswith("plots/") for name in before) > 20
    table = layout.evaluation("vit", "minilm", "csa", "best")
    frame = pl.read_parquet(copy_of_run / table)
    nan = pl.when(pl.int_range(pl.len()) == 3).then(float("nan")).otherwise(pl.col("value"))
    frame.with_columns(value=nan).write_parquet(copy_of_run / table)
    result = snakemake(copy_of_run)
    assert result.returncode != 0
    log = (copy_of_run / layout.log("aggregate", "tables")).read_text()
    assert f"table {table}: column 'value' has NaN or infinite values in 1 rows" in log
    assert "first row 3 (vision_encoder=vit" in log
    assert published(results) == before
    assert planned_jobs(copy_of_run) == {"aggregate": 1, "publish": 1, "all": 1}


def test_an_edited_run_is_named_by_verify_and_refused_by_evaluation(copy_of_run):
    """``meta.vision_layer`` edited in a PAL run's params.json (to a layer its token sets do not
    hold): verify names the run and its refit; a forced evaluation refuses the run by its
    record, not by telling the user to extract the token set again."""
    cell = ("vit", "minilm", "pal", "best")
    run_dir = Path(layout.aligner_dir(*cell)) / "n24_s0"
    params = json.loads((copy_of_run / run_dir / "params.json").read_text())
    held = {
        int(path.name.removeprefix("layer_").removesuffix(".zarr"))
        for path in (copy_of_run / "results/tokens/tiny/test/vit").glob("layer_*.zarr")
    }
    params["meta"]["vision_layer"] = min(set(range(3)) - held)
    (copy_of_run / run_dir / "params.json").write_text(json.dumps(params, indent=2))
    result = run(["-m", "pipeline", "verify", "--results", "results"], cwd=copy_of_run)
    assert result.returncode == 1, result.output[-3000:]
    assert f"PROBLEM {run_dir}\n" in result.output
    assert f"params.json of run {run_dir} does not match its record" in result.output
    assert f"--forcerun {layout.aligner_runs(*cell)}" in result.output
    result = snakemake(copy_of_run, "--force", layout.evaluation(*cell))
    assert result.returncode != 0
    log = (copy_of_run / layout.log("evaluate_aligners", *cell)).read_text()
    assert f"params.json of run {run_dir} does not match its record" in log
    assert "extract_tokens" not in log
