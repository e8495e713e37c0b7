# Shared helpers: config validation (before any job), result paths, target lists.
import json

from pipeline.config import validate_config

# Validate once at parse time: a bad key fails here, before any job runs.
VALID = validate_config(config)
config.update(VALID)

EXPERIMENT = config["experiment"]
PAIRS = EXPERIMENT["pairs"]
NAME = "[A-Za-z0-9][A-Za-z0-9_-]*"


wildcard_constraints:
    dataset=NAME,
    split=NAME,
    encoder=NAME,


def dataset_dir(dataset):
    return f"results/datasets/{dataset}"


def feature_store(dataset, split, encoder):
    return f"results/features/{dataset}/{split}/{encoder}.zarr"


def feature_marker(dataset, split, encoder):
    """The completion marker Snakemake tracks; the store sits beside it (see pipeline/store.py)."""
    return feature_store(dataset, split, encoder) + ".done"


def paired_splits():
    """(dataset, split) of every split whose images and captions are both encoded."""
    refs = [EXPERIMENT["train"], EXPERIMENT["val"], *EXPERIMENT["evaluate"]]
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


def extract_spec(wildcards):
    """The slice of the config an extraction job depends on (a change reruns only that job)."""
    spec = {"encoder": config["encoders"][wildcards.encoder], "runtime": config["runtime"]}
    return json.dumps(spec, sort_keys=True)


def wants_gpu(device):
    return 0 if device == "cpu" else int(device.startswith("cuda"))
