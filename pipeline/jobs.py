"""Every job of the DAG as (spec, inputs, outputs), derived from the validated config.

The Snakemake rules (``workflow/rules/common.smk``) and the by-hand command line
(``python -m pipeline <stage> --config config.yaml ...``) both call these functions, so a
stage run by hand gets exactly the spec and paths a rule would pass it. A job's spec is only
its slice of the config: Snakemake reruns a job when its spec changes, and no other job.
Torch-free: the workflow is read without importing model code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline import layout
from pipeline.align.kinds import uses_tokens
from pipeline.stores import keys

PROMPTS_SPLIT = "prompts"  # the text-only pseudo-split of a dataset's zero-shot prompts
# Runtime settings an extraction job is told; ``num_workers`` is not one: it only sets how
# many of the job's threads load images, so editing it reruns nothing.
EXTRACT_RUNTIME = ("device", "precision", "batch_size", "chunk_mb", "on_stale")
PRETRAIN_THREADS = 2  # torch threads of a pretraining job (recorded: they set rounding order)
TOKEN_RUNTIME = ("device", "precision", "batch_size", "on_stale")  # chunks: the tokens section


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
    """The ``request`` a reading job expects of a feature store (``keys.request_hash``)."""
    precision = config["runtime"]["precision"]
    spec = split_encoder_spec(config, dataset, split, encoder)
    return keys.request_hash(keys.FEATURES, encoder, spec, dataset, split, precision)


def token_request(config: dict[str, Any], dataset: str, split: str, encoder: str) -> str:
    """The ``request`` a reading job expects of a token set's stores (``keys.request_hash``)."""
    precision, dtype = config["runtime"]["precision"], config["tokens"]["dtype"]
    spec = split_encoder_spec(config, dataset, split, encoder)
    return keys.request_hash(keys.TOKENS, encoder, spec, dataset, split, precision, dtype=dtype)


def encoder_spec(config: dict[str, Any], encoder: str) -> dict[str, Any]:
    """The spec an encoder is built from: one with a ``pretrain`` block loads the weights its
    ``pretrain_encoder`` job writes (the block stays, so editing it changes the spec; the
    weights are checked against their record when loaded); one with local weights carries
    their SHA-256, so rewriting them changes the spec (``registry.planned_spec``)."""
    spec = config["encoders"][encoder]
    if "pretrain" in spec:
        from pipeline.pretrain import pretrained_spec

        return pretrained_spec(spec, layout.pretrained_weights(encoder))
    from pipeline.encoders.registry import planned_spec

    return planned_spec(encoder, spec)


def split_encoder_spec(
    config: dict[str, Any], dataset: str, split: str, encoder: str
) -> dict[str, Any]:
    """The spec an encoder reads one dataset split with: a timm encoder sees a split with a
    segmentation task through ``segmentation.view`` (docs/pal.md, "Segmentation geometry"),
    every extraction of it alike, so all methods' numbers on the split see the same pixels."""
    spec = encoder_spec(config, encoder)
    if split == PROMPTS_SPLIT or spec["source"] != "timm":  # the one source with patch tokens
        return spec
    from pipeline.data import segmentation_tasks as dataset_tasks

    found = dataset_tasks(dataset, config["datasets"][dataset])
    if not any(task_split == split for _, task_split in found):
        return spec
    return {**spec, "view": config["segmentation"]["view"]}


def weights_input(config: dict[str, Any], encoder: str) -> dict[str, str]:
    """``{"weights": path}`` of an encoder's local weights file, the one its pretrain_encoder
    job writes (extraction waits for it and follows its modification time) or a user's
    ``weights`` (known by the SHA-256 in the spec: the rules mark it ``ancient``), else {}."""
    spec = config["encoders"][encoder]
    if "pretrain" in spec:
        return {"weights": layout.pretrained_weights(encoder)}
    return {"weights": str(spec["weights"])} if spec.get("weights") else {}


def modality(config: dict[str, Any], encoder: str) -> str:
    """ "vision" or "text": the modality of a configured encoder (from its source, torch-free)."""
    from pipeline.encoders.registry import SOURCES

    return SOURCES[config["encoders"][encoder]["source"]].modality


def aligner_kind(config: dict[str, Any], method: str) -> str:
    return config["align"]["methods"][method]["aligner"]


