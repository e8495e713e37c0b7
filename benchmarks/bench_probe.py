"""Linear probes of the pretrained vision encoder against its random init, block by block.

    .venv/bin/python benchmarks/bench_probe.py                 # weights of the last `make run`
    .venv/bin/python benchmarks/bench_probe.py --retrain       # pretrain again first (timed)
    .venv/bin/python benchmarks/bench_probe.py --retrain --steps 40   # a shorter budget
    .venv/bin/python benchmarks/bench_probe.py --retrain --steps 105 210 420 1050  # a curve

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
on a shared machine are noisy. Several ``--steps`` pretrain once per budget (each with its
own warm-up and cosine schedule) and end with the probe against pretraining time: per
budget, seconds, the ratio, and each probe's best block.
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
    parser.add_argument(
        "--steps", type=int, nargs="+", help="with --retrain: these budgets instead (a curve)"
    )
    parser.add_argument("--threads", type=int, default=jobs.PRETRAIN_THREADS)
    parser.add_argument("--n-train", type=int, default=1500)
    parser.add_argument("--n-test", type=int, default=400)
    args = parser.parse_args()
    config = load_config(args.config)
    job = jobs.pretrain_encoder(config, args.encoder)
    spec = job.spec["encoder"]
    torch.set_num_threads(args.threads)
    dataset = synthetic.normalize_spec("world", job.spec["dataset"])
    train = world_split(dataset, "train", args.n_train)
    test = world_split(dataset, "test", args.n_test)
    random_init = build_encoder(args.encoder, initial_spec(spec))
    random_table = probe_table(random_init, train, test).with_columns(weights=pl.lit("random"))
    weights = Path(layout.pretrained_weights(args.encoder))
    retrain = args.retrain or not weights.is_file()
    curve = []
    with tempfile.TemporaryDirectory() as tmp:
        if not retrain:
            encoder = build_encoder(args.encoder, pretrained_spec(spec, weights))
            table = probe_table(encoder, train, test).with_columns(weights=pl.lit("pretrained"))
            print_probes(pl.concat([table, random_table]))
        for steps in (args.steps or [spec["pretrain"]["steps"]]) if retrain else []:
            budget = {**spec, "pretrain": {**spec["pretrain"], "steps": steps}}
            weights, record = Path(tmp) / f"{steps}.safetensors", Path(tmp) / f"{steps}.json"
            before = reference_seconds(random_init, test.images)
            run_pretrain(args.encoder, budget, job.spec["dataset"], weights, record, args.threads)
            after = reference_seconds(random_init, test.images)
            trained = json.loads(record.read_text())
            losses, seconds = trained["losses"], trained["seconds"]
            ratio = seconds / ((before + after) / 2)
            print(
                f"pretraining: {len(losses)} steps, {seconds:.0f} s, loss {losses[0]:.3f} -> "
                f"{losses[-1]:.3f}; reference {before:.2f} s before, {after:.2f} s after: "
                f"pretraining = {ratio:.0f} x reference"
            )
            table = probe_table(
                build_encoder(args.encoder, pretrained_spec(budget, weights)), train, test
            )
            print_probes(
                pl.concat([table.with_columns(weights=pl.lit(f"{steps} steps")), random_table])
            )
            best = table.group_by("attribute").agg(pl.col("score").max())
            curve.append(
                {
                    "steps": steps,
                    "seconds": round(seconds),
                    "x reference": round(ratio),
                    **dict(best.iter_rows()),
                }
            )
    view, classes = random_init.token_layout()["view"], len(synthetic.SEGMENTATION_CLASSES)
    ceiling, floor = patch_ceiling(test.masks, random_init.grid, view, classes)
    print(
        f"patch probe mIoU: {ceiling:.3f} for a perfect patch classifier, {floor:.3f} for "
        "background everywhere"
    )
    if len(curve) > 1:
        random_best = random_table.group_by("attribute").agg(pl.col("score").max())
        curve.append({"steps": 0, "seconds": 0, "x reference": 0, **dict(random_best.iter_rows())})
        print("probe against pretraining time (best block of each probe; steps 0: random init)")
        with pl.Config(tbl_rows=100, tbl_cols=30, float_precision=3, tbl_hide_dataframe_shape=True):
            print(pl.DataFrame(curve).sort("steps"))


def probe_table(encoder, train, test) -> pl.DataFrame:
    """Every pooled probe and the patch probe of ``encoder``, block by block."""
    pooled = probe_layers(
        (encode_layers(encoder, train.images), train.labels),
        (encode_layers(encoder, test.images), test.labels),
    )
    return pl.concat([pooled, probe_patch_layers(encoder, train, test, len(train.images))])


def print_probes(table: pl.DataFrame) -> None:
    """The table block by block, each probe's best block, and the block best for colour,
    shape and count together."""
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


def reference_seconds(encoder, images) -> float:
    """Seconds of the pooled extraction of ``images`` (the reference of a timing)."""
    start = time.perf_counter()
    encode_layers(encoder, images)
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
