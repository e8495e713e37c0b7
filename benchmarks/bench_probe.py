"""Linear probes of the pretrained vision encoder against its random init, block by block.

    .venv/bin/python benchmarks/bench_probe.py                 # weights of the last `make run`
    .venv/bin/python benchmarks/bench_probe.py --retrain       # pretrain again first (timed)

For colour, shape and count: a logistic regression on the frozen pooled features (what the
extract stage stores) of ``--n-train`` train images, scored on ``--n-test`` test images of
the config's synthetic world, at every block, for the pretrained weights
(``results/pretrained/<encoder>.safetensors``) and for the same architecture's seeded random
init. Prints the table and each attribute's best block.
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
from pipeline.probe import ATTRIBUTES, encode_layers, probe_layers, world_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--encoder", default="vit_tiny")
    parser.add_argument("--retrain", action="store_true", help="pretrain again (timed)")
    parser.add_argument("--n-train", type=int, default=1500)
    parser.add_argument("--n-test", type=int, default=400)
    args = parser.parse_args()
    config = load_config(args.config)
    job = jobs.pretrain_encoder(config, args.encoder)
    spec = job.spec["encoder"]
    torch.set_num_threads(jobs.PRETRAIN_THREADS)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(layout.pretrained_weights(args.encoder))
        if args.retrain or not weights.is_file():
            weights, record = Path(tmp) / "w.safetensors", Path(tmp) / "w.json"
            start = time.perf_counter()
            run_pretrain(args.encoder, spec, job.spec["dataset"], weights, record, threads=2)
            losses = json.loads(record.read_text())["losses"]
            print(
                f"pretraining: {time.perf_counter() - start:.0f} s, loss {losses[0]:.3f} -> "
                f"{losses[-1]:.3f}"
            )
        dataset = synthetic.normalize_spec("world", job.spec["dataset"])
        train_images, train_y = world_split(dataset, "train", args.n_train)
        test_images, test_y = world_split(dataset, "test", args.n_test)
        tables = []
        for label, encoder_spec in (
            ("pretrained", pretrained_spec(spec, weights)),
            ("random", initial_spec(spec)),
        ):
            encoder = build_encoder(args.encoder, encoder_spec)
            train_x = encode_layers(encoder, train_images)
            test_x = encode_layers(encoder, test_images)
            table = probe_layers((train_x, train_y), (test_x, test_y), ATTRIBUTES)
            tables.append(table.with_columns(pl.lit(label).alias("weights")))
    table = pl.concat(tables)
    wide = table.pivot(on=["weights", "attribute"], index="layer", values="accuracy")
    with pl.Config(tbl_rows=100, tbl_cols=20, float_precision=3, tbl_hide_dataframe_shape=True):
        print(wide.sort("layer"))
        print(table.group_by("weights", "attribute").agg(pl.col("accuracy").max()).sort(pl.all()))


if __name__ == "__main__":
    main()
