"""Self-supervised pretraining of a timm ViT on unpaired images of the synthetic world.

Offline there are no pretrained vision weights, and a random ViT leaves shape near chance,
so the pipeline makes its own unimodal encoder from images alone (``docs/pretrain.md``): an
unpaired split of the world (split name ``pretrain``: its own random streams, so it never
repeats a train, val or test image), no captions, no labels.

Objective: SimCLR instance discrimination (NT-Xent over two views of each image, the other
2B - 2 views of the batch as negatives) on the encoder's pooled vector through a projection
head. A view moves each object to a random free place on a freshly painted grey background:
it keeps colour, shape, size and count and varies the layout, the background and the pixel
grid under the patches (``docs/pretrain.md`` says why, and what it reaches).

Determinism: initial weights, batches and views come from generators seeded by ``seed``;
torch runs with ``threads`` intra-op threads; the same spec gives identical weights on the
same machine and software.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from torch import nn
from tqdm import tqdm

from pipeline import atomic
from pipeline.align.grid import compute_threads
from pipeline.align.training import adamw_with_schedule
from pipeline.data import synthetic
from pipeline.encoders import build_encoder
from pipeline.encoders.base import package_versions
from pipeline.fingerprint import sha256_files, spec_hash
from pipeline.pretrain.settings import SPLIT, PretrainSettings, initial_spec, parse_settings

SATURATION = 50  # max - min channel value (0..255) above which a pixel is an object's
PLACEMENT_TRIES = 20  # random places tried per object before one that overlaps is accepted


# --- images and views ---------------------------------------------------------------------


def render_images(dataset: Mapping[str, Any], n: int) -> np.ndarray:
    """The first ``n`` images of the unpaired split of a normalised synthetic spec."""
    holdout = synthetic.holdout_combinations(dataset["seed"], dataset["holdout_combinations"])
    images = [
        synthetic.unpaired_image(dataset, SPLIT, index, holdout)
        for index in tqdm(range(n), desc="render unpaired images", unit="image", leave=False)
    ]
    return np.stack(images)


def object_view(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image``'s objects, each moved to a random free place, on a repainted background."""
    size = image.shape[0]
    objects = image.max(axis=2).astype(int) - image.min(axis=2) > SATURATION
    base = rng.integers(*synthetic.BACKGROUND_GREY)
    noise = rng.normal(0.0, synthetic.BACKGROUND_NOISE, size=image.shape)
    view = np.clip(np.rint(base + noise), 0, 255).astype(np.uint8)
    taken = np.zeros((size, size), dtype=bool)
    labels, _ = ndimage.label(objects)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        height, width = box[0].stop - box[0].start, box[1].stop - box[1].start
        for _ in range(PLACEMENT_TRIES):  # the last try is kept even if it overlaps
            y, x = rng.integers(size - height + 1), rng.integers(size - width + 1)
            free = not taken[max(0, y - 1) : y + height + 1, max(0, x - 1) : x + width + 1].any()
            if free:
                break
        where = labels[box] == index
        view[y : y + height, x : x + width][where] = image[box][where]
        taken[y : y + height, x : x + width] |= where
    return view


# --- model and loss -------------------------------------------------------------------------


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss: each view's positive is its twin, the other 2B - 2 views are negatives."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = z1.shape[0]
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(logits, targets)


@dataclass
class PretrainResult:
    model: nn.Module
    losses: list[float]
    seconds: float


def pretrain(
    encoder_name: str,
    encoder_spec: Mapping[str, Any],
    dataset: Mapping[str, Any],
    settings: PretrainSettings,
    threads: int = 1,
) -> PretrainResult:
    """Train the timm model of ``encoder_spec`` from its seeded random init (see module doc)."""
    start = time.perf_counter()
    encoder = build_encoder(encoder_name, initial_spec(encoder_spec))
    model = encoder.model
    images = render_images(dataset, settings.images)
    rng = np.random.default_rng([settings.seed, 1])
    torch.manual_seed(settings.seed)
    width = model.num_features
    head = nn.Sequential(
        nn.Linear(width, width), nn.GELU(), nn.Linear(width, settings.projection_dim)
    )
    parameters = [*model.parameters(), *head.parameters()]
    optimiser, schedule = adamw_with_schedule(
        parameters,
        settings.lr,
        (0.9, 0.95),
        settings.weight_decay,
        settings.warmup_steps,
        settings.steps,
    )
    losses: list[float] = []
    model.train()
    with compute_threads(threads), tqdm(total=settings.steps, desc="pretrain", unit="step") as bar:
        for _ in range(settings.steps):
            batch = rng.choice(len(images), size=settings.batch_size, replace=False)
            views = [Image.fromarray(object_view(images[i], rng)) for _ in range(2) for i in batch]
            pooled = encoder.pooled_layers(encoder.collate(views))[-1]
            z1, z2 = head(pooled).chunk(2)
            loss = nt_xent(z1, z2, settings.temperature)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimiser.step()
            schedule.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
    model.eval()
    return PretrainResult(model, losses, time.perf_counter() - start)


# --- the stage ------------------------------------------------------------------------------


def run_pretrain(
    encoder_name: str,
    encoder_spec: Mapping[str, Any],
    dataset: Mapping[str, Any],
    weights: Path,
    record: Path,
    threads: int = 1,
) -> None:
    """Pretrain and write ``weights`` (safetensors) and ``record`` (JSON), each atomically."""
    from safetensors.torch import save_file

    settings = parse_settings(encoder_name, encoder_spec["pretrain"])
    spec = synthetic.normalize_spec(settings.dataset, dataset)
    result = pretrain(encoder_name, encoder_spec, spec, settings, threads)
    state = {key: value.detach().contiguous() for key, value in result.model.state_dict().items()}
    with atomic.atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"objective": "simclr", "split": SPLIT})
    atomic.write_json(
        record,
        {
            "objective": "simclr",
            "encoder": encoder_name,
            "architecture": initial_spec(encoder_spec),
            "settings": asdict(settings),
            "spec_hash": spec_hash({"encoder": dict(encoder_spec), "dataset": dict(dataset)}),
            "split": SPLIT,
            "image_passes": 2 * settings.steps * settings.batch_size,
            "losses": [round(loss, 5) for loss in result.losses],
            "seconds": round(result.seconds, 2),
            "threads": threads,
            "weights_sha256": sha256_files([weights]),
            "versions": package_versions("torch", "timm"),
        },
    )