def method_uses_tokens(config: dict[str, Any], method: str) -> bool:
    """Whether a method's aligner fits on token caches (PAL) rather than pooled features."""
    return uses_tokens(aligner_kind(config, method))


def segmentation_tasks(config: dict[str, Any], ref: dict[str, Any]) -> list[str]:
    """Names of the segmentation tasks an ``experiment.evaluate`` entry evaluates (its
    dataset's, on its split, kept by its ``tasks`` list when it has one)."""
    from pipeline.data import segmentation_tasks as dataset_tasks

    found = dataset_tasks(ref["dataset"], config["datasets"][ref["dataset"]])
    names = [task for task, split in found if split == ref["split"]]
    if ref.get("tasks") is not None:
        names = [task for task in names if task in ref["tasks"]]
    return names


# ---- jobs ------------------------------------------------------------------------------------


def pretrain_encoder(config: dict[str, Any], encoder: str) -> Job:
    """Self-supervised weights of a timm encoder with a ``pretrain`` block; the dataset's spec
    is in the job's spec (the images are rendered from it, no prepared dataset is read)."""
    spec = config["encoders"][encoder]
    if "pretrain" not in spec:
        raise KeyError(f"encoders.{encoder}.pretrain")
    return Job(
        "pretrain_encoder",
        {
            "encoder_name": encoder,
            "encoder": spec,
            "dataset": config["datasets"][spec["pretrain"]["dataset"]],
        },
        outputs={
            "weights": layout.pretrained_weights(encoder),
            "record": layout.pretrain_record(encoder),
        },
        threads=PRETRAIN_THREADS,
    )


def pretrained_encoders(config: dict[str, Any]) -> list[str]:
    return [name for name, spec in config["encoders"].items() if "pretrain" in spec]


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
    """The store of one (dataset, split, encoder); with more than one shard
    (``extract_shards``) only its completion, after the shard jobs have written its blocks."""
    shards = extract_shards(config, split)
    marker = {"marker": layout.feature_marker(dataset, split, encoder)}
    if shards > 1:
        markers = _shard_markers(layout.feature_shard_marker, dataset, split, encoder, shards)
        return Job("extract_features", {"shards": shards}, {"shards": markers}, marker, threads=1)
    return Job(
        "extract_features",
        _extract_spec(config, dataset, split, encoder),
        inputs={"dataset": layout.dataset_manifest(dataset), **weights_input(config, encoder)},
        outputs=marker,
        threads=extract_threads(config),
    )


def extract_features_shard(
    config: dict[str, Any], dataset: str, split: str, encoder: str, shard: str
) -> Job:
    """Shard ``shard`` ("<k>-of-<n>") of a store: one contiguous run of its blocks."""
    number, shards = _shard_numbers(config, dataset, split, shard)
    spec = {**_extract_spec(config, dataset, split, encoder), "shard": number, "shards": shards}
    return Job(
        "extract_features_shard",
        spec,
        inputs={"dataset": layout.dataset_manifest(dataset), **weights_input(config, encoder)},
        outputs={"shard": layout.feature_shard_marker(dataset, split, encoder, shard)},
        threads=extract_threads(config),
    )


def _extract_spec(config: dict[str, Any], dataset: str, split: str, encoder: str) -> dict[str, Any]:
    runtime = config["runtime"]
    return {
        "encoder_name": encoder,
        "encoder": split_encoder_spec(config, dataset, split, encoder),
        "split": split,
        "runtime": {key: runtime[key] for key in EXTRACT_RUNTIME},
    }


def _shard_markers(
    marker: Callable[[str, str, str, str], str], dataset: str, split: str, encoder: str, n: int
) -> list[str]:
    """The markers of the n shard jobs ("1-of-n" .. "n-of-n") of one store or token set."""
    return [marker(dataset, split, encoder, f"{k}-of-{n}") for k in range(1, n + 1)]


def _shard_numbers(config: dict[str, Any], dataset: str, split: str, shard: str) -> tuple[int, int]:
    """(k, n) of a shard wildcard "<k>-of-<n>", checked against ``runtime.extract_shards``."""
    number, _, of = shard.partition("-of-")
    shards = extract_shards(config, split)
    if not (number.isdigit() and of.isdigit() and 1 <= int(number) <= int(of) == shards):
        raise ValueError(
            f"shard {shard!r}: runtime.extract_shards gives {dataset}/{split} {shards}"
        )
    return int(number), shards


