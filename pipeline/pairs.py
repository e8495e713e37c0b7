"""Paired rows between an image store and a caption store, and nested training subsets.

Feature stores keep the row order of the dataset manifests: row i of an image store is
row i of ``images.parquet``, row j of a caption store is row j of ``captions.parquet``.
A *pair* is one caption with its image, so pair j joins caption row j to the row of its
image. Subsets for the data-size grid are prefixes of one seeded permutation, so for a
given seed every smaller subset is nested in every larger one (docs/protocols.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import polars as pl


@dataclass(frozen=True)
class Pairs:
    """Paired row indices: ``image_rows[j]`` is the image of caption ``caption_rows[j]``."""

    image_rows: np.ndarray
    caption_rows: np.ndarray

    def __len__(self) -> int:
        return len(self.caption_rows)

    def take(self, index: np.ndarray) -> Pairs:
        return Pairs(self.image_rows[index], self.caption_rows[index])

    def one_caption_per_image(self) -> Pairs:
        """Keep the first pair of each image (in pair order), so no image repeats."""
        _, first = np.unique(self.image_rows, return_index=True)
        return self.take(np.sort(first))


def pair_rows(images: pl.DataFrame, captions: pl.DataFrame) -> Pairs:
    """Join each caption (in caption-store order) to the row of its image in the image store."""
    row_of = {image_id: row for row, image_id in enumerate(images["image_id"].to_list())}
    try:
        image_rows = np.fromiter(
            (row_of[i] for i in captions["image_id"].to_list()), dtype=np.int64, count=len(captions)
        )
    except KeyError as err:
        missing = err.args[0]
        raise ValueError(f"a caption refers to image {missing!r}, not in the split") from None
    return Pairs(image_rows, np.arange(len(captions), dtype=np.int64))


TRAIN_CAPTIONS = ("all", "first")
"""Which captions of a training image become pairs (config ``experiment.train.captions``):
every one, or the first of each image (the STRUCTURE authors' training set)."""


def split_pairs(images: pl.DataFrame, captions: pl.DataFrame, policy: str = "all") -> Pairs:
    """The pairs of a split under a captions ``policy`` (``TRAIN_CAPTIONS``)."""
    if policy not in TRAIN_CAPTIONS:
        raise ValueError(f"captions policy must be one of {TRAIN_CAPTIONS}, got {policy!r}")
    pairs = pair_rows(images, captions)
    return pairs.one_caption_per_image() if policy == "first" else pairs


def subset_order(n_total: int, seed: int) -> np.ndarray:
    """The seeded permutation whose prefixes are the nested training subsets."""
    return np.random.default_rng(seed).permutation(n_total)


def nested_subset(n_total: int, n_pairs: int | None, seed: int) -> np.ndarray:
    """Indices of the first ``n_pairs`` of the seed's permutation (``None`` means all)."""
    if n_pairs is None:
        n_pairs = n_total
    if not 0 < n_pairs <= n_total:
        raise ValueError(f"n_pairs={n_pairs} is outside 1..{n_total} (the pairs available)")
    return subset_order(n_total, seed)[:n_pairs]


RUN_NAME = "n{n_pairs}_s{seed}"
"""The name of one grid run, and of its folder in the align job's output: the one spelling,
formatted by ``run_name`` and matched by ``is_run_name``."""


def run_name(n_pairs: int, seed: int) -> str:
    return RUN_NAME.format(n_pairs=n_pairs, seed=seed)


def is_run_name(name: str) -> bool:
    """Whether ``name`` is a ``run_name`` (a folder of a run)."""
    return re.fullmatch(RUN_NAME.format(n_pairs=r"\d+", seed=r"-?\d+"), name) is not None


@dataclass(frozen=True)
class GridRun:
    """One (n_pairs, seed) cell of the data-size grid."""

    n_pairs: int
    seed: int

    @property
    def name(self) -> str:
        return run_name(self.n_pairs, self.seed)

    def rows(self, n_total: int) -> np.ndarray:
        """Indices of the pairs this run trains on: the seed's nested subset."""
        return nested_subset(n_total, self.n_pairs, self.seed)


def grid_runs(sizes: list[int | str | None], seeds: list[int], n_total: int) -> list[GridRun]:
    """Every run of the grid, sizes outer and seeds inner: the one place the grid is looped."""
    return [GridRun(n, seed) for n in grid_sizes(sizes, n_total) for seed in seeds]


def grid_sizes(
    sizes: list[int | str | None], n_total: int, key: str = "align.n_pairs"
) -> list[int]:
    """Data-size grid as pair counts, in order, without repeats; ``"full"``/None is every pair.
    A size outside 2..n_total is an error naming the config ``key``."""
    resolved = list(dict.fromkeys(n_total if n in ("full", None) else int(n) for n in sizes))
    for n in resolved:
        if not 2 <= n <= n_total:
            raise ValueError(
                f"config key '{key}': n_pairs={n} is outside 2..{n_total} "
                "(the training pairs available)"
            )
    return resolved
