"""Every job of the DAG as (spec, inputs, outputs), derived from the validated config.

The Snakemake rules (``workflow/rules/common.smk``) and the by-hand command line
(``python -m pipeline <stage> --config config.yaml ...``) both call these functions, so a
stage run by hand gets exactly the spec and paths a rule would pass it. A job's spec is only
its slice of the config: Snakemake reruns a job when its spec changes, and no other job.
Torch-free: the workflow is read without importing model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import layout

PROMPTS_SPLIT = "prompts"  # the text-only pseudo-split of a dataset's zero-shot prompts
# Runtime settings an extraction job is told; ``num_workers`` is not one: it only sets how
# many of the job's threads load images, so editing it reruns nothing.
EXTRACT_RUNTIME = ("device", "precision", "batch_size", "chunk_mb", "on_stale")


@dataclass(frozen=True)
class Job:
    """What one stage invocation is told (``--spec``), reads (``--in``), writes (``--out``) and
    the CPU threads it may use (``--threads``, Snakemake's ``threads``: never a result)."""

    stage: str
    spec: dict[str, Any]
    inputs: dict[str, str | list[str]] = field(default_factory=dict)
    outputs: dict[str, str | list[str]] = field(default_factory=dict)
    threads: int | None = None

    def input(self, name: str) -> str:
        return _single(self.inputs, name, "input")

    def output(self, name: str) -> str:
        return _single(self.outputs, name, "output")

    def feature_store(self, role: str, dataset_role: str):
        """Open input store ``role``, checked to hold what this job's config asks for
        (``spec["stores"][role]``) of the prepared dataset at input ``dataset_role``."""
        from pipeline.data import read_manifest
        from pipeline.store import open_requested

        manifest = read_manifest(Path(layout.dataset_of_manifest(self.input(dataset_role))))
        path = layout.store_of_marker(self.input(role))
        return open_requested(path, self.spec["stores"][role], manifest["content_hash"])

    def input_list(self, name: str) -> list[str]:
        return _many(self.inputs, name, "input")

    def output_list(self, name: str) -> list[str]:
        return _many(self.outputs, name, "output")


def _many(paths: dict[str, str | list[str]], name: str, what: str) -> list[str]:
    if name not in paths:
        raise ValueError(f"the job has no {what} named {name!r} (has {sorted(paths)})")
    path = paths[name]
    return list(path) if isinstance(path, list) else [path]


def _single(paths: dict[str, str | list[str]], name: str, what: str) -> str:
    if name not in paths:
        raise ValueError(f"the job has no {what} named {name!r} (has {sorted(paths)})")
    path = paths[name]
    if isinstance(path, list):
        raise ValueError(f"{what} {name!r} is a list of {len(path)} paths, expected one")
    return path


def experiment(config: dict[str, Any]) -> dict[str, Any]:
    return config["experiment"]


def grid_spec(config: dict[str, Any]) -> dict[str, Any]:
    align = config["align"]
    return {"n_pairs": align["n_pairs"], "seeds": align["seeds"]}


def store_request(config: dict[str, Any], dataset: str, split: str, encoder: str) -> str:
    """The ``request`` a reading job expects of a feature store (``store.request_hash``)."""
    from pipeline.store import request_hash

    precision = config["runtime"]["precision"]
    return request_hash(encoder, config["encoders"][encoder], dataset, split, precision)


# ---- jobs ------------------------------------------------------------------------------------


def prepare_dataset(config: dict[str, Any], dataset: str) -> Job:
    """Inputs: the source files (JSON, class and template files, an image folder's images),
    so that editing, adding or removing one reruns exactly what depends on the dataset."""
    from pipeline.data import source_files

    spec = config["datasets"][dataset]
    return Job(
        "prepare_dataset",
        {"name": dataset, "dataset": spec},
        inputs={"sources": [str(path) for path in source_files(dataset, spec)]},
        outputs={"manifest": layout.dataset_manifest(dataset)},
    )


def extract_features(config: dict[str, Any], dataset: str, split: str, encoder: str) -> Job:
    runtime = config["runtime"]
    spec = {
        "encoder_name": encoder,
        "encoder": config["encoders"][encoder],
        "split": split,
        "runtime": {key: runtime[key] for key in EXTRACT_RUNTIME},
    }
    return Job(
        "extract_features",
        spec,
        inputs={"dataset": layout.dataset_manifest(dataset)},
        outputs={"marker": layout.feature_marker(dataset, split, encoder)},
        threads=extract_threads(config),
    )


def extract_threads(config: dict[str, Any]) -> int:
    """An extraction job's threads: the forward pass plus ``runtime.num_workers`` loaders."""
    return config["runtime"]["num_workers"] + 1


def compare_layers(config: dict[str, Any], vision: str, text: str) -> Job:
    similarity = config["similarity"]
    train = experiment(config)["train"]
    spec = {
        "similarity": similarity,
        "grid": grid_spec(config) if similarity["scope"] == "run" else None,
        "train": train,
        "stores": {
            role: store_request(config, train["dataset"], train["split"], encoder)
            for role, encoder in (("vision", vision), ("text", text))
        },
    }
    return Job(
        "compare_layers",
        spec,
        inputs={
            "vision": layout.feature_marker(train["dataset"], train["split"], vision),
            "text": layout.feature_marker(train["dataset"], train["split"], text),
            "train": layout.dataset_manifest(train["dataset"]),
        },
        outputs={
            "table": layout.similarity_table(vision, text),
            "layers": layout.layers_json(vision, text),
            "heatmaps": [layout.heatmap(vision, text, m) for m in similarity["metrics"]],
        },
    )


def fit_aligners(config: dict[str, Any], vision: str, text: str, method: str, choice: str) -> Job:
    entry = dict(config["align"]["methods"][method])
    train, val = experiment(config)["train"], experiment(config)["val"]
    spec = {
        "method": method,
        "aligner": entry.pop("aligner"),
        "params": entry,
        "layer_choice": choice,
        "grid": grid_spec(config),
    }
    inputs = {
        "vision_train": layout.feature_marker(train["dataset"], train["split"], vision),
        "text_train": layout.feature_marker(train["dataset"], train["split"], text),
        "vision_val": layout.feature_marker(val["dataset"], val["split"], vision),
        "text_val": layout.feature_marker(val["dataset"], val["split"], text),
        "layers": layout.layers_json(vision, text),
        "train": layout.dataset_manifest(train["dataset"]),
        "val": layout.dataset_manifest(val["dataset"]),
    }
    spec["splits"] = {"train": train["split"], "val": val["split"]}
    spec["stores"] = {
        f"{side}_{role}": store_request(config, ref["dataset"], ref["split"], encoder)
        for role, ref in (("train", train), ("val", val))
        for side, encoder in (("vision", vision), ("text", text))
    }
    return Job(
        "fit_aligners",
        spec,
        inputs=inputs,
        outputs={"runs": layout.aligner_runs(vision, text, method, choice)},
        threads=config["align"]["threads"],
    )


def evaluate_aligners(
    config: dict[str, Any], vision: str, text: str, method: str, choice: str
) -> Job:
    refs = experiment(config)["evaluate"]
    inputs: dict[str, str | list[str]] = {"runs": layout.aligner_runs(vision, text, method, choice)}
    for i, ref in enumerate(refs):
        dataset, split = ref["dataset"], ref["split"]
        inputs[f"dataset_{i}"] = layout.dataset_manifest(dataset)
        inputs[f"vision_{i}"] = layout.feature_marker(dataset, split, vision)
        inputs[f"text_{i}"] = layout.feature_marker(dataset, split, text)
        inputs[f"prompts_{i}"] = layout.feature_marker(dataset, PROMPTS_SPLIT, text)
    spec = {
        "splits": [{key: ref.get(key) for key in ("dataset", "split", "tasks")} for ref in refs],
        "stores": {
            f"{which}_{i}": store_request(config, ref["dataset"], split, encoder)
            for i, ref in enumerate(refs)
            for which, split, encoder in (
                ("vision", ref["split"], vision),
                ("text", ref["split"], text),
                ("prompts", PROMPTS_SPLIT, text),
            )
        },
    }
    return Job(
        "evaluate_aligners",
        spec,
        inputs=inputs,
        outputs={"metrics": layout.evaluation(vision, text, method, choice)},
    )


def aggregate(config: dict[str, Any]) -> Job:
    return Job(
        "aggregate",
        {},
        inputs={
            "evaluations": [layout.evaluation(*cell) for cell in grid_cells(config)],
            "similarities": [layout.similarity_table(v, t) for v, t in encoder_pairs(config)],
        },
        outputs={
            "metrics": layout.METRICS_TABLE,
            "summary": layout.SUMMARY_TABLE,
            "plots": layout.PLOTS_DIR,
        },
    )


# ---- what the experiment consists of ----------------------------------------------------------


def encoder_pairs(config: dict[str, Any]) -> list[tuple[str, str]]:
    return [(pair["vision"], pair["text"]) for pair in experiment(config)["pairs"]]


def grid_cells(config: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(vision, text, method, layer choice) of every align (and evaluate) job."""
    align = config["align"]
    return [
        (vision, text, method, choice)
        for vision, text in encoder_pairs(config)
        for method in align["methods"]
        for choice in align["layer_choices"]
    ]


def paired_splits(config: dict[str, Any]) -> list[tuple[str, str]]:
    """(dataset, split) of every split whose images and captions are both encoded."""
    exp = experiment(config)
    refs = [exp["train"], exp["val"], *exp["evaluate"]]
    return sorted({(ref["dataset"], ref["split"]) for ref in refs})


def feature_markers(config: dict[str, Any]) -> list[str]:
    """Every feature store the experiment reads: both encoders of each pair on every paired
    split, plus the text encoder on the zero-shot prompts of each evaluation dataset."""
    markers = set()
    for vision, text in encoder_pairs(config):
        for dataset, split in paired_splits(config):
            markers.add(layout.feature_marker(dataset, split, vision))
            markers.add(layout.feature_marker(dataset, split, text))
        for ref in experiment(config)["evaluate"]:
            markers.add(layout.feature_marker(ref["dataset"], PROMPTS_SPLIT, text))
    return sorted(markers)
