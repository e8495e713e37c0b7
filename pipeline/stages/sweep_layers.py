"""The ``sweep_layers`` stage: downstream accuracy at every layer pair of one encoder pair.

For every (vision layer, text layer) of the sweep grid (``sweep_grid``: every ``stride``-th
layer of each side, the last one always included) the job fits the ``sweep.method`` aligner in
memory on one training run: the nested subset of ``sweep.n_pairs`` pairs of ``sweep.seed``, the
very pairs the grid's run of that size and seed trains on, with the validation pairs for early
stopping, as ``fit_aligners`` does. It scores the aligner on the classification and retrieval
tasks of every evaluate split with the evaluate stage's own code
(``stages.evaluate_aligners.evaluate_aligner``). Segmentation is left out: it reads patch
tokens, which are cached for the chosen layers only.

Output: ``sweep.parquet``, rows of the metrics table (``layer_choice`` = ``sweep``), one per
(layer pair, task, metric). Nothing is saved per layer pair, so a killed job starts over.

Memory: the text side's arrays (training run, validation pairs, evaluated captions and prompts)
of every swept text layer stay in memory for the whole job; the vision side's are read once
per vision layer and dropped after it.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from pipeline import layout
from pipeline.align.grid import compute_threads
from pipeline.align.kinds import build_aligner
from pipeline.data.tasks import CLASSIFICATION, RETRIEVAL
from pipeline.evaluate.tables import RunKey, concat_metrics, write_metrics
from pipeline.jobs import Job
from pipeline.pairs import GridRun, grid_sizes
from pipeline.stages.evaluate_aligners import SplitInputs, evaluate_aligner
from pipeline.stages.fit_aligners import STORE_ROLES, train_val_pairs
from pipeline.stores.inputs import open_input

log = logging.getLogger(__name__)
SWEEP_CHOICE = "sweep"  # the layer_choice of every sweep row
SWEEP_KINDS = (CLASSIFICATION, RETRIEVAL)  # task kinds the sweep scores


def sweep_grid(n_layers: int, stride: int) -> list[int]:
    """Layer indices of one side: every ``stride``-th from 0, and the last layer."""
    if n_layers < 1 or stride < 1:
        raise ValueError(f"a sweep needs layers and a stride >= 1, got {n_layers}, {stride}")
    return sorted({*range(0, n_layers, stride), n_layers - 1})


def training_run(run: dict[str, Any], n_total: int) -> GridRun:
    """The run the sweep fits on (``run``: the spec's ``n_pairs`` and ``seed``)."""
    (n_pairs,) = grid_sizes([run["n_pairs"]], n_total, key="sweep.n_pairs")
    return GridRun(n_pairs, int(run["seed"]))


def run(job: Job) -> None:
    spec = job.spec
    stores = {role: open_input(job, role, role.split("_")[1]) for role in STORE_ROLES}
    train, val = train_val_pairs(job)
    run = training_run(spec["run"], len(train))
    pairs = {"train": train.take(run.rows(len(train))), "val": val}
    splits = [split_inputs(job, i, split) for i, split in enumerate(spec["evaluate"])]
    if not any(inputs.tasks for inputs in splits):
        raise ValueError("the evaluate splits have no classification or retrieval task to sweep")
    vision_layers = sweep_grid(stores["vision_train"].num_layers, spec["stride"])
    text_layers = sweep_grid(stores["text_train"].num_layers, spec["stride"])
    names = {side: stores[f"{side}_train"].attrs["encoder"]["name"] for side in ("vision", "text")}
    log.info(
        "%s at %d x %d layer pairs, run %s; tasks %s",
        spec["method"],
        len(vision_layers),
        len(text_layers),
        run.name,
        [f"{inputs.dataset}.{task.name}" for inputs in splits for task in inputs.tasks],
    )

    @cache
    def text_features(role: str, layer: int) -> np.ndarray:
        return stores[f"text_{role}"].read(layer, pairs[role].caption_rows)

    frames: list[pl.DataFrame] = []
    total = len(vision_layers) * len(text_layers)
    with compute_threads(job.threads), tqdm(total=total, desc="sweep layer pairs") as bar:
        for vision_layer in vision_layers:
            image = {
                role: stores[f"vision_{role}"].read(vision_layer, rows.image_rows)
                for role, rows in pairs.items()
            }
            for text_layer in text_layers:
                aligner = build_aligner(spec["aligner"], spec["params"])
                aligner.fit(
                    image["train"],
                    text_features("train", text_layer),
                    image["val"],
                    text_features("val", text_layer),
                    run.seed,
                )
                key = RunKey(
                    vision_encoder=names["vision"],
                    text_encoder=names["text"],
                    method=spec["method"],
                    layer_choice=SWEEP_CHOICE,
                    vision_layer=vision_layer,
                    text_layer=text_layer,
                    n_pairs=run.n_pairs,
                    seed=run.seed,
                )
                for inputs in splits:
                    frames += evaluate_aligner(aligner, key, inputs).metrics
                bar.update()
            for inputs in splits:
                inputs.forget("vision")
    write_metrics(concat_metrics(frames), job.output("sweep"))


def split_inputs(job: Job, index: int, split: dict[str, Any]) -> SplitInputs:
    """Evaluate split ``index`` of the job, restricted to the task kinds the sweep scores."""
    dataset = f"dataset_{index}"
    return SplitInputs(
        index=index,
        dataset=split["dataset"],
        split=split["split"],
        tasks=split.get("tasks"),
        dataset_dir=Path(layout.dataset_of_manifest(job.input(dataset))),
        features={
            which: open_input(job, f"{which}_{index}", dataset)
            for which in ("vision", "text", "prompts")
        },
        tokens=False,
        patches=None,
        kinds=SWEEP_KINDS,
    )
