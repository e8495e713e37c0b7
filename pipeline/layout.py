"""Where every output lives: the one place that knows the ``results/`` layout (docs/formats.md).

Snakemake rules build their input and output patterns from these functions (called with
``"{wildcard}"`` placeholders, they give the rule's patterns) and the Python stages receive
the paths they read and write from the rules, so no file name is spelled twice.
"""

from __future__ import annotations

RESULTS = "results"
STORE_SUFFIX = ".zarr"  # a feature or token store: one Zarr group
RUNS_JSON = "runs.json"  # an align job's declared output, beside its runs
MARKER_SUFFIX = ".done"  # a store's completion marker sits beside it (pipeline/stores/core.py)
LOCK_SUFFIX = ".lock"  # shard jobs of one store take turns on it
RUN_MARK = ".in_progress"  # a job's folder while the job works (token sets, aligner runs)
SHARD_RUN_SUFFIX = ".running"  # beside a shard job's marker while the shard works

METRICS_TABLE = f"{RESULTS}/tables/metrics.parquet"
SUMMARY_TABLE = f"{RESULTS}/tables/summary.parquet"
COMPARISONS_TABLE = f"{RESULTS}/tables/comparisons.parquet"  # paired differences, intervals
SWEEP_TABLE = f"{RESULTS}/tables/sweep.parquet"  # every sweep row with its layer pair's similarity
SWEEP_RHO_TABLE = f"{RESULTS}/tables/sweep_rho.parquet"  # Spearman's rho of the sweep
PLOTS_DIR = f"{RESULTS}/plots"
REPORT = f"{RESULTS}/report.html"
# SHA-256 of local weights by (path, size, mtime, ctime, inode): a cache, never a result
# (``fingerprint.content_sha256``); deleting it only costs hashing again.
HASH_CACHE = f"{RESULTS}/.cache/sha256.json"
STAGING = f"{RESULTS}/staging"  # the aggregate's outputs, before `publish` copies them out


def staged(path: str) -> str:
    """Where the aggregate writes a table or the plots that ``publish`` then copies to ``path``
    (Snakemake deletes a job's outputs before it runs and when it fails: not the published)."""
    return f"{STAGING}/{path.removeprefix(f'{RESULTS}/')}"


def dataset_dir(dataset: str) -> str:
    return f"{RESULTS}/datasets/{dataset}"


def dataset_manifest(dataset: str) -> str:
    """The prepared dataset's ``manifest.json``, written last (pipeline/data/manifest.py)."""
    return f"{dataset_dir(dataset)}/manifest.json"


def dataset_of_manifest(manifest: str) -> str:
    """The prepared dataset folder of a ``manifest.json`` path."""
    return manifest.rsplit("/", 1)[0]


def pretrained_weights(encoder: str) -> str:
    """An encoder's self-supervised weights (safetensors; ``pipeline/pretrain.py``)."""
    return f"{RESULTS}/pretrained/{encoder}.safetensors"


def pretrain_record(encoder: str) -> str:
    """The pretraining's record beside its weights (``weights_record``): settings, loss curve,
    time, the weights' SHA-256."""
    return weights_record(pretrained_weights(encoder))


def weights_record(weights: str) -> str:
    """The record beside self-supervised weights written here: their name with ``.json``."""
    return weights.rpartition(".")[0] + ".json"


def store_marker(store: str) -> str:
    """The completion marker beside a feature store or token store (written last)."""
    return f"{store}{MARKER_SUFFIX}"


def store_lock(store: str) -> str:
    """The lock file the shard jobs of one store take turns on."""
    return f"{store}{LOCK_SUFFIX}"


def run_mark(folder: str) -> str:
    """The mark of a job working in ``folder`` (a token set's, an align job's)."""
    return f"{folder}/{RUN_MARK}"


def shard_run_mark(shard_marker: str) -> str:
    """The mark of a shard job working towards ``shard_marker``."""
    return shard_marker.removesuffix(MARKER_SUFFIX) + SHARD_RUN_SUFFIX


def feature_store(dataset: str, split: str, encoder: str) -> str:
    return f"{RESULTS}/features/{dataset}/{split}/{encoder}{STORE_SUFFIX}"


def feature_marker(dataset: str, split: str, encoder: str) -> str:
    """The store's completion marker: what Snakemake tracks (pipeline/stores/core.py says why)."""
    return store_marker(feature_store(dataset, split, encoder))


def store_of_marker(marker: str) -> str:
    """The feature store beside a completion marker."""
    if not marker.endswith(MARKER_SUFFIX):
        raise ValueError(f"{marker} is not a feature store's completion marker (*.zarr.done)")
    return marker.removesuffix(MARKER_SUFFIX)


def feature_shard_marker(dataset: str, split: str, encoder: str, shard: str) -> str:
    """The marker of one shard job of a store (``shard``: "<k>-of-<n>", k from 1): its run of
    the store's blocks is written (``runtime.extract_shards``)."""
    return f"{feature_store(dataset, split, encoder)}.shard-{shard}{MARKER_SUFFIX}"


def is_shard_marker(marker: str) -> bool:
    """Whether ``marker`` is a shard job's marker (of a feature store or a token set)."""
    return ".shard-" in marker.rpartition("/")[2]


def store_of_shard_marker(marker: str) -> str:
    """The feature store a shard marker belongs to."""
    store, sep, shard = marker.rpartition(".shard-")
    if not sep or not store.endswith(".zarr") or not shard.endswith(MARKER_SUFFIX):
        raise ValueError(f"{marker} is not a shard marker (*.zarr.shard-<k>-of-<n>.done)")
    return store


def tokens_dir(dataset: str, split: str, encoder: str) -> str:
    """The token set of one (dataset, split, encoder): one token store per chosen layer
    (``pipeline.stores.tokens``), written by one ``extract_tokens`` job."""
    return f"{RESULTS}/tokens/{dataset}/{split}/{encoder}"