def extract_shards(config: dict[str, Any], split: str) -> int:
    """How many jobs write one feature store or token set: ``runtime.extract_shards`` for a
    dataset split, one for the (small) prompts pseudo-split."""
    return 1 if split == PROMPTS_SPLIT else config["runtime"]["extract_shards"]


def extract_threads(config: dict[str, Any]) -> int:
    """An extraction job's threads: the forward pass plus ``runtime.num_workers`` loaders."""
    return config["runtime"]["num_workers"] + 1


def extract_tokens(config: dict[str, Any], dataset: str, split: str, encoder: str) -> Job:
    """The tokens of the layers chosen for ``encoder`` (read from the ``layers.json`` of every
    pair it is in when the job runs), one forward pass, one token store per layer; with more
    than one shard (``extract_shards``) only the set's completion, after the shard jobs."""
    shards = extract_shards(config, split)
    marker = {"tokens": layout.tokens_marker(dataset, split, encoder)}
    if shards > 1:
        spec = {"encoder_name": encoder, "split": split, "shards": shards}
        markers = _shard_markers(layout.tokens_shard_marker, dataset, split, encoder, shards)
        return Job("extract_tokens", spec, {"shards": markers}, marker, threads=1)
    return Job(
        "extract_tokens",
        _token_spec(config, dataset, split, encoder),
        inputs=_token_inputs(config, dataset, encoder),
        outputs=marker,
        threads=extract_threads(config),
    )


def extract_tokens_shard(
    config: dict[str, Any], dataset: str, split: str, encoder: str, shard: str
) -> Job:
    """Shard ``shard`` ("<k>-of-<n>") of a token set: one run of each layer store's blocks."""
    number, shards = _shard_numbers(config, dataset, split, shard)
    return Job(
        "extract_tokens_shard",
        {**_token_spec(config, dataset, split, encoder), "shard": number, "shards": shards},
        inputs=_token_inputs(config, dataset, encoder),
        outputs={"shard": layout.tokens_shard_marker(dataset, split, encoder, shard)},
        threads=extract_threads(config),
    )


def _token_spec(config: dict[str, Any], dataset: str, split: str, encoder: str) -> dict[str, Any]:
    runtime = config["runtime"]
    return {
        "encoder_name": encoder,
        "encoder": split_encoder_spec(config, dataset, split, encoder),
        "split": split,
        "side": modality(config, encoder),
        "layer_choices": config["align"]["layer_choices"],
        "runtime": {key: runtime[key] for key in TOKEN_RUNTIME},
        "tokens": config["tokens"],
    }


def _token_inputs(config: dict[str, Any], dataset: str, encoder: str) -> dict[str, Any]:
    side = 0 if modality(config, encoder) == "vision" else 1
    pairs = [pair for pair in encoder_pairs(config) if pair[side] == encoder]
    return {
        "dataset": layout.dataset_manifest(dataset),
        "layers": [layout.layers_json(vision, text) for vision, text in pairs],
        **weights_input(config, encoder),
    }


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
            "by_pool_size": layout.pool_size_plot(vision, text),
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
    tokens = method_uses_tokens(config, method)
    markers, requests = _training_features(config, vision, text, tokens)
    inputs = {
        **markers,
        "layers": layout.layers_json(vision, text),
        "train": layout.dataset_manifest(train["dataset"]),
        "val": layout.dataset_manifest(val["dataset"]),
    }
    spec["splits"] = train_val_splits(config)
    spec["tokens" if tokens else "stores"] = requests
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
    """Inputs per evaluate split i: the dataset, then the vision, text and prompts features
    (token sets for a token aligner, pooled stores otherwise) and, for a pooled aligner on a
    split with a segmentation task, the vision token set (``patches_i``) whose patch tokens it
    maps for the patch baseline."""
    refs = experiment(config)["evaluate"]
    tokens = method_uses_tokens(config, method)
    inputs: dict[str, str | list[str]] = {"runs": layout.aligner_runs(vision, text, method, choice)}
    stores: dict[str, str] = {}
    token_sets: dict[str, str] = {}
    for i, ref in enumerate(refs):
        dataset, split = ref["dataset"], ref["split"]
        inputs[f"dataset_{i}"] = layout.dataset_manifest(dataset)
        markers, requests = _evaluation_features(config, i, ref, vision, text, tokens)
        inputs |= markers
        (token_sets if tokens else stores).update(requests)
        if not tokens and segmentation_tasks(config, ref):
            inputs[f"patches_{i}"] = layout.tokens_marker(dataset, split, vision)
            token_sets[f"patches_{i}"] = token_request(config, dataset, split, vision)
    spec = {
        "aligner": aligner_kind(config, method),
        "splits": _evaluation_splits(refs),
        "stores": stores,
        "tokens": token_sets,
    }
    return Job(
        "evaluate_aligners",
        spec,
        inputs=inputs,
        outputs={
            "metrics": layout.evaluation(vision, text, method, choice),
            "examples": layout.segmentation_examples(vision, text, method, choice),
            "outcomes": layout.outcomes(vision, text, method, choice),
        },
    )


