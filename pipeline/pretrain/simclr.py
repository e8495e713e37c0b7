"""Self-supervised pretraining of a timm ViT on unpaired images of the synthetic world.

Offline there are no pretrained vision weights, and a random ViT leaves shape near chance,
so the pipeline makes its own unimodal encoder from images alone (``docs/pretrain.md``): an
unpaired split of the world (split name ``pretrain``: its own random streams, so it never
repeats a train, val or test image), no captions, no labels.

Objective: SimCLR instance discrimination (NT-Xent over two views of each image, the other
2B - 2 views of the batch as negatives) on the encoder's pooled vector through a projection
head. A view moves each object to a random free place on a freshly painted grey background
and scales all of them by one random factor (``rescale``); for a fraction ``recolour`` of
the images both views also paint the objects a random colour each. So a view keeps shape
and count, and (unless repainted) colour, and varies the layout, size, background and the
pixel grid under the patches: what is left to tell an image from the others is what the
tasks ask about, shape first (``docs/pretrain.md`` says why, and what it reaches).

Determinism: initial weights, batches and views come from generators seeded by ``seed``;
torch runs with ``threads`` intra-op threads; the same spec gives identical weights on the
same machine and software.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Iterator, Mapping
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
SHRINK, SHRINKS = 0.85, 6  # a view's scale shrinks by SHRINK, at most SHRINKS times, while
# its objects find no free places (then the last object overlaps)


# --- images and views ---------------------------------------------------------------------


def render_images(dataset: Mapping[str, Any], n: int) -> np.ndarray:
    """The first ``n`` images of the unpaired split of a normalised synthetic spec."""
    holdout = synthetic.holdout_combinations(dataset["seed"], dataset["holdout_combinations"])
    images = [
        synthetic.unpaired_image(dataset, SPLIT, index, holdout)
        for index in tqdm(range(n), desc="render unpaired images", unit="image", leave=False)
    ]
    return np.stack(images)


def object_view(
    image: np.ndarray, rng: np.random.Generator, recolour: bool = False, rescale: float = 1.0
) -> np.ndarray:
    """``image``'s objects, each moved to a random free place, on a repainted background.

    ``recolour``: the objects take one random saturated colour instead of their own;
    ``rescale`` > 1: they are all scaled by one factor drawn log-uniformly from
    [1 / rescale, rescale]. While the objects find no free places the scale shrinks
    (``SHRINK``): a view keeps the count, the shape and (unless recoloured) the colour."""
    size = image.shape[0]
    objects = image.max(axis=2).astype(int) - image.min(axis=2) > SATURATION
    labels, _ = ndimage.label(objects)
    shapes = [labels[box] == k for k, box in enumerate(ndimage.find_objects(labels), start=1)]
    paint = [
        image[box][labels[box] == k][0] for k, box in enumerate(ndimage.find_objects(labels), 1)
    ]
    base = rng.integers(*synthetic.BACKGROUND_GREY)
    noise = rng.normal(0.0, synthetic.BACKGROUND_NOISE, size=image.shape)
    if recolour:
        paint = [
            rng.permutation([rng.integers(200, 256), rng.integers(0, 60), rng.integers(0, 256)])
        ] * len(paint)
    scale = math.exp(rng.uniform(-math.log(rescale), math.log(rescale)))
    for attempt in range(SHRINKS + 1):
        scaled = [_scaled(where, scale, size) for where in shapes]
        corners = _free_places(rng, scaled, size, final=attempt == SHRINKS)
        if corners is not None:
            break
        scale *= SHRINK
    view = np.clip(np.rint(base + noise), 0, 255).astype(np.uint8)
    for where, colour, (y, x) in zip(scaled, paint, corners, strict=True):
        view[y : y + where.shape[0], x : x + where.shape[1]][where] = colour
    return view


def _scaled(where: np.ndarray, scale: float, size: int) -> np.ndarray:
    if scale == 1.0:
        return where
    shape = tuple(max(1, min(size, round(n * scale))) for n in where.shape)
    image = Image.fromarray(where.astype(np.uint8) * 255)
    return np.asarray(image.resize(shape[::-1], Image.Resampling.BILINEAR)) > 127


def _free_places(
    rng: np.random.Generator, shapes: list[np.ndarray], size: int, final: bool
) -> list[tuple[int, int]] | None:
    """Top-left corners of the objects, each tried at PLACEMENT_TRIES random places one
    pixel clear of the others; None when one finds no free place, unless ``final`` (its last
    try is then kept, overlapping)."""
    taken = np.zeros((size, size), dtype=bool)
    corners = []
    for where in shapes:
        height, width = where.shape
        for _ in range(PLACEMENT_TRIES):
            y, x = rng.integers(size - height + 1), rng.integers(size - width + 1)
            if not taken[max(0, y - 1) : y + height + 1, max(0, x - 1) : x + width + 1].any():
                break
        else:
            if not final:
                return None
        taken[y : y + height, x : x + width] |= where
        corners.append((int(y), int(x)))
    return corners


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
    batches = prefetched(view_batches(encoder, images, rng, settings))
    with compute_threads(threads), tqdm(total=settings.steps, desc="pretrain", unit="step") as bar:
        for batch in batches:
            pooled = encoder.pooled_layers(batch)[-1]
            loss = nt_xent(*head(pooled).chunk(2), settings.temperature)
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


def view_batches(
    encoder: Any, images: list[np.ndarray], rng: np.random.Generator, settings: PretrainSettings
) -> Iterator[dict[str, torch.Tensor]]:
    """The model inputs of every step: two views of each image of a batch (all first views,
    then all second views), drawn in order from ``rng``."""
    for _ in range(settings.steps):
        batch = rng.choice(len(images), size=settings.batch_size, replace=False)
        recolour = rng.random(len(batch)) < settings.recolour  # both views of an image
        views = [
            Image.fromarray(object_view(images[i], rng, new, settings.rescale))
            for _ in range(2)
            for i, new in zip(batch, recolour, strict=True)
        ]
        yield encoder.collate(views)


def prefetched(items: Iterator[Any]) -> Iterator[Any]:
    """``items`` in order, the next one made by a background thread while the caller works
    on the current one (the views are Python and NumPy; torch's kernels release the GIL)."""
    ahead: queue.Queue = queue.Queue(maxsize=1)
    done = object()

    def produce() -> None:
        try:
            for item in items:
                ahead.put(item)
        except BaseException as error:  # re-raised in the caller's thread
            ahead.put(error)
        ahead.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while (item := ahead.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


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
        # one metadata key: safetensors writes them in hash-map order, so two would make the
        # bytes (and the SHA-256 every store records) differ between identical runs
        save_file(state, str(tmp), metadata={"objective": f"simclr on the {SPLIT} split"})
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
