"""The align stage: one job per (encoder pair, method, layer choice) fits the whole grid.

The job reads the chosen layers' training and validation pairs from the feature stores once
and fits every (n_pairs, seed) run on nested subsets (``fit_grid``). Each run is saved in
``<out_dir>/n<n>_s<seed>/`` with its own completion marker, so a killed job resumes with the
runs it had not finished; ``runs.json`` (the job's declared output) is written last.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pipeline import atomic
from pipeline.align.grid import fit_grid
from pipeline.config import method_params
from pipeline.data import load_split
from pipeline.pairs import Pairs, grid_sizes, pair_rows
from pipeline.similarity.stage import chosen_layers
from pipeline.store import FeatureStore, open_store

log = logging.getLogger(__name__)


def split_pairs(dataset_dir: Path, split: str) -> Pairs:
    data = load_split(dataset_dir, split)
    return pair_rows(data.images, data.captions)


def paired_features(
    vision: FeatureStore, text: FeatureStore, pairs: Pairs, layers: tuple[int, int]
):
    """(image features, text features) of ``pairs`` at (vision layer, text layer)."""
    return vision.read(layers[0], pairs.image_rows), text.read(layers[1], pairs.caption_rows)


def run_align(
    *,
    method_name: str,
    method_spec: dict[str, Any],
    layer_choice: str,
    grid: dict[str, Any],
    stores: dict[str, Path],
    train: tuple[Path, str],
    val: tuple[Path, str],
    layers_json: Path,
    out_dir: Path,
) -> None:
    """Fit ``method_name`` for every (n_pairs, seed); ``stores`` has vision/text train/val."""
    opened = {role: open_store(path) for role, path in stores.items()}
    train_pairs, val_pairs = split_pairs(*train), split_pairs(*val)
    layers = json.loads(Path(layers_json).read_text())
    sizes = grid_sizes(grid["n_pairs"], len(train_pairs))

    by_layers: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
    scores = {}
    for n_pairs in sizes:
        for seed in grid["seeds"]:
            chosen = chosen_layers(layers, layer_choice, n_pairs, seed)
            key = (int(chosen["vision_layer"]), int(chosen["text_layer"]))
            by_layers[key].append((n_pairs, seed))
            scores[key] = chosen["score"]

    params = method_params(method_spec)
    run_dirs: list[str] = []
    progress = tqdm(total=len(sizes) * len(grid["seeds"]), desc=f"{method_name}/{layer_choice}")
    for key, runs in by_layers.items():
        x, y = paired_features(opened["vision_train"], opened["text_train"], train_pairs, key)
        x_val, y_val = paired_features(opened["vision_val"], opened["text_val"], val_pairs, key)
        meta = {
            "vision_encoder": opened["vision_train"].attrs["encoder"]["name"],
            "text_encoder": opened["text_train"].attrs["encoder"]["name"],
            "method_name": method_name,
            "layer_choice": layer_choice,
            "vision_layer": key[0],
            "text_layer": key[1],
            "layer_score": scores[key],
            "selection_metric": layers["metric"],
            "feature_fingerprints": {r: s.fingerprint for r, s in opened.items()},
        }
        log.info("%s/%s: layers %s, %d runs", method_name, layer_choice, key, len(runs))
        for n_pairs, seed in runs:
            paths = fit_grid(
                method_spec["method"],
                params,
                x,
                y,
                x_val,
                y_val,
                [n_pairs],
                [seed],
                out_dir,
                meta,
                threads=grid.get("threads"),
                progress=False,
            )
            run_dirs += [path.name for path in paths]
            progress.update()
    progress.close()
    atomic.write_json(
        Path(out_dir) / "runs.json",
        {"runs": sorted(run_dirs), "method": method_name, "layer_choice": layer_choice},
    )
