"""The evaluate stage: every run of one (encoder pair, method, layer choice) on every task.

Zero-shot classification embeds the dataset's prompts (text store of the ``prompts``
pseudo-split); retrieval scores the split's images against its captions. Tasks are named
``<dataset>.<task>``. The aggregate stage concatenates the per-job tables into
``results/tables/metrics.parquet`` and ``summary.parquet`` and draws the plots.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from pipeline.align import load_aligner
from pipeline.align.artifacts import read_params
from pipeline.data import load_prompts, load_split, load_tasks
from pipeline.data.tasks import CLASSIFICATION, RETRIEVAL
from pipeline.evaluate.retrieval import retrieval_metrics, retrieval_scores
from pipeline.evaluate.tables import RunKey, concat_metrics, metric_rows, write_metrics
from pipeline.evaluate.zeroshot import zero_shot_classification
from pipeline.pairs import pair_rows
from pipeline.store import open_store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSplit:
    """One evaluation split: its prepared dataset and the three feature stores it needs."""

    dataset: str
    split: str
    dataset_dir: Path
    vision_store: Path
    text_store: Path
    prompt_store: Path
    tasks: list[str] | None = None  # None: every task of the split

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> EvalSplit:
        paths = ("dataset_dir", "vision_store", "text_store", "prompt_store")
        return cls(**{k: Path(v) if k in paths else v for k, v in spec.items()})


def run_evaluate(*, aligner_dir: Path, splits: list[EvalSplit], out: Path) -> None:
    aligner_dir = Path(aligner_dir)
    runs = json.loads((aligner_dir / "runs.json").read_text())["runs"]
    frames = []
    for split in splits:
        inputs = SplitInputs(split)
        for run in tqdm(runs, desc=f"evaluate {aligner_dir.parent.name}/{aligner_dir.name}"):
            frames += evaluate_run(aligner_dir / run, inputs)
    write_metrics(concat_metrics(frames), out)


class SplitInputs:
    """What an evaluation split provides, read once and shared by every run."""

    def __init__(self, split: EvalSplit) -> None:
        self.split = split
        data = load_split(split.dataset_dir, split.split)
        self.images = data.images
        self.caption_image = pair_rows(data.images, data.captions).image_rows
        self.vision = open_store(split.vision_store)
        self.text = open_store(split.text_store)
        self.prompt_features = open_store(split.prompt_store)
        self.prompts = load_prompts(split.dataset_dir)
        tasks = [t for t in load_tasks(split.dataset_dir) if t.split == split.split]
        if split.tasks is not None:
            unknown = sorted(set(split.tasks) - {t.name for t in tasks})
            if unknown:
                raise ValueError(
                    f"{split.dataset}/{split.split} has no task {unknown} "
                    f"(tasks: {sorted(t.name for t in tasks)})"
                )
            tasks = [t for t in tasks if t.name in split.tasks]
        self.tasks = tasks
        self._layers: dict[tuple[str, int], np.ndarray] = {}

    def features(self, which: str, layer: int) -> np.ndarray:
        """All rows of one layer of the vision, text or prompt store (cached per layer)."""
        key = (which, layer)
        if key not in self._layers:
            store = {"vision": self.vision, "text": self.text, "prompt": self.prompt_features}
            self._layers[key] = store[which].read(layer)
        return self._layers[key]


def evaluate_run(run_dir: Path, inputs: SplitInputs) -> list[pl.DataFrame]:
    """Metric rows of one aligner run on every task of one split."""
    params = read_params(run_dir)
    meta = params["meta"]
    key = RunKey(
        vision_encoder=meta["vision_encoder"],
        text_encoder=meta["text_encoder"],
        method=meta["method_name"],
        layer_choice=meta["layer_choice"],
        vision_layer=meta["vision_layer"],
        text_layer=meta["text_layer"],
        n_pairs=meta["n_pairs"],
        seed=meta["seed"],
    )
    aligner = load_aligner(run_dir)
    images = inputs.features("vision", key.vision_layer)
    dataset = inputs.split.dataset
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
            prompt_features = inputs.features("prompt", key.text_layer)[prompts["row"].to_numpy()]
            metrics = zero_shot_classification(
                aligner,
                images[member],
                labels[member],
                prompt_features,
                prompts["class_index"].to_numpy(),
                len(task.classnames),
            )
            rows.append(metric_rows(key, name, CLASSIFICATION, metrics))
    return rows
