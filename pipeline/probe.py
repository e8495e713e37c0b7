"""Linear probes of a frozen vision encoder on the synthetic world, block by block.

For each attribute (colour, shape, count, ...) and each block, a multinomial logistic
regression is fitted on the standardised pooled features of the first ``n_train`` images of
one split and scored (accuracy) on the first ``n_test`` images of another. The features are
exactly what the extract stage stores: ``Encoder.collate`` then ``Encoder.pooled_layers``.
The world's labels (``scene_labels``) are used here only, never for pretraining.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import polars as pl
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from pipeline.data import synthetic
from pipeline.encoders import Encoder

ATTRIBUTES = ("colour", "shape", "count")


def world_split(
    dataset: Mapping[str, Any], split: str, n: int
) -> tuple[list[Image.Image], dict[str, np.ndarray]]:
    """The first ``n`` images of ``split`` of a normalized synthetic spec and their labels."""
    holdout = synthetic.holdout_combinations(dataset["seed"], dataset["holdout_combinations"])
    images, labels = [], []
    for index in range(n):
        example = synthetic.generate_example(dataset, split, index, holdout)
        images.append(Image.fromarray(example.image))
        labels.append(synthetic.scene_labels(example.scene, holdout))
    columns = {
        key.removesuffix("_label"): np.array([row[key] for row in labels]) for key in labels[0]
    }
    return images, columns


def encode_layers(
    encoder: Encoder, images: Sequence[Any], batch_size: int = 128
) -> list[np.ndarray]:
    """Pooled features of every layer, (n, dim) float32 each, in eval mode without gradients."""
    parts: list[list[np.ndarray]] = [[] for _ in encoder.layer_names]
    batches = range(0, len(images), batch_size)
    with torch.inference_mode():
        for start in tqdm(batches, desc=f"encode {encoder.name}", unit="batch", leave=False):
            batch = encoder.collate(list(images[start : start + batch_size]))
            for layer, pooled in enumerate(encoder.pooled_layers(batch)):
                parts[layer].append(pooled.float().numpy())
    return [np.concatenate(chunks) for chunks in parts]


def linear_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    c: float = 1.0,
    max_iter: int = 2000,
) -> float:
    """Test accuracy of logistic regression on features standardised with train statistics."""
    scaler = StandardScaler().fit(x_train)
    model = LogisticRegression(C=c, max_iter=max_iter)
    model.fit(scaler.transform(x_train), y_train)
    return float(model.score(scaler.transform(x_test), y_test))


def probe_layers(
    train: tuple[list[np.ndarray], Mapping[str, np.ndarray]],
    test: tuple[list[np.ndarray], Mapping[str, np.ndarray]],
    attributes: Sequence[str] = ATTRIBUTES,
    threads: int = 1,
) -> pl.DataFrame:
    """One row per (layer, attribute): ``layer`` index, ``attribute``, test ``accuracy``.

    BLAS runs with ``threads`` threads: lbfgs on a small problem is far slower with more
    threads than cores (as when torch's own pool is also alive).
    """
    (train_x, train_y), (test_x, test_y) = train, test
    rows = []
    with threadpool_limits(limits=threads):
        for layer, (x_tr, x_te) in enumerate(zip(train_x, test_x, strict=True)):
            for attribute in attributes:
                accuracy = linear_probe(x_tr, train_y[attribute], x_te, test_y[attribute])
                rows.append({"layer": layer, "attribute": attribute, "accuracy": accuracy})
    return pl.DataFrame(
        rows, schema={"layer": pl.Int64, "attribute": pl.String, "accuracy": pl.Float64}
    )
