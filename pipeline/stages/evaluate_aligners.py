"""The evaluate stage: every run of one (encoder pair, method, layer choice) on every task.

Each run embeds the split's images once, its captions and the dataset's prompts when a task
needs them, then scores every task from those embeddings (tasks are named
``<dataset>.<task>``):
- zero-shot classification: class embeddings from the prompts (text store of the ``prompts``
  pseudo-split), logits 100 x the aligner's similarity;
- retrieval: the split's images against its captions;
- segmentation: the patch tokens of the run's vision layer (a token store), scored against the
  same class embeddings: through PAL's anchors for PAL, through the image map for every pooled
  method (the patch baseline); mIoU over the whole split.

A pooled aligner reads feature stores (and, for segmentation, the vision token set); a token
aligner (PAL) reads token sets for everything, batch by batch. The job also writes a few
predicted label maps of its example run (the largest n_pairs, its smallest seed) for the
report's figure, and the per-item hits of every classification and retrieval metric of every
run (the outcomes table: the aggregate's bootstrap over test images). The aggregate stage
concatenates the per-job tables into ``results/tables/metrics.parquet``, ``summary.parquet``
and ``comparisons.parquet`` and draws the plots.

Identical evaluations once: each run's evaluation on a split is filed in the evaluation store
``results/by_key/evaluations/`` (``pipeline.reuse``) under its key (``evaluation_key``: the
fitted aligner's state, its layers, the split's inputs, the code), and a run of another job
with the same key (a fit reused from another cell, ``align.grid``) takes those rows, relabelled
with its own method and layer choice, instead of evaluating again.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from pipeline import layout
from pipeline.align.artifacts import load_aligner, read_params
from pipeline.align.kinds import uses_tokens
from pipeline.atomic import write_parquet
from pipeline.data import load_prompts, load_split, load_tasks, read_manifest
from pipeline.data.tasks import (
    CLASSIFICATION,
    IGNORE_INDEX,
    RETRIEVAL,
    SEGMENTATION,
    Task,
)
from pipeline.evaluate.intervals import Hits
from pipeline.evaluate.retrieval import retrieval_outcomes
from pipeline.evaluate.segmentation import segment, segmentation_metrics
from pipeline.evaluate.tables import (
    RunKey,
    concat_metrics,
    concat_outcomes,
    metric_rows,
    outcome_rows,
    read_metrics,
    read_outcomes,
    write_metrics,
    write_outcomes,
)
from pipeline.evaluate.zeroshot import class_embeddings_of, classification_outcomes, logits_of
from pipeline.fingerprint import arrays_digest, spec_hash
from pipeline.jobs import Job
from pipeline.pairs import pair_rows
from pipeline.reuse import KeyedFolders
from pipeline.stores.inputs import TokenSet, open_input
from pipeline.stores.tokens import StoreTokens
from pipeline.versions import code_version

log = logging.getLogger(__name__)
EXAMPLES_PER_TASK = 4  # label maps kept per segmentation task for the report
EXAMPLE_SCHEMA = {
    "vision_encoder": pl.String,
    "text_encoder": pl.String,
    "method": pl.String,
    "layer_choice": pl.String,
    "n_pairs": pl.Int64,
    "seed": pl.Int64,
    "task": pl.String,
    "image_row": pl.Int64,
    "image_id": pl.String,
    "height": pl.Int64,
    "width": pl.Int64,
    "labels": pl.Binary,
}
RUN = re.compile(r"n(\d+)_s(-?\d+)")
METRICS, OUTCOMES, EXAMPLES = "metrics.parquet", "outcomes.parquet", "examples.parquet"  # filed


def example_run(runs: list[str]) -> str | None:
    """The run whose label maps the job keeps: the largest n_pairs, then the smallest seed."""
    parsed = [(int(m[1]), -int(m[2]), name) for name in runs if (m := RUN.fullmatch(name))]
    return max(parsed)[2] if parsed else None


def run(job: Job) -> None:
    runs_json = job.input("runs")
    aligner_dir = Path(runs_json).parent
    runs = json.loads(Path(runs_json).read_text())["runs"]
    tokens = uses_tokens(job.spec["aligner"])
    keep = example_run(runs)
    store = KeyedFolders(layout.evaluation_store(job.output("metrics")))
    frames, examples, outcomes = [], [], []
    for i, split in enumerate(job.spec["splits"]):
        dataset = f"dataset_{i}"
        features = {w: open_input(job, f"{w}_{i}", dataset) for w in ("vision", "text", "prompts")}
        patches = (
            open_input(job, f"patches_{i}", dataset)
            if f"patches_{i}" in job.inputs
            else features["vision"]
            if tokens
            else None
        )
        inputs = SplitInputs(
            index=i,
            dataset=split["dataset"],
            split=split["split"],
            tasks=split.get("tasks"),
            dataset_dir=Path(layout.dataset_of_manifest(job.input(dataset))),
            features=features,
            tokens=tokens,
            patches=patches,
        )
        for run in tqdm(runs, desc=f"evaluate {aligner_dir.parent.name}/{aligner_dir.name}"):
            evaluation = evaluate_run(aligner_dir / run, inputs, run == keep, store)
            frames += evaluation.metrics
            examples += evaluation.examples
            outcomes += evaluation.outcomes
    write_metrics(concat_metrics(frames), job.output("metrics"))
    write_outcomes(concat_outcomes(outcomes), job.output("outcomes"))
    write_parquet(pl.DataFrame(examples, schema=EXAMPLE_SCHEMA), job.output("examples"))


class SplitInputs:
    """What an evaluation split provides, read once and shared by every run.

    ``features``: the vision, text and prompts features: feature stores (pooled aligners) or
    token sets (``tokens``: a token aligner); ``patches``: the vision token set segmentation
    reads (None when the split has no segmentation task); ``kinds``: the task kinds to score
    (default: every kind)."""

    def __init__(
        self,
        *,
        index: int,
        dataset: str,
        split: str,
        tasks: list[str] | None,
        dataset_dir: Path,
        features: dict[str, Any],
        tokens: bool,
        patches: TokenSet | None,
        kinds: Collection[str] | None = None,
    ) -> None:
        self.dataset, self.split = dataset, split
        self.content_hash = read_manifest(dataset_dir)["content_hash"]
        data = load_split(dataset_dir, split)
        self.data = data
        self.images = data.images
        self.caption_image = pair_rows(data.images, data.captions).image_rows
        self.features = features
        self.tokens = tokens
        self.patches = patches
        self.prompts = load_prompts(dataset_dir).with_row_index("row")
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
        if kinds is not None:
            available = [t for t in available if t.kind in kinds]
        if any(t.kind == SEGMENTATION for t in available) and patches is None:
            raise ValueError(
                f"{dataset}/{split} has a segmentation task but the job reads no vision token "
                "set for it (the workflow plans one from pipeline.data.segmentation_tasks)"
            )
        self.tasks = available
        self._layers: dict[tuple[str, int], Any] = {}
        self._masks: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {}

    def source(self, which: str, layer: int) -> Any:
        """All rows of one layer of the vision, text or prompts features: a float32 array read
        once (pooled) or a token source read batch by batch (tokens)."""
        key = (which, layer)
        if key not in self._layers:
            if self.tokens:
                self._layers[key] = StoreTokens(self.features[which].layer(layer))
            else:
                self._layers[key] = self.features[which].read(layer)
        return self._layers[key]

    def forget(self, which: str) -> None:
        """Drop the layers of the vision, text or prompts features read so far (memory)."""
        self._layers = {key: value for key, value in self._layers.items() if key[0] != which}

    def fingerprint(self, vision_layer: int, text_layer: int) -> dict[str, Any]:
        """What evaluating a run at these layers reads of the split: the dataset's content, the
        split, its tasks, and the fingerprints of the stores read (a token set's, of the layer)."""
        layers = {"vision": vision_layer, "text": text_layer, "prompts": text_layer}
        sources = {which: (self.features[which], layer) for which, layer in layers.items()}
        if any(task.kind == SEGMENTATION for task in self.tasks):
            sources["patches"] = (self.patches, vision_layer)
        return {
            "dataset": self.dataset,
            "split": self.split,
            "content_hash": self.content_hash,
            "tasks": [asdict(task) for task in self.tasks],
            "stores": {
                which: source.fingerprint_of(layer)
                if isinstance(source, TokenSet)
                else source.fingerprint
                for which, (source, layer) in sources.items()
            },
        }

    def masks(self, task: Task) -> tuple[np.ndarray, list[np.ndarray]]:
        """Image rows of a segmentation task (those with a mask) and their masks, checked."""
        if task.name not in self._masks:
            paths = self.images[task.label_column]
            rows = np.flatnonzero(paths.is_not_null().to_numpy())
            masks = []
            for row in rows.tolist():
                mask = self.data.open_mask(row, task.label_column)
                bad = (mask >= len(task.classnames)) & (mask != IGNORE_INDEX)
                if bad.any():
                    raise ValueError(
                        f"{self.dataset} task {task.name!r}: the mask of image "
                        f"{self.images['image_id'][row]!r} holds class {int(mask[bad].max())}, "
                        f"but the task has {len(task.classnames)} classes (and {IGNORE_INDEX} "
                        "= ignore)"
                    )
                masks.append(mask)
            self._masks[task.name] = (rows, masks)
        return self._masks[task.name]


@dataclass
class Evaluation:
    """One run on one split: metric rows, (``examples``) a few predicted label maps of each
    segmentation task, and the outcomes rows of every classification and retrieval metric."""

    metrics: list[pl.DataFrame] = field(default_factory=list)
    examples: list[dict[str, Any]] = field(default_factory=list)
    outcomes: list[pl.DataFrame] = field(default_factory=list)


def evaluate_run(
    run_dir: Path, inputs: SplitInputs, examples: bool = False, store: KeyedFolders | None = None
) -> Evaluation:
    """The evaluation of one aligner run on every task of one split; with an evaluation
    ``store``, the one filed under its key when there is one (relabelled as this run's),
    else evaluated and filed."""
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
    if store is None:
        return evaluate_aligner(aligner, key, inputs, examples)
    content = evaluation_key(params, aligner.state(), key, inputs, examples)
    with store.claim(content) as entry:
        if entry is not None:
            try:
                found = read_evaluation(entry, key)
            except Exception as error:  # a damaged entry is only a cache miss
                log.warning("%s: evaluation %s unusable (%s); evaluating", run_dir, entry, error)
            else:
                log.info("%s on %s: reused evaluation %s", run_dir, inputs.split, content[:12])
                return found
        result = evaluate_aligner(aligner, key, inputs, examples)
        if result.metrics:  # a split without tasks has nothing to file
            store.put(content, lambda folder: write_evaluation(result, folder))
    return result


def evaluation_key(
    params: dict[str, Any],
    state: dict[str, np.ndarray],
    key: RunKey,
    inputs: SplitInputs,
    examples: bool,
) -> str:
    """The content key of a run's evaluation on a split: the fitted aligner (kind,
    hyperparameters, a digest of each state array), its layers, what it reads of the split
    (``SplitInputs.fingerprint``), the label maps kept, and the code version."""
    return spec_hash(
        {
            "aligner": params["aligner"],
            "hyperparameters": params["hyperparameters"],
            "state": {name: arrays_digest(state[name]) for name in sorted(state)},
            "split": inputs.fingerprint(key.vision_layer, key.text_layer),
            "examples": EXAMPLES_PER_TASK if examples else 0,
            "code": code_version(),
        }
    )


def write_evaluation(evaluation: Evaluation, folder: Path) -> None:
    """An evaluation's rows as three tables in ``folder`` (an evaluation store's entry)."""
    write_metrics(concat_metrics(evaluation.metrics), folder / METRICS)
    write_outcomes(concat_outcomes(evaluation.outcomes), folder / OUTCOMES)
    write_parquet(pl.DataFrame(evaluation.examples, schema=EXAMPLE_SCHEMA), folder / EXAMPLES)


def read_evaluation(folder: Path, key: RunKey | None) -> Evaluation:
    """The evaluation filed in ``folder``, its rows labelled as run ``key``'s (None: as filed)."""
    labels = asdict(key) if key is not None else {}

    def relabel(frame: pl.DataFrame) -> pl.DataFrame:
        names = [name for name in labels if name in frame.columns]
        return frame.with_columns(pl.lit(labels[n], dtype=frame.schema[n]).alias(n) for n in names)

    return Evaluation(
        metrics=[relabel(read_metrics(folder / METRICS))],
        examples=relabel(pl.read_parquet(folder / EXAMPLES)).to_dicts(),
        outcomes=[relabel(read_outcomes(folder / OUTCOMES))],
    )


def evaluate_aligner(
    aligner: Any, key: RunKey, inputs: SplitInputs, examples: bool = False
) -> Evaluation:
    """The evaluation of a fitted aligner (the run ``key`` names, whose layers it reads) on
    every task of one split."""
    image_emb = aligner.embed_image(inputs.source("vision", key.vision_layer))
    caption_emb = _once(lambda: aligner.embed_text(inputs.source("text", key.text_layer)))
    prompt_emb = _once(lambda: aligner.embed_text(inputs.source("prompts", key.text_layer)))
    result = Evaluation()
    for task in inputs.tasks:
        name = f"{inputs.dataset}.{task.name}"
        hits: dict[str, Hits] = {}
        if task.kind == RETRIEVAL:
            scores = aligner.similarity(image_emb, caption_emb())
            hits = retrieval_outcomes(scores, inputs.caption_image)
        elif task.kind == CLASSIFICATION:
            labels = inputs.images[task.label_column].to_numpy()
            member = labels >= 0  # -1: the image is not part of this task
            logits = logits_of(aligner, image_emb[member], _class_emb(inputs, task, prompt_emb()))
            hits = classification_outcomes(logits, labels[member], np.flatnonzero(member))
        elif task.kind == SEGMENTATION:
            images, masks = inputs.masks(task)
            store = inputs.patches.layer(key.vision_layer)
            class_emb = _class_emb(inputs, task, prompt_emb())
            keep = EXAMPLES_PER_TASK if examples else 0
            confusion, maps = segment(aligner, store, class_emb, images, masks, keep)
            metrics = _finite(name, segmentation_metrics(confusion, background=task.background))
            result.examples += [
                {
                    **{k: v for k, v in vars(key).items() if k in EXAMPLE_SCHEMA},
                    "task": name,
                    "image_row": int(row),
                    "image_id": inputs.images["image_id"][int(row)],
                    "height": labels.shape[0],
                    "width": labels.shape[1],
                    "labels": labels.tobytes(),
                }
                for row, labels in zip(images, maps, strict=False)
            ]
        else:
            raise ValueError(f"{name}: task kind {task.kind!r} has no evaluation")
        if hits:
            metrics = {metric: outcome.value() for metric, outcome in hits.items()}
            result.outcomes.append(outcome_rows(key, name, task.kind, hits))
        result.metrics.append(metric_rows(key, name, task.kind, metrics))
    return result


def _class_emb(inputs: SplitInputs, task: Task, prompt_emb: np.ndarray) -> np.ndarray:
    prompts = inputs.prompts.filter(pl.col("task") == task.name)
    return class_embeddings_of(
        prompt_emb[prompts["row"].to_numpy()],
        prompts["class_index"].to_numpy(),
        len(task.classnames),
    )


def _once(compute: Callable[[], np.ndarray]) -> Callable[[], np.ndarray]:
    """``compute`` called on first use only (a split without captions never embeds them)."""
    value: list[np.ndarray] = []

    def get() -> np.ndarray:
        if not value:
            value.append(compute())
        return value[0]

    return get


def _finite(task: str, metrics: dict[str, float]) -> dict[str, float]:
    """The metrics that are defined (mIoU of no class at all is not), the others logged."""
    undefined = sorted(k for k, v in metrics.items() if not np.isfinite(v))
    if undefined:
        log.warning("%s: %s undefined (no class with a non-empty union), left out", task, undefined)
    return {k: v for k, v in metrics.items() if np.isfinite(v)}
