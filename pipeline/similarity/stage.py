"""The similarity stage of one encoder pair: table, heatmaps and the layer choice.

Reads the pair's training-split feature stores and writes, under ``out_dir``:

- ``similarity.parquet``: every metric for every (vision layer, text layer) on the scoring
  pool (``similarity.pool_size`` training pairs drawn with ``similarity.seed``);
- ``heatmaps/<metric>.png`` with the chosen layers marked;
- ``layers.json``: the layer choice. With ``scope: pool`` one choice from the pool serves
  every run. With ``scope: run`` each (n_pairs, seed) run of the align grid gets a choice
  made only from the pairs that run may see (``runs["n<n>_s<seed>"]``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline import atomic
from pipeline.data import load_split
from pipeline.pairs import grid_sizes, pair_rows
from pipeline.similarity import compute_similarity, scoring_pairs, select_layers
from pipeline.similarity.plots import write_heatmaps
from pipeline.store import open_store

log = logging.getLogger(__name__)


def run_key(n_pairs: int, seed: int) -> str:
    return f"n{n_pairs}_s{seed}"


def run_similarity(
    *,
    vision_store: Path,
    text_store: Path,
    train_dir: Path,
    train_split: str,
    spec: dict[str, Any],
    grid: dict[str, Any],
    out_dir: Path,
) -> None:
    vision, text = open_store(vision_store), open_store(text_store)
    data = load_split(train_dir, train_split)
    pairs = pair_rows(data.images, data.captions)
    names = {
        "vision_encoder": vision.attrs["encoder"]["name"],
        "text_encoder": text.attrs["encoder"]["name"],
    }
    pool = scoring_pairs(pairs, "pool", spec["pool_size"], spec["seed"])
    log.info(
        "scoring %d layer pairs on a pool of %d pairs",
        vision.num_layers * text.num_layers,
        len(pool),
    )
    table = compute_similarity(
        vision.path,
        text.path,
        pool,
        spec["metrics"],
        spec["knn_k"],
        sample_seed=spec["seed"],
        **names,
    )
    out_dir = Path(out_dir)
    atomic.write_parquet(table, out_dir / "similarity.parquet")
    choice = select_layers(table, spec["selection_metric"], spec["quantile_bins"])
    choice["scope"] = spec["scope"]
    if spec["scope"] == "run":
        choice["runs"] = {}
        for n_pairs in grid_sizes(grid["n_pairs"], len(pairs)):
            for seed in grid["seeds"]:
                visible = scoring_pairs(pairs, "run", spec["pool_size"], seed, n_pairs)
                run_table = compute_similarity(
                    vision.path,
                    text.path,
                    visible,
                    [spec["selection_metric"]],
                    spec["knn_k"],
                    sample_seed=seed,
                    progress=False,
                    **names,
                )
                run_choice = select_layers(
                    run_table, spec["selection_metric"], spec["quantile_bins"]
                )
                choice["runs"][run_key(n_pairs, seed)] = run_choice
    write_heatmaps(table, out_dir / "heatmaps", choice)
    atomic.write_json(out_dir / "layers.json", choice)


def chosen_layers(layers: dict[str, Any], choice: str, n_pairs: int, seed: int) -> dict[str, Any]:
    """The (vision_layer, text_layer, score) a run with ``n_pairs`` and ``seed`` aligns."""
    source = layers
    if layers.get("scope") == "run":
        source = layers["runs"][run_key(n_pairs, seed)]
    if choice not in source["choices"]:
        raise ValueError(
            f"layer choice {choice!r} is not in layers.json (has {sorted(source['choices'])}); "
            "quantile choices need similarity.quantile_bins"
        )
    return source["choices"][choice]
