"""The evaluate stage: every run of one (encoder pair, method, layer choice) on every task.

Zero-shot classification embeds the dataset's prompts (text store of the ``prompts``
pseudo-split); retrieval scores the split's images against its captions. Tasks are named
``<dataset>.<task>``. The aggregate stage concatenates the per-job tables into
``results/tables/metrics.parquet`` and ``summary.parquet`` and draws the plots.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from pipeline import layout
from pipeline.align import load_aligner
from pipeline.align.artifacts import read_params
from pipeline.data import load_prompts, load_split, load_tasks
from pipeline.data.tasks import CLASSIFICATION, RETRIEVAL
from pipeline.evaluate.retrieval import retrieval_metrics, retrieval_scores
from pipeline.evaluate.tables import RunKey, concat_metrics, metric_rows, write_metrics
from pipeline.evaluate.zeroshot import zero_shot_classification
from pipeline.jobs import Job
from pipeline.pairs import pair_rows
from pipeline.store import FeatureStore

log = logging.getLogger(__name__)


def run_evaluate(job: Job) -> None:
    runs_json = job.input("runs")
    aligner_dir = Path(runs_json).parent
    runs = json.loads(Path(runs_json).read_text())["runs"]
    frames = []
    for i, split in enumerate(job.spec["splits"]):
        inputs = SplitInputs(
            index=i,
            dataset=split["dataset"],
            split=split["split"],
            tasks=split.get("tasks"),
            dataset_dir=Path(layout.dataset_of_manifest(job.input(f"dataset_{i}"))),
            stores={
                which: job.feature_store(f"{which}_{i}", f"dataset_{i}")
                for which in ("vision", "text", "prompts")
            },
        )
        for run in tqdm(runs, desc=f"evaluate {aligner_dir.parent.name}/{aligner_dir.name}"):
            frames += evaluate_run(aligner_dir / run, inputs)
    write_metrics(concat_metrics(frames), job.output("metrics"))


class SplitInputs:
    """What an evaluation split provides, read once and shared by every run."""

    def __init__(
        self,
        *,
        index: int,
        dataset: str,
        split: str,
        tasks: list[str] | None,
        dataset_dir: Path,
        stores: dict[str, FeatureStore],
    ) -> None:
        self.dataset = dataset
        data = load_split(dataset_dir, split)
        self.images = data.images
        self.caption_image = pair_rows(data.images, data.captions).image_rows
        self.stores = stores
        self.prompts = load_prompts(dataset_dir)
        available = [t for t in load_tasks(dataset_dir) if t.split == split]
        if tasks is not None:
            unknown = sorted(set(tasks) - {t.name for t in available})
            if unknown:
                raise ValueError(
                    f"config key 'experiment.evaluate.{index}.tasks': "
                    f"{dataset}/{split} has no task {unknown} "
                    f"(tasks: {sorted(t.name for t in available)})"
                )
            available = [t for t in available if t.name in tasks]
        self.tasks = available
        self._layers: dict[tuple[str, int], np.ndarray] = {}

    def features(self, which: str, layer: int) -> np.ndarray:
        """All rows of one layer of the vision, text or prompts store (cached per layer)."""
        key = (which, layer)
        if key not in self._layers:
            self._layers[key] = self.stores[which].read(layer)
        return self._layers[key]


def evaluate_run(run_dir: Path, inputs: SplitInputs) -> list[pl.DataFrame]:
    """Metric rows of one aligner run on every task of one split."""
    params = read_params(run_dir)
    meta = params["meta"]
    key = RunKey(
        vision_encoder=meta["vision_encoder"],
        text_encoder=meta["text_encoder"],
        method=meta["method"],
        layer_choice=meta["layer_choice"],
        vision_layer=meta["vision_layer"],
        text_layer=meta["text_layer"],
        n_pairs=meta["n_pairs"],
        seed=meta["seed"],
    )
    aligner = load_aligner(run_dir)
    images = inputs.features("vision", key.vision_layer)
    dataset = inputs.dataset
    rows = []
    for task in inputs.tasks:
        name = f"{dataset}.{task.name}"
        if task.kind == RETRIEVAL:
            captions = inputs.features("text", key.text_layer)
            scores = retrieval_scores(aligner, images, captions)
            rows.append(
                metric_rows(key, name, RETRIEVAL, retrieval_metrics(scores, inputs.caption_image))
            )
        elif task.kind == CLASSIFICATION:
            labels = inputs.images[task.label_column].to_numpy()
            member = labels >= 0  # -1: the image is not part of this task
            prompts = inputs.prompts.with_row_index("row").filter(pl.col("task") == task.name)
            prompt_features = inputs.features("prompts", key.text_layer)[prompts["row"].to_numpy()]
            metrics = zero_shot_classification(
                aligner,
                images[member],
                labels[member],
                prompt_features,
                prompts["class_index"].to_numpy(),
                len(task.classnames),
            )
            rows.append(metric_rows(key, name, CLASSIFICATION, metrics))
        else:
            raise ValueError(f"{name}: task kind {task.kind!r} has no evaluation")
    return rows
