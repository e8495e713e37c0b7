"""Benchmark of the test-image bootstrap against the point estimates, in one run.

For one aligner run on a retrieval task of ``--images`` test images with ``--captions``
captions each (random scores) and a classification task on the same images:
1. the point estimates: ranks and every Recall@k, top-1/top-5/balanced accuracy
   (``retrieval_outcomes``, ``classification_outcomes``), which the evaluate stage computes;
2. the bootstrap the aggregate adds per run: ``--replicates`` resamples of the images (the
   draw is made once per task and shared by every run; timed separately) and the replicates of
   every metric (``tables.bootstrap_replicates``'s work: ``intervals.replicates``);
3. a brute-force loop recomputing each metric on the resampled items, on ``--loop`` replicates
   and extrapolated, with the largest difference from the fast path.

    python benchmarks/bench_intervals.py                  # 5,000 images x 5 captions (COCO test)
    python benchmarks/bench_intervals.py --images 1000     # Flickr30k test
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pipeline.evaluate.intervals import (
    Hits,
    replicates,
    resample_counts,
    resample_draws,
)
from pipeline.evaluate.retrieval import retrieval_outcomes
from pipeline.evaluate.zeroshot import classification_outcomes


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def resample(hits: Hits, order: np.ndarray, starts: np.ndarray, drawn: np.ndarray) -> Hits:
    """The items of the drawn images (``order``/``starts``: items grouped by image)."""
    rows = np.concatenate([order[starts[i] : starts[i + 1]] for i in drawn])
    stratum = None if hits.stratum is None else hits.stratum[rows]
    return Hits(hits.hit[rows], hits.unit[rows], stratum)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions", type=int, default=5, help="captions per image")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--replicates", type=int, default=1000)
    parser.add_argument("--loop", type=int, default=20, help="brute-force replicates timed")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    caption_image = np.repeat(np.arange(args.images), args.captions)
    scores = rng.normal(size=(args.images, len(caption_image))).astype(np.float32)
    scores[caption_image, np.arange(len(caption_image))] += 3.0  # better than chance
    logits = rng.normal(size=(args.images, args.classes))
    labels = rng.integers(0, args.classes, size=args.images)
    logits[np.arange(args.images), labels] += 2.0

    def point() -> dict[str, Hits]:
        return retrieval_outcomes(scores, caption_image) | classification_outcomes(logits, labels)

    outcomes, point_s = timed(point)
    units = np.arange(args.images)
    counts, draw_s = timed(
        lambda: resample_counts(resample_draws(args.images, args.replicates, seed=0))
    )
    fast, fast_s = timed(lambda: {m: replicates(h, units, counts) for m, h in outcomes.items()})

    draws = resample_draws(args.images, args.loop, seed=0)
    diffs, loop_s = [], 0.0
    for name, hits in outcomes.items():
        order = np.argsort(hits.unit, kind="stable")
        starts = np.searchsorted(hits.unit[order], np.arange(args.images + 1))
        brute, seconds = timed(
            lambda h=hits, o=order, s=starts: [resample(h, o, s, d).value() for d in draws]
        )
        loop_s += seconds
        diffs.append(np.abs(np.array(brute) - fast[name][: args.loop]).max())
    loop_total = loop_s * args.replicates / args.loop
    print(
        f"{args.images} images x {args.captions} captions, {args.classes} classes, "
        f"{len(outcomes)} metrics, {args.replicates} replicates"
    )
    print(f"point estimates (ranks, every metric) : {point_s:8.3f} s")
    print(f"bootstrap draw (once per task)        : {draw_s:8.3f} s")
    print(
        f"bootstrap replicates of every metric  : {fast_s:8.3f} s  ({fast_s / point_s:.2f}x point)"
    )
    print(
        f"brute-force loop (extrapolated)       : {loop_total:8.3f} s  "
        f"({loop_total / fast_s:.0f}x the fast path); largest difference {max(diffs):.1e}"
    )


if __name__ == "__main__":
    main()