def tokens_marker(dataset: str, split: str, encoder: str) -> str:
    """The token set's completion marker (JSON: its layers), the extract_tokens job's output."""
    return tokens_dir(dataset, split, encoder) + MARKER_SUFFIX


def tokens_dir_of_marker(marker: str) -> str:
    if not marker.endswith(MARKER_SUFFIX) or marker.endswith(".zarr" + MARKER_SUFFIX):
        raise ValueError(f"{marker} is not a token set's completion marker (<encoder>.done)")
    return marker.removesuffix(MARKER_SUFFIX)


def tokens_shard_marker(dataset: str, split: str, encoder: str, shard: str) -> str:
    """The marker of one shard job of a token set (``shard``: "<k>-of-<n>"): its run of the
    blocks of every chosen layer's store is written (``runtime.extract_shards``)."""
    return f"{tokens_dir(dataset, split, encoder)}.shard-{shard}{MARKER_SUFFIX}"


def tokens_dir_of_shard_marker(marker: str) -> str:
    """The token set folder a shard marker belongs to."""
    folder, sep, shard = marker.rpartition(".shard-")
    if not sep or folder.endswith(".zarr") or not shard.endswith(MARKER_SUFFIX):
        raise ValueError(f"{marker} is not a token set's shard marker (<encoder>.shard-*.done)")
    return folder


def token_store(tokens_directory: str, layer: int) -> str:
    """The token store of one layer inside a token set's folder."""
    return f"{tokens_directory}/layer_{int(layer)}{STORE_SUFFIX}"


TOKEN_STORE_FILES = "layer_*.zarr*"  # glob of a token set's stores, markers and locks


def similarity_dir(vision: str, text: str) -> str:
    return f"{RESULTS}/similarity/{vision}/{text}"


def similarity_table(vision: str, text: str) -> str:
    return f"{similarity_dir(vision, text)}/similarity.parquet"


def layers_json(vision: str, text: str) -> str:
    return f"{similarity_dir(vision, text)}/layers.json"


def heatmap(vision: str, text: str, metric: str) -> str:
    return f"{similarity_dir(vision, text)}/heatmaps/{metric}.png"


def pool_size_plot(vision: str, text: str) -> str:
    """Every similarity metric against the scoring pool size (``similarity.pool_sizes``)."""
    return f"{similarity_dir(vision, text)}/by_pool_size.png"


def sweep_table(vision: str, text: str) -> str:
    """The layer sweep's metric rows of one encoder pair (``pipeline.stages.sweep_layers``)."""
    return f"{similarity_dir(vision, text)}/sweep.parquet"


def aligner_dir(vision: str, text: str, method: str, choice: str) -> str:
    """One align job's folder: ``runs.json`` and a folder per run (``pipeline.pairs.run_name``)."""
    return f"{RESULTS}/aligners/{vision}/{text}/{method}/{choice}"


def aligner_runs(vision: str, text: str, method: str, choice: str) -> str:
    """The align job's declared output, written after all its runs."""
    return f"{aligner_dir(vision, text, method, choice)}/{RUNS_JSON}"


# content-addressed results under a results folder (pipeline.reuse): fits and evaluations
RUN_STORE, EVALUATION_STORE = "by_key/runs", "by_key/evaluations"


def run_store(runs_json: str) -> str:
    """The content-addressed fits (``<key>/`` per run key) of the results folder that an align
    job's ``runs.json`` is in (``<results>/aligners/<v>/<t>/<method>/<choice>/runs.json``)."""
    return f"{_results_of(runs_json, 6)}/{RUN_STORE}"


def evaluation_store(table: str) -> str:
    """The content-addressed evaluations (``<key>/`` per run and split) of the results folder
    that an evaluation table is in (``<results>/evaluation/<v>/<t>/<method>/<choice>.parquet``)."""
    return f"{_results_of(table, 5)}/{EVALUATION_STORE}"


def _results_of(path: str, depth: int) -> str:
    parts = path.split("/")
    if len(parts) <= depth:
        raise ValueError(f"{path} is not {depth} levels under a results folder")
    return "/".join(parts[:-depth]) or "/"


def evaluation(vision: str, text: str, method: str, choice: str) -> str:
    return f"{RESULTS}/evaluation/{vision}/{text}/{method}/{choice}.parquet"


def segmentation_examples(vision: str, text: str, method: str, choice: str) -> str:
    """A few predicted label maps of one evaluate job (its example run), for the report."""
    return f"{RESULTS}/evaluation/{vision}/{text}/{method}/{choice}.examples.parquet"


def spec_record(rule: str, *wildcards: str) -> str:
    """The spec of one job as its rule asks for it now: an input of the job, rewritten only
    when the spec changes (workflow/rules/common.smk, docs/architecture.md "Rerun semantics")."""
    return "/".join((f"{RESULTS}/specs/{rule}", *wildcards)) + ".json"


def made_record(spec_record: str) -> str:
    """Beside a spec record: the hash of the spec the job's outputs were made with."""
    return spec_record.removesuffix(".json") + ".made.json"


def outcomes(vision: str, text: str, method: str, choice: str) -> str:
    """Per-item hits of one evaluate job's runs (the aggregate's bootstrap over test images)."""
    return f"{RESULTS}/evaluation/{vision}/{text}/{method}/{choice}.outcomes.parquet"


def log(rule: str, *parts: str) -> str:
    return "/".join((f"{RESULTS}/logs/{rule}", *parts)) + ".log"


def benchmark(rule: str, *parts: str) -> str:
    return "/".join((f"{RESULTS}/benchmarks/{rule}", *parts)) + ".tsv"