def sweep_layers(config: dict[str, Any], vision: str, text: str) -> Job:
    """The layer sweep of one encoder pair: the ``sweep.method`` aligner fitted on the training
    run of ``sweep.n_pairs``/``sweep.seed`` at every layer pair of the sweep grid (read from the
    stores when the job runs) and scored on every evaluate split's classification and retrieval
    tasks. Reads what a pooled method's align and evaluate jobs read, ``layers.json`` aside."""
    sweep = config["sweep"]
    entry = dict(config["align"]["methods"][sweep["method"]])
    exp = experiment(config)
    markers, stores = _training_features(config, vision, text, tokens=False)
    inputs: dict[str, str | list[str]] = {
        **markers,
        "train": layout.dataset_manifest(exp["train"]["dataset"]),
        "val": layout.dataset_manifest(exp["val"]["dataset"]),
    }
    for i, ref in enumerate(exp["evaluate"]):
        inputs[f"dataset_{i}"] = layout.dataset_manifest(ref["dataset"])
        markers, requests = _evaluation_features(config, i, ref, vision, text, tokens=False)
        inputs |= markers
        stores |= requests
    spec = {
        "method": sweep["method"],
        "aligner": entry.pop("aligner"),
        "params": entry,
        "run": {key: sweep[key] for key in ("n_pairs", "seed")},
        "stride": sweep["stride"],
        "splits": train_val_splits(config),
        "evaluate": _evaluation_splits(exp["evaluate"]),
        "stores": stores,
    }
    return Job(
        "sweep_layers",
        spec,
        inputs=inputs,
        outputs={"sweep": layout.sweep_table(vision, text)},
        threads=config["align"]["threads"],
    )


def aggregate(config: dict[str, Any]) -> Job:
    """With a ``sweep`` section it also reads every sweep table and writes the sweep's tables."""
    methods = config["align"]["methods"]
    inputs: dict[str, str | list[str]] = {
        "evaluations": [layout.evaluation(*cell) for cell in grid_cells(config)],
        "examples": [layout.segmentation_examples(*cell) for cell in grid_cells(config)],
        "outcomes": [layout.outcomes(*cell) for cell in grid_cells(config)],
        "similarities": [layout.similarity_table(v, t) for v, t in encoder_pairs(config)],
        "datasets": sorted(
            {layout.dataset_manifest(ref["dataset"]) for ref in experiment(config)["evaluate"]}
        ),
    }
    if has_sweep(config):
        inputs["sweeps"] = sweep_tables(config)
    return Job(
        "aggregate",
        {
            "token_methods": sorted(m for m in methods if method_uses_tokens(config, m)),
            "baselines": structure_baselines(methods),
            "statistics": config["statistics"],
        },
        inputs=inputs,
        outputs={name: layout.staged(path) for name, path in published(config).items()},
    )


def published(config: dict[str, Any]) -> dict[str, str]:
    """The tables and the plots folder the report shows, by name: the aggregate's outputs
    once ``publish`` has copied them out of staging."""
    tables = {
        "metrics": layout.METRICS_TABLE,
        "summary": layout.SUMMARY_TABLE,
        "comparisons": layout.COMPARISONS_TABLE,
        "plots": layout.PLOTS_DIR,
    }
    if has_sweep(config):
        tables |= {"sweep": layout.SWEEP_TABLE, "sweep_rho": layout.SWEEP_RHO_TABLE}
    return tables


def publish(config: dict[str, Any]) -> Job:
    """Copy the aggregate's staged outputs to the tables and plots the report shows."""
    return Job("publish", {}, inputs=aggregate(config).outputs, outputs=published(config))


