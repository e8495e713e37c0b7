"""PAL benchmark: anchor training throughput against the linear head on pooled features.

    .venv/bin/python benchmarks/bench_pal.py
    .venv/bin/python benchmarks/bench_pal.py --pairs 8192 --batch 4096 --anchors 512 --epochs 3

Tokens are synthetic but shaped like the offline default's layers: 17 vision tokens (CLS + 16
patches) of width 192 and 32 text tokens of width 384 with right padding (lengths 8 to 32),
every token a noisy view of its pair's 16-d latent. The linear head (dim 512) trains on the
masked mean of the same tokens, so both see the same pairs; both without validation, so every
epoch runs. Throughput is pairs per second of the median epoch.
"""

from __future__ import annotations

import argparse

import numpy as np

from pipeline.align.grid import available_cores, compute_threads
from pipeline.align.kinds import build_aligner
from pipeline.align.pal import ArrayTokens, PALAligner, PALParams
from pipeline.align.params import make_params


def synthetic_tokens(
    n: int, seed: int, shapes: tuple[tuple[int, int], ...] = ((17, 192), (32, 384))
) -> tuple[ArrayTokens, ArrayTokens]:
    """Image tokens (all valid) and right-padded text tokens of n pairs sharing a latent."""
    world = np.random.default_rng(1000)
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, 16), dtype=np.float32)
    sources = []
    for tokens, width in shapes:
        view = z @ world.standard_normal((16, width), dtype=np.float32) / 4
        sources.append(view[:, None] + rng.standard_normal((n, tokens, width), dtype=np.float32))
    text_mask = np.arange(shapes[1][0]) < rng.integers(8, shapes[1][0] + 1, size=n)[:, None]
    return ArrayTokens(sources[0]), ArrayTokens(sources[1], text_mask)


def pairs_per_second(report, n: int) -> tuple[float, float]:
    seconds = float(np.median(report.curve["seconds"].to_numpy()))
    return n / seconds, seconds


def throughput(n: int, batch: int, anchors: int, epochs: int, pooling: str) -> None:
    """Pairs per second per training epoch: PAL against the linear head on pooled tokens."""
    image, text = synthetic_tokens(n, seed=0)
    params = {"anchors": anchors, "batch_size": batch, "max_epochs": epochs, "pooling": pooling}
    pal = PALAligner(make_params(PALParams, params))
    pal_rate, pal_seconds = pairs_per_second(pal.fit(image, text, None, None, seed=0), n)
    pooled = [
        ((s.tokens * s.mask[..., None]).sum(1) / s.mask.sum(1, keepdim=True)).numpy()
        for s in (image, text)
    ]
    head = build_aligner("linear", {"dim": 512, "batch_size": batch, "max_epochs": epochs})
    head_rate, head_seconds = pairs_per_second(head.fit(*pooled, None, None, seed=0), n)
    label = f"PAL ({pooling}, K={anchors})"
    print(f"  {label:21s} {pal_rate:9.0f} pairs/s  ({pal_seconds:.2f} s/epoch)")
    print(f"  linear head (dim 512) {head_rate:9.0f} pairs/s  ({head_seconds:.2f} s/epoch)")
    print(f"  PAL takes x{head_rate / pal_rate:.1f} the time of the linear head per epoch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    parser.add_argument("--pairs", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--anchors", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--pooling", default="cap", choices=["cap", "mean", "cls"])
    args = parser.parse_args()
    with compute_threads(args.threads) as threads:
        print(f"torch threads: {threads} (available cores: {available_cores()})")
        print(
            f"training throughput, {args.pairs} pairs, batch {args.batch}, "
            "tokens 17 x 192 (image) and 32 x 384 (text, padded):"
        )
        throughput(args.pairs, args.batch, args.anchors, args.epochs, args.pooling)


if __name__ == "__main__":
    main()
