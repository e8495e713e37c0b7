"""Why zero-shot segmentation scores what it scores: a diagnosis of a finished run's aligners.

    .venv/bin/python benchmarks/bench_segmentation.py            # after `make run`
    .venv/bin/python benchmarks/bench_segmentation.py --n-pairs 1000 --seed 42

For the config's first encoder pair and every method (layer choice ``last``; one run: the
largest n_pairs and its smallest seed unless given), on the first evaluation split with a
segmentation task: mIoU, the floor (``miou_all_background``), the share of the pixels each
class is predicted for against its share of the targets, and each class's IoU, through the
evaluation's own code (``segmentation.segment``). For PAL also the anatomy of its patch
scores: the mean over anchors of a patch's anchor cosines (the common mode) against their
spread, each class profile's coordinate sum (what the common mode is multiplied by), and,
as a diagnostic only (not the authors' decoding, not used by the pipeline), the mIoU once
the common mode is removed from every patch.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import polars as pl

from pipeline import layout
from pipeline.align.artifacts import load_aligner, read_params
from pipeline.config import load_config
from pipeline.data import load_prompts, load_split, load_tasks
from pipeline.data.tasks import SEGMENTATION
from pipeline.evaluate.segmentation import class_iou, segment, segmentation_metrics
from pipeline.evaluate.zeroshot import class_embeddings_of
from pipeline.stores.features import FeatureStore
from pipeline.stores.tokens import StoreTokens, TokenStore


def shown(values: np.ndarray) -> str:
    return np.array2string(np.asarray(values), precision=2, suppress_small=True)


class CommonModeRemoved:
    """A PAL aligner whose patch cosines lose their mean over the anchors (diagnostic)."""

    scores_patches = True

    def __init__(self, pal) -> None:
        self.pal = pal

    def patch_scores(self, patches: np.ndarray) -> np.ndarray:
        scores = self.pal.patch_scores(patches)
        return scores - scores.mean(axis=-1, keepdims=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("config.yaml"))
    parser.add_argument("--n-pairs", type=int, help="default: the largest of the run")
    parser.add_argument("--seed", type=int, help="default: the smallest of the run")
    args = parser.parse_args()
    config = load_config(args.config)
    pair = config["experiment"]["pairs"][0]
    vision, text = pair["vision"], pair["text"]
    for ref in config["experiment"]["evaluate"]:
        dataset_dir = Path(layout.dataset_dir(ref["dataset"]))
        tasks = [t for t in load_tasks(dataset_dir) if t.kind == SEGMENTATION]
        tasks = [t for t in tasks if t.split == ref["split"]]
        if tasks:
            break
    else:
        raise SystemExit("no evaluation split of the config has a segmentation task")
    task, split = tasks[0], ref["split"]
    data = load_split(dataset_dir, split)
    rows = np.flatnonzero(data.images[task.label_column].is_not_null().to_numpy())
    masks = [data.open_mask(int(row), task.label_column) for row in rows]
    prompts = load_prompts(dataset_dir).with_row_index("row")
    prompts = prompts.filter(pl.col("task") == task.name)
    n_classes = len(task.classnames)
    print(f"{ref['dataset']}/{split} {task.name}: {len(rows)} masks, classes {task.classnames}")
    shares = None
    for method in config["align"]["methods"]:
        folder = Path(layout.aligner_dir(vision, text, method, "last"))
        runs = sorted(p for p in folder.iterdir() if (p / "params.json").exists())
        params = [read_params(run)["meta"] for run in runs]
        n_pairs = args.n_pairs or max(meta["n_pairs"] for meta in params)
        seeds = [meta["seed"] for meta in params if meta["n_pairs"] == n_pairs]
        seed = args.seed if args.seed is not None else min(seeds)
        run = folder / f"n{n_pairs}_s{seed}"
        meta, aligner = read_params(run)["meta"], load_aligner(run)
        tokens_of = Path(layout.tokens_dir(ref["dataset"], split, vision))
        patches = TokenStore.open(layout.token_store(str(tokens_of), meta["vision_layer"]))
        if aligner.scores_patches:
            prompt_dir = layout.tokens_dir(ref["dataset"], "prompts", text)
            source = StoreTokens(
                TokenStore.open(layout.token_store(prompt_dir, meta["text_layer"])),
                prompts["row"].to_numpy(),
            )
        else:
            store = FeatureStore.open(layout.feature_store(ref["dataset"], "prompts", text))
            source = store.read(meta["text_layer"])[prompts["row"].to_numpy()]
        class_emb = class_embeddings_of(
            aligner.embed_text(source), prompts["class_index"].to_numpy(), n_classes
        )
        confusion, _ = segment(aligner, patches, class_emb, rows, masks)
        metrics = segmentation_metrics(confusion, background=task.background)
        if shares is None:
            shares = confusion.sum(axis=1) / confusion.sum()
            print(f"floor (background everywhere) mIoU {metrics['miou_all_background']:.3f}")
            print(f"{'target share':>34} {shown(shares)}")
        print(
            f"{method:>12} n{n_pairs}_s{seed} mIoU {metrics['miou']:.3f} "
            f"predicted share {shown(confusion.sum(axis=0) / confusion.sum())}"
            f" IoU {shown(class_iou(confusion))}"
        )
        if aligner.scores_patches:
            prefix = int(patches.attrs["layout"].get("prefix_tokens", 0))
            cosines = aligner.patch_scores(patches.read(rows[:64])[0][:, prefix:])
            print(
                f"{'':>12} patch-anchor cosines: mean over anchors {cosines.mean():.3f} "
                f"(spread over anchors {cosines.std(axis=-1).mean():.3f}); class profile sums "
                f"{shown(class_emb.sum(axis=1))}"
            )
            centred, _ = segment(CommonModeRemoved(aligner), patches, class_emb, rows, masks)
            print(
                f"{'':>12} common mode removed (diagnostic): mIoU "
                f"{segmentation_metrics(centred, task.background)['miou']:.3f}, predicted share "
                f"{shown(centred.sum(axis=0) / centred.sum())}"
            )


if __name__ == "__main__":
    main()
