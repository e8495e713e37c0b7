"""Aligner benchmark: head training throughput (with / without STRUCTURE) and the default grid.

    .venv/bin/python benchmarks/bench_align.py              # everything
    .venv/bin/python benchmarks/bench_align.py --skip-grid  # throughput only

Features are synthetic but shaped like the offline default run: 2000 training images with 5
captions each (10k pairs, image rows repeated per caption), widths 192 (vision) and 384 (text),
250 validation images (1250 pairs); both modalities are noisy nonlinear views of one clustered
16-d latent, so the heads learn and early stopping behaves as on real data.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.align.grid import available_cores, compute_threads, fit_runs
from pipeline.align.kinds import build_aligner
from pipeline.pairs import grid_runs

SIZES = [100, 250, 500, 1000, 2500, 10000]
SEEDS = [0, 1, 2]
LAYER_CHOICES = ["last", "best"]
STRUCTURE = {"lambda": 10, "levels": 1, "warmup_steps": 50, "divergence": "js"}
HEAD = {"dim": 256, "batch_size": 512, "lr": 5e-3, "max_epochs": 40, "patience": 5}
OFFLINE_PARAMS = {
    "linear": HEAD,
    "linear+structure": {**HEAD, "structure": STRUCTURE},
    "mlp": {**HEAD, "hidden": 256},
    "csa": {"sim_dim": 64},
    "asif": {"k": 800, "p": 8},
    "procrustes": {},
    "ridge": {"alpha": 1.0},
}
"""Per-method params of the offline default grid (the candidate ``align`` config section)."""


def default_like_features(
    n_images: int, captions: int, seed: int, widths: tuple[int, int] = (192, 384)
) -> tuple[np.ndarray, np.ndarray]:
    """Image rows repeated per caption and caption rows: noisy tanh views of a shared latent."""
    world = np.random.default_rng(1000 + seed // 1000)  # maps fixed per layer choice
    maps = [world.normal(size=(16, w)) * 1.5 / 4 for w in widths]
    centres = world.normal(size=(20, 16))
    rng = np.random.default_rng(seed)
    z = centres[rng.integers(20, size=n_images)] + 0.5 * rng.normal(size=(n_images, 16))
    images = np.tanh(z @ maps[0]) + 0.3 * rng.normal(size=(n_images, widths[0]))
    z_pairs = np.repeat(z, captions, axis=0)
    texts = np.tanh(z_pairs @ maps[1]) + 0.3 * rng.normal(size=(len(z_pairs), widths[1]))
    return np.repeat(images, captions, axis=0).astype(np.float32), texts.astype(np.float32)


def throughput(n: int, batch: int, epochs: int) -> None:
    """Pairs per second per training epoch of the linear head, with and without STRUCTURE."""
    x, y = default_like_features(n // 5, 5, seed=0)
    rates = {}
    for label, structure in (("InfoNCE", None), ("InfoNCE + STRUCTURE", STRUCTURE)):
        params = {"dim": 512, "batch_size": batch, "max_epochs": epochs, "structure": structure}
        report = build_aligner("linear", params).fit(x, y, None, None, seed=0)
        seconds = float(np.median(report.curve["seconds"].to_numpy()))
        rates[label] = len(x) / seconds
        print(f"  {label:22s} {rates[label]:9.0f} pairs/s  ({seconds:.2f} s per epoch)")
    ratio = rates["InfoNCE"] / rates["InfoNCE + STRUCTURE"]
    print(f"  STRUCTURE costs x{ratio:.2f} the time of InfoNCE alone")


def grid(
    methods: list[str], sizes: list[int], seeds: list[int], layers: list[str], threads: int
) -> None:
    """Time ``fit_runs`` over methods x layer choices x sizes x seeds, as the pipeline runs it."""
    features = {
        layer: (
            default_like_features(2000, 5, 1000 * i),
            default_like_features(250, 5, 1000 * i + 1),
        )
        for i, layer in enumerate(layers)
    }
    totals = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            name = method.split("+")[0]
            start = time.perf_counter()
            for layer, ((x, y), (xv, yv)) in features.items():
                out = Path(tmp) / method / layer
                params = OFFLINE_PARAMS[method]
                runs = grid_runs(sizes, seeds, len(x))
                fit_runs(name, params, (x, y, xv, yv), runs, out, {}, threads=threads)
            totals[method] = time.perf_counter() - start
            fits = len(layers) * len(sizes) * len(seeds)
            print(f"  {method:18s} {totals[method]:7.1f} s  ({fits} fits)", flush=True)
    base = sum(t for m, t in totals.items() if "+" not in m)
    print(f"  total, {len([m for m in totals if '+' not in m])} methods: {base:.1f} s")
    print(f"  total, all {len(totals)} configurations: {sum(totals.values()):.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    parser.add_argument("--skip-grid", action="store_true")
    parser.add_argument("--methods", nargs="+", default=list(OFFLINE_PARAMS))
    parser.add_argument("--sizes", nargs="+", type=int, default=SIZES)
    parser.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    args = parser.parse_args()
    with compute_threads(args.threads) as threads:
        print(f"torch threads: {threads} (available cores: {available_cores()})")
        print("linear head training throughput, batch 4096, dim 512, 10k pairs:")
        throughput(n=10_000, batch=4096, epochs=3)
        if not args.skip_grid:
            print(f"default grid: {LAYER_CHOICES} x sizes {args.sizes} x seeds {args.seeds}")
            grid(args.methods, args.sizes, args.seeds, LAYER_CHOICES, threads)


if __name__ == "__main__":
    main()
