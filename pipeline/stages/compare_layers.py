"""The ``compare_layers`` stage of one encoder pair: table, heatmaps and the layer choice.

Reads the pair's training-split feature stores and writes the job's outputs:

- ``table``: every metric for every (vision layer, text layer) on the scoring pool
  (``similarity.pool_size`` training pairs drawn with ``similarity.seed``) and on its nested
  sub-pools (``similarity.pool_sizes``), with the permutation null, calibrated score and
  bootstrap interval of each (``similarity.permutations``, ``bootstrap``, ``level``);
- ``heatmaps``: one figure per metric with the chosen layers marked;
- ``by_pool_size``: every metric's best and last layer pair against the pool size;
- ``layers``: ``layers.json``, the layer choice. With ``scope: pool`` one choice from the
  pool serves every run. With ``scope: run`` each grid run gets a choice made only from the
  pairs that run may see.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline import atomic, layout
from pipeline.data import load_split
from pipeline.jobs import Job
from pipeline.pairs import grid_runs, split_pairs
from pipeline.similarity.calibration import CalibrationSettings
from pipeline.similarity.compute import FULL, compute_similarity
from pipeline.similarity.plots import write_heatmap, write_pool_size_plot
from pipeline.similarity.selection import scoring_pairs, select_layers, write_layer_choice
from pipeline.stores.inputs import open_input

log = logging.getLogger(__name__)


def run(job: Job) -> None:
    spec, grid = job.spec["similarity"], job.spec["grid"]
    vision, text = open_input(job, "vision", "train"), open_input(job, "text", "train")
    data = load_split(
        Path(layout.dataset_of_manifest(job.input("train"))), job.spec["train"]["split"]
    )
    pairs = split_pairs(data.images, data.captions, job.spec["train"]["captions"])
    names = {
        "vision_encoder": vision.attrs["encoder"]["name"],
        "text_encoder": text.attrs["encoder"]["name"],
    }

    calibration = CalibrationSettings(
        spec["permutations"], spec["bootstrap"], spec["level"], spec["selection"]
    )

    def scores(pool, metrics, seed, pool_sizes=(FULL,), calibration=calibration, progress=True):
        if "mutual_knn" in metrics and spec["knn_k"] != "rice" and spec["knn_k"] >= len(pool):
            raise ValueError(
                f"config key 'similarity.knn_k': {spec['knn_k']} neighbours need more scoring "
                f"pairs than the {len(pool)} this pool has (one caption per image)"
            )
        return compute_similarity(
            vision.path,
            text.path,
            pool,
            metrics,
            spec["knn_k"],
            sample_seed=seed,
            progress=progress,
            pool_sizes=pool_sizes,
            preprocess=spec["preprocess"],
            calibration=calibration,
            **names,
        )

    pool = scoring_pairs(pairs, "pool", spec["pool_size"], spec["seed"])
    log.info(
        "scoring %d layer pairs on a pool of %d pairs",
        vision.num_layers * text.num_layers,
        len(pool),
    )
    table = scores(pool, spec["metrics"], spec["seed"], spec["pool_sizes"])
    atomic.write_parquet(table, job.output("table"))
    select = {"quantile_bins": spec["quantile_bins"], "statistic": spec["selection"]}
    choice = select_layers(table, spec["selection_metric"], **select)
    choice["scope"], choice["level"] = spec["scope"], spec["level"]
    if spec["scope"] == "run":
        # A run's own choice is calibrated only when the selection needs it (the cost is per run).
        per_run = calibration if spec["selection"] == "calibrated" else CalibrationSettings()
        choice["runs"] = {}
        for run in grid_runs(grid["n_pairs"], grid["seeds"], len(pairs)):
            visible = scoring_pairs(pairs, "run", spec["pool_size"], run.seed, run.n_pairs)
            run_table = scores(
                visible, [spec["selection_metric"]], run.seed, calibration=per_run, progress=False
            )
            choice["runs"][run.name] = select_layers(run_table, spec["selection_metric"], **select)
    for path in job.output_list("heatmaps"):
        write_heatmap(table, Path(path).stem, path, choice)
    write_pool_size_plot(table, job.output("by_pool_size"), spec["selection"])
    write_layer_choice(job.output("layers"), choice)
