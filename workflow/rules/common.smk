# Shared helpers: config validation (before any job), result paths, job specs, target lists.
import json
import os

from pipeline.config import validate_config

# Validate once at parse time: a bad key fails here, before any job runs.
config.update(validate_config(config))

EXPERIMENT = config["experiment"]
PAIRS = EXPERIMENT["pairs"]
TRAIN, VAL = EXPERIMENT["train"], EXPERIMENT["val"]
ALIGN = config["align"]
NAME = "[A-Za-z0-9][A-Za-z0-9_-]*"
STORE_ROLES = ("vision_train", "text_train", "vision_val", "text_val")


wildcard_constraints:
    dataset=NAME,
    split=NAME,
    encoder=NAME,
    vision=NAME,
    text=NAME,
    method=NAME,
    choice="last|best|q[0-9.]+",


# ---- paths -------------------------------------------------------------------------------


def dataset_dir(dataset):
    return f"results/datasets/{dataset}"


def feature_store(dataset, split, encoder):
    return f"results/features/{dataset}/{split}/{encoder}.zarr"


def feature_marker(dataset, split, encoder):
    """The completion marker Snakemake tracks; the store sits beside it (see pipeline/store.py)."""
    return feature_store(dataset, split, encoder) + ".done"


def store_of(marker):
    return marker.removesuffix(".done")


def train_marker(encoder):
    return feature_marker(TRAIN["dataset"], TRAIN["split"], encoder)


def layers_json(vision, text):
    return f"results/similarity/{vision}/{text}/layers.json"


def aligner_runs(vision, text, method, choice):
    return f"results/aligners/{vision}/{text}/{method}/{choice}/runs.json"


# ---- targets -----------------------------------------------------------------------------


def paired_splits():
    """(dataset, split) of every split whose images and captions are both encoded."""
    refs = [TRAIN, VAL, *EXPERIMENT["evaluate"]]
    return sorted({(ref["dataset"], ref["split"]) for ref in refs})


def feature_targets():
    """Every feature store the experiment reads: both encoders of each pair on every paired
    split, plus the text encoder on the zero-shot prompts of each evaluation dataset."""
    targets = set()
    for pair in PAIRS:
        for dataset, split in paired_splits():
            targets.add(feature_marker(dataset, split, pair["vision"]))
            targets.add(feature_marker(dataset, split, pair["text"]))
        for ref in EXPERIMENT["evaluate"]:
            targets.add(feature_marker(ref["dataset"], "prompts", pair["text"]))
    return sorted(targets)


def grid_cells():
    """(vision, text, method, layer choice) of every align (and evaluate) job."""
    return [
        (pair["vision"], pair["text"], method, choice)
        for pair in PAIRS
        for method in ALIGN["methods"]
        for choice in ALIGN["layer_choices"]
    ]


def aligner_targets():
    return [aligner_runs(*cell) for cell in grid_cells()]


def evaluation_targets():
    return [
        f"results/evaluation/{vision}/{text}/{method}/{choice}.parquet"
        for vision, text, method, choice in grid_cells()
    ]


# ---- job inputs and specs (each job's slice of the config: a change reruns only it) -------


def extract_spec(wildcards):
    spec = {"encoder": config["encoders"][wildcards.encoder], "runtime": config["runtime"]}
    return json.dumps(spec, sort_keys=True)


def grid_spec():
    return {key: ALIGN[key] for key in ("n_pairs", "seeds", "threads")}


def similarity_spec(wildcards):
    spec = config["similarity"]
    grid = grid_spec() if spec["scope"] == "run" else None  # pool scope ignores the grid
    return json.dumps({"similarity": spec, "grid": grid, "train": TRAIN}, sort_keys=True)


def align_inputs(wildcards):
    vision, text = wildcards.vision, wildcards.text
    return {
        "vision_train": train_marker(vision),
        "text_train": train_marker(text),
        "vision_val": feature_marker(VAL["dataset"], VAL["split"], vision),
        "text_val": feature_marker(VAL["dataset"], VAL["split"], text),
        "layers": layers_json(vision, text),
        "train": f"{dataset_dir(TRAIN['dataset'])}/manifest.json",
        "val": f"{dataset_dir(VAL['dataset'])}/manifest.json",
    }


def align_spec(wildcards):
    spec = {"method": ALIGN["methods"][wildcards.method], "grid": grid_spec(), "val": VAL}
    return json.dumps(spec, sort_keys=True)


def evaluate_inputs(wildcards):
    vision, text = wildcards.vision, wildcards.text
    inputs = {"runs": aligner_runs(vision, text, wildcards.method, wildcards.choice)}
    for i, ref in enumerate(EXPERIMENT["evaluate"]):
        dataset, split = ref["dataset"], ref["split"]
        inputs[f"vision_{i}"] = feature_marker(dataset, split, vision)
        inputs[f"text_{i}"] = feature_marker(dataset, split, text)
        inputs[f"prompts_{i}"] = feature_marker(dataset, "prompts", text)
    return inputs


def evaluate_spec(wildcards):
    vision, text = wildcards.vision, wildcards.text
    splits = [
        {
            "dataset": ref["dataset"],
            "split": ref["split"],
            "dataset_dir": dataset_dir(ref["dataset"]),
            "vision_store": feature_store(ref["dataset"], ref["split"], vision),
            "text_store": feature_store(ref["dataset"], ref["split"], text),
            "prompt_store": feature_store(ref["dataset"], "prompts", text),
            "tasks": ref.get("tasks"),
        }
        for ref in EXPERIMENT["evaluate"]
    ]
    return json.dumps({"splits": splits}, sort_keys=True)


def wants_gpu(device):
    return int(device.startswith("cuda"))
