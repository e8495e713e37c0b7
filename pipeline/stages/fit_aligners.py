"""The ``fit_aligners`` stage: one job per (encoder pair, method, layer choice) fits the grid.

Runs choosing the same layer pair share one read of the features and one data digest (a
token aligner, PAL, reads token stores batch by batch instead: ``paired_tokens``); each
run is saved in its own folder (``pipeline.pairs.run_name``) with its own completion marker;
``runs.json`` (the job's declared output) is written last.

Resume or refit: the job marks its folder (``stores.core.RunMark``) while it works. A job that finds
the mark follows one that was killed and keeps the runs it finished; a job that does not
was asked to run again (``--force``/``--forcerun``, a run's ``done.json`` deleted, changed
inputs) and refits every run it holds.

Identical runs once: a run whose key (``align.grid.run_key``) another cell has fitted, in this
job or any other (``best`` on the ``last`` layers, a method entry like another), copies that
fit from the run store ``results/by_key/runs/`` (``pipeline.reuse``) instead of fitting it.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

from tqdm.auto import tqdm

from pipeline import atomic, layout, pairs
from pipeline.align.artifacts import read_params
from pipeline.align.grid import ArrayPairs, TokenPairs, fit_runs
from pipeline.align.kinds import uses_tokens
from pipeline.data import load_split
from pipeline.jobs import Job
from pipeline.pairs import GridRun, Pairs, grid_runs
from pipeline.reuse import KeyedFolders
from pipeline.similarity.selection import chosen_layers, read_layer_choice
from pipeline.stores.core import RunMark
from pipeline.stores.features import FeatureStore
from pipeline.stores.inputs import TokenSet, open_input
from pipeline.stores.tokens import StoreTokens

log = logging.getLogger(__name__)
STORE_ROLES = ("vision_train", "text_train", "vision_val", "text_val")


def load_pairs(manifest: str, split: str, captions: str) -> Pairs:
    """The pairs of a prepared split under a captions policy (``pairs.TRAIN_CAPTIONS``)."""
    data = load_split(Path(layout.dataset_of_manifest(manifest)), split)
    return pairs.split_pairs(data.images, data.captions, captions)


def train_val_pairs(job: Job) -> tuple[Pairs, Pairs]:
    """Training pairs under ``experiment.train.captions``; validation pairs one caption per
    image, so a validation batch never holds an image's sibling captions as false negatives
    (docs/protocols.md)."""
    splits = job.spec["splits"]
    return (
        load_pairs(job.input("train"), splits["train"], splits["train_captions"]),
        load_pairs(job.input("val"), splits["val"], "first"),
    )


def paired_features(
    vision: FeatureStore, text: FeatureStore, pairs: Pairs, layers: tuple[int, int]
):
    """(image features, text features) of ``pairs`` at (vision layer, text layer)."""
    return vision.read(layers[0], pairs.image_rows), text.read(layers[1], pairs.caption_rows)


def paired_tokens(vision: TokenSet, text: TokenSet, pairs: Pairs, layers: tuple[int, int]):
    """Token sources (image, text) of ``pairs`` at (vision layer, text layer): pair i reads
    image row ``pairs.image_rows[i]`` (an image appears once per caption) and caption row
    ``pairs.caption_rows[i]``, batch by batch from the token stores."""
    return (
        StoreTokens(vision.layer(layers[0]), pairs.image_rows),
        StoreTokens(text.layer(layers[1]), pairs.caption_rows),
    )


def run(job: Job) -> None:
    spec = job.spec
    tokens = uses_tokens(spec["aligner"])
    stores = {role: open_input(job, role, role.split("_")[1]) for role in STORE_ROLES}
    train_pairs, val_pairs = train_val_pairs(job)
    layers = read_layer_choice(job.input("layers"))
    choice = spec["layer_choice"]
    runs = grid_runs(spec["grid"]["n_pairs"], spec["grid"]["seeds"], len(train_pairs))

    # Runs on the same layer pair share one read of its features; with ``scope: run`` their
    # choices may carry different scores, recorded per run.
    by_layers: dict[tuple[int, int], dict[float, list[GridRun]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for run in runs:
        chosen = chosen_layers(layers, choice, run)
        key = (int(chosen["vision_layer"]), int(chosen["text_layer"]))
        by_layers[key][chosen["score"]].append(run)

    out_dir = Path(job.output("runs")).parent
    store = KeyedFolders(layout.run_store(job.output("runs")))
    mark = RunMark(layout.run_mark(str(out_dir)))
    fresh = mark.begin()
    log.info("%s the grid's runs", "fitting" if fresh else "resuming")
    with tqdm(total=len(runs), desc=f"{spec['method']}/{choice}") as bar:
        for key, by_score in by_layers.items():
            if tokens:
                train = paired_tokens(
                    stores["vision_train"], stores["text_train"], train_pairs, key
                )
                val = paired_tokens(stores["vision_val"], stores["text_val"], val_pairs, key)
                features = TokenPairs(*train, *val)
                used = {r: stores[r].layer(key[r.startswith("text")]) for r in STORE_ROLES}
                provenance = {"token_fingerprints": {r: s.fingerprint for r, s in used.items()}}
            else:
                train = paired_features(
                    stores["vision_train"], stores["text_train"], train_pairs, key
                )
                val = paired_features(stores["vision_val"], stores["text_val"], val_pairs, key)
                features = ArrayPairs(*train, *val)
                used = stores
                provenance = {"feature_fingerprints": {r: s.fingerprint for r, s in stores.items()}}
            count = sum(len(group) for group in by_score.values())
            log.info("%s/%s: layers %s, %d runs", spec["method"], choice, key, count)
            for score, layer_runs in by_score.items():
                meta = {
                    "vision_encoder": used["vision_train"].attrs["encoder"]["name"],
                    "text_encoder": used["text_train"].attrs["encoder"]["name"],
                    "method": spec["method"],
                    "layer_choice": choice,
                    "vision_layer": key[0],
                    "text_layer": key[1],
                    "layer_score": score,
                    "selection_metric": layers["metric"],
                    **provenance,
                }
                fit_runs(
                    spec["aligner"],
                    spec["params"],
                    features,
                    layer_runs,
                    out_dir,
                    meta,
                    progress=bar.update,
                    threads=job.threads,
                    fresh=fresh,
                    store=store,
                )
    reused = sum(read_params(out_dir / r.name)["fit"].get("reused_from") is not None for r in runs)
    log.info("%d of %d runs copied the fit of another cell (the run store)", reused, len(runs))
    atomic.write_json(
        job.output("runs"),
        {
            "runs": sorted(run.name for run in runs),
            "method": spec["method"],
            "layer_choice": choice,
        },
    )
    mark.end()