def structure_baselines(methods: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Method name -> the method it regularises: a method with a ``structure`` entry over the
    method whose entry is the same without it (linear_structure over linear), where one is."""
    baselines = {}
    for name, entry in sorted(methods.items()):
        plain = {k: v for k, v in entry.items() if k != "structure"}
        matches = sorted(
            other for other in methods if "structure" in entry and methods[other] == plain
        )
        if matches:
            baselines[name] = matches[0]
    return baselines


def _training_features(
    config: dict[str, Any], vision: str, text: str, tokens: bool
) -> tuple[dict[str, str], dict[str, str]]:
    """Markers and requests of both encoders' train and val features, in this order (the rule's
    ``inputs`` param): ``vision_train``, ``text_train``, ``vision_val``, ``text_val``; token sets
    (``tokens``) or feature stores."""
    exp = experiment(config)
    marker = layout.tokens_marker if tokens else layout.feature_marker
    request = token_request if tokens else store_request
    roles = [
        (f"{side}_{role}", ref["dataset"], ref["split"], encoder)
        for role, ref in (("train", exp["train"]), ("val", exp["val"]))
        for side, encoder in (("vision", vision), ("text", text))
    ]
    markers = {name: marker(*where) for name, *where in roles}
    requests = {name: request(config, *where) for name, *where in roles}
    return markers, requests


def _evaluation_features(
    config: dict[str, Any], i: int, ref: dict[str, Any], vision: str, text: str, tokens: bool
) -> tuple[dict[str, str], dict[str, str]]:
    """Markers and requests of evaluate split ``i``'s vision, text and prompts features
    (``vision_<i>``, ``text_<i>``, ``prompts_<i>``): token sets (``tokens``) or feature stores."""
    marker = layout.tokens_marker if tokens else layout.feature_marker
    request = token_request if tokens else store_request
    dataset, split = ref["dataset"], ref["split"]
    parts = [
        (f"{which}_{i}", dataset, part, encoder)
        for which, part, encoder in (
            ("vision", split, vision),
            ("text", split, text),
            ("prompts", PROMPTS_SPLIT, text),
        )
    ]
    markers = {name: marker(*where) for name, *where in parts}
    requests = {name: request(config, *where) for name, *where in parts}
    return markers, requests


def train_val_splits(config: dict[str, Any]) -> dict[str, str]:
    """The training and validation splits of a fitting job, with the training captions policy
    (``experiment.train.captions``); validation always keeps one caption per image."""
    train, val = experiment(config)["train"], experiment(config)["val"]
    return {"train": train["split"], "train_captions": train["captions"], "val": val["split"]}


def _evaluation_splits(refs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{key: ref.get(key) for key in ("dataset", "split", "tasks")} for ref in refs]


# ---- what the experiment consists of ----------------------------------------------------------


def encoder_pairs(config: dict[str, Any]) -> list[tuple[str, str]]:
    return [(pair["vision"], pair["text"]) for pair in experiment(config)["pairs"]]


def has_sweep(config: dict[str, Any]) -> bool:
    """Whether the config asks for a layer sweep (a ``sweep`` section)."""
    return config.get("sweep") is not None


def sweep_tables(config: dict[str, Any]) -> list[str]:
    """The sweep table of every encoder pair; none without a ``sweep`` section."""
    if not has_sweep(config):
        return []
    return [layout.sweep_table(vision, text) for vision, text in encoder_pairs(config)]


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


def token_sets(config: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(dataset, split, encoder) of every token set the experiment reads: with a token aligner
    (PAL), both encoders of each pair on every paired split and the text encoder on the prompts
    of each evaluation dataset; and the vision encoder on every evaluation split with a
    segmentation task (the patch baseline of every pooled method)."""
    exp = experiment(config)
    wanted = set()
    tokens = any(method_uses_tokens(config, method) for method in config["align"]["methods"])
    for vision, text in encoder_pairs(config):
        if tokens:
            for dataset, split in paired_splits(config):
                wanted |= {(dataset, split, vision), (dataset, split, text)}
            wanted |= {(ref["dataset"], PROMPTS_SPLIT, text) for ref in exp["evaluate"]}
        for ref in exp["evaluate"]:
            if segmentation_tasks(config, ref):
                wanted.add((ref["dataset"], ref["split"], vision))
    return sorted(wanted)


def token_markers(config: dict[str, Any]) -> list[str]:
    return [layout.tokens_marker(*entry) for entry in token_sets(config)]
