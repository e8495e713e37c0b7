"""Linear probes of the pretrained vision encoder against its random init, block by block.

    .venv/bin/python benchmarks/bench_probe.py                 # weights of the last `make run`
    .venv/bin/python benchmarks/bench_probe.py --retrain       # pretrain again first (timed)
    .venv/bin/python benchmarks/bench_probe.py --retrain --steps 40   # a shorter budget

At every block, for the pretrained weights (``results/pretrained/<encoder>.safetensors``, or
those ``--retrain`` makes) and for the same architecture's seeded random init
(``pipeline.probe``): a logistic regression per attribute (colour, shape, count, size,
position) on the frozen pooled features (what the extract stage stores) of ``--n-train``
train images, scored (accuracy) on ``--n-test`` test images of the config's synthetic world;
and the patch probe, a logistic regression from each patch token of the same train images
to its patch's mask class, scored as segmentation is (mIoU on the test masks). Prints the
table, each probe's best block, the block best for colour, shape and count together, and
the patch probe's ceiling and floor (a perfect patch classifier; background everywhere).

``--retrain`` also times a reference, the pooled extraction of the test images by the random
init at the pretraining's threads, before and after; ``pretraining / reference`` is the
figure to carry to another machine (its own reference time times the ratio), since timings
on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import polars as pl
import torch

from pipeline import jobs, layout
from pipeline.config import load_config
from pipeline.data import synthetic
from pipeline.encoders import build_encoder
from pipeline.pretrain import initial_spec, pretrained_spec
from pipeline.pretrain.simclr import run_pretrain
from pipeline.probe import (
    encode_layers,
    patch_ceiling,
    probe_layers,
    probe_patch_layers,
    world_split,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--encoder", default="vit_tiny")
    parser.add_argument("--retrain", action="store_true", help="pretrain again (timed)")
    parser.add_argument("--steps", type=int, help="with --retrain: this many steps instead")
    parser.add_argument("--threads", type=int, default=jobs.PRETRAIN_THREADS)
    parser.add_argument("--n-train", type=int, default=1500)
    parser.add_argument("--n-test", type=int, default=400)
    args = parser.parse_args()
    config = load_config(args.config)
    job = jobs.pretrain_encoder(config, args.encoder)
    spec = job.spec["encoder"]
    if args.steps is not None:
        spec = {**spec, "pretrain": {**spec["pretrain"], "steps": args.steps}}
    torch.set_num_threads(args.threads)
    dataset = synthetic.normalize_spec("world", job.spec["dataset"])
    train = world_split(dataset, "train", args.n_train)
    test = world_split(dataset, "test", args.n_test)
    random_init = build_encoder(args.encoder, initial_spec(spec))
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(layout.pretrained_weights(args.encoder))
        if args.retrain or not weights.is_file():
            weights, record = Path(tmp) / "w.safetensors", Path(tmp) / "w.json"
            before = reference_seconds(random_init, test.images)
            run_pretrain(args.encoder, spec, job.spec["dataset"], weights, record, args.threads)
            after = reference_seconds(random_init, test.images)
            trained = json.loads(record.read_text())
            losses, seconds = trained["losses"], trained["seconds"]
            print(
                f"pretraining: {len(losses)} steps, {seconds:.0f} s, loss {losses[0]:.3f} -> "
                f"{losses[-1]:.3f}; reference {before:.2f} s before, {after:.2f} s after: "
                f"pretraining = {seconds / ((before + after) / 2):.0f} x reference"
            )
        tables = []
        for label, encoder in (
            ("pretrained", build_encoder(args.encoder, pretrained_spec(spec, weights))),
            ("random", random_init),
        ):
            pooled = probe_layers(
                (encode_layers(encoder, train.images), train.labels),
                (encode_layers(encoder, test.images), test.labels),
            )
            patches = probe_patch_layers(encoder, train, test, args.n_train)
            tables.append(pl.concat([pooled, patches]).with_columns(weights=pl.lit(label)))
    view, classes = random_init.token_layout()["view"], len(synthetic.SEGMENTATION_CLASSES)
    ceiling = patch_ceiling(test.masks, random_init.grid, view, classes)
    floor = patch_ceiling(test.masks, random_init.grid, view, classes, background=True)
    table = pl.concat(tables)
    wide = table.pivot(on="layer", index=["weights", "attribute"], values="score")
    wide = wide.rename({c: f"block {c}" for c in wide.columns[2:]})
    best = table.group_by("weights", "attribute").agg(
        pl.col("score").max().alias("best"), pl.col("layer").sort_by("score").last().alias("at")
    )
    with pl.Config(tbl_rows=100, tbl_cols=30, float_precision=3, tbl_hide_dataframe_shape=True):
        print(wide.join(best, on=["weights", "attribute"]).sort("weights", "attribute"))
    goals = table.filter(pl.col("attribute").is_in(["colour", "shape", "count"]))
    lowest = goals.group_by("weights", "layer").agg(pl.col("score").min())
    for row in (
        lowest.sort("score").group_by("weights").last().sort("weights").iter_rows(named=True)
    ):
        weights, block, low = row["weights"], row["layer"], row["score"]
        print(f"{weights}: block {block} has colour, shape and count >= {low:.3f}")
    print(
        f"patch probe mIoU: {ceiling:.3f} for a perfect patch classifier, {floor:.3f} for "
        "background everywhere"
    )


def reference_seconds(encoder, images) -> float:
    """Seconds of the pooled extraction of ``images`` (the reference of a timing)."""
    start = time.perf_counter()
    encode_layers(encoder, images)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
