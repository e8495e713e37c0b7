"""The offline synthetic world (``source: synthetic``): coloured shapes, captions, masks.

Each image shows 1..``max_count`` objects that share one shape, colour and size, placed in
one region of a lightly noisy grey background: the region is split into a grid with a
cell per object, and each object lies in its own cell, one pixel clear of the cell's border
where the cell has room (so neighbours stay at least two pixels apart). Objects can only
overlap when cells are smaller than objects, which takes ``max_count`` > 4. Every object
fills a square box whose side is set by its size.

Geometry (``version``, ``GEOMETRIES``; docs/protocols.md): the square regions of the five
positions (left, right, top, bottom: against that edge, centred along it; centre: in the
middle) have a side of ``region`` times the image, and the three sizes are fractions of the
image. Version 1: regions of half the image, objects 12-22 % of it (8-14 px at 64 px: one
or two 8 px patches of a ViT), cells over the whole region. Version 2: regions of three
quarters, objects 22-34 % (14-22 px: two to three patches across, so that a shape is drawn
over several patches); its four largest objects just fit a region's 2 x 2 cells, and smaller
groups keep together at the position's anchor (``Geometry.room``), so a group's centre stays
on its position's half of the image. The mask is drawn first (uint8 PNG;
``SHAPES.index(shape) + 1`` on object pixels, 0 elsewhere) and the image is painted from
it, so the two agree exactly.

Determinism: image ``index`` of ``split`` depends only on ``(seed, split, index)``, so
a split does not change when another one grows, and one spec gives byte-identical files.

Held-out combinations: ``holdout_combinations`` (shape, colour) pairs, with distinct
shapes and distinct colours so each shape and colour is still seen in training, never
occur in ``train``. In the other splits every ``len(COMBINATIONS) // n_holdout``-th image
(index 0, step, 2 step, ...) shows one of them in turn (the frequency uniform sampling
would give, but without the chance of a split with none); the rest are drawn uniformly
from the seen combinations.

``images.parquet`` columns: ``image_id``, ``path``, ``shape``, ``colour``, ``size``,
``position``, ``count``, ``mask_path``, then ``<task>_label`` for each zero-shot task:
the class index of the image, or -1 where it is outside the task (see ``tasks.py``). The
masks of the test split are the ``segmentation`` task: classes ``background`` then the shapes
in ``SHAPES`` order, which is exactly the mask's pixel value.
"""

from __future__ import annotations

import io
import math
import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from PIL import Image, ImageDraw
from tqdm import tqdm

from pipeline.atomic import write_bytes
from pipeline.data.manifest import (
    CAPTION_SCHEMA,
    PreparedDataset,
    Split,
    check_keys,
    spec_error,
    spec_int,
)
from pipeline.data.tasks import (
    CLASSIFICATION,
    NOT_IN_TASK,
    RETRIEVAL,
    SEGMENTATION,
    SYNTHETIC_TEMPLATES,
    Task,
)

SPLITS = ("train", "val", "test")
TRAIN, TEST = "train", "test"
DEFAULTS = {
    "version": 2,
    "image_size": 64,
    "captions_per_image": 5,
    "max_count": 4,
    "holdout_combinations": 4,
}

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 190),
    "orange": (240, 130, 30),
}
COLOUR_NAMES = tuple(COLOURS)
N_HOLDOUT_MAX = min(len(SHAPES), len(COLOURS))  # held-out shapes and colours are distinct
COMBINATIONS = tuple((shape, colour) for shape in SHAPES for colour in COLOUR_NAMES)
SIZES = ("small", "medium", "large")
POSITIONS = ("left", "right", "top", "bottom", "centre")


ANCHORS = {  # where a group sits in its region, per axis: 0 start, 0.5 middle, 1 end
    "left": (0.0, 0.5),
    "right": (1.0, 0.5),
    "top": (0.5, 0.0),
    "bottom": (0.5, 1.0),
    "centre": (0.5, 0.5),
}


@dataclass(frozen=True)
class Geometry:
    """A world version's layout: ``region`` (side of a position's square region) and
    ``sizes`` (object width per size, in SIZES order), both as fractions of the image; and
    ``room``: None, the objects' cells split the whole region; else the cells take only the
    objects' width, their gaps and ``room`` times the object width of play, and the group's
    square sits at the position's anchor in the region (``ANCHORS``)."""

    region: float
    sizes: tuple[float, float, float]
    room: float | None = None

    def regions(self) -> dict[str, tuple[float, float, float, float]]:
        """(x0, y0, x1, y1) of each position's region, as fractions of the image."""
        side, mid = self.region, (1.0 - self.region) / 2
        return {
            "left": (0.0, mid, side, mid + side),
            "right": (1.0 - side, mid, 1.0, mid + side),
            "top": (mid, 0.0, mid + side, side),
            "bottom": (mid, 1.0 - side, mid + side, 1.0),
            "centre": (mid, mid, mid + side, mid + side),
        }


GEOMETRIES = {  # world version -> its geometry (module docstring)
    1: Geometry(region=0.5, sizes=(0.12, 0.17, 0.22)),
    2: Geometry(region=0.75, sizes=(0.22, 0.28, 0.34), room=0.5),
}
MIN_SIZE = 32  # small objects are then 4 pixels wide: any smaller cannot show a shape
GAP = 1  # pixels kept free on each side of an object inside its cell
BACKGROUND_GREY = (190, 236)  # range of the background's base grey level
BACKGROUND_NOISE = 6.0  # standard deviation of the per-pixel background noise


def _star_outline(points: int = 5, inner_ratio: float = 0.45) -> tuple[tuple[float, float], ...]:
    """Vertices of a star, alternating outer and inner radius, stretched to the unit square."""
    angles = [-math.pi / 2 + k * math.pi / points for k in range(2 * points)]
    radii = [1.0 if k % 2 == 0 else inner_ratio for k in range(2 * points)]
    xs = [r * math.cos(a) for r, a in zip(radii, angles, strict=True)]
    ys = [r * math.sin(a) for r, a in zip(radii, angles, strict=True)]
    return tuple(
        ((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys)))
        for x, y in zip(xs, ys, strict=True)
    )


_CROSS_IN_THIRDS = ((1, 0), (2, 0), (2, 1), (3, 1), (3, 2), (2, 2), (2, 3), (1, 3), (1, 2), (0, 2))
_CROSS_IN_THIRDS += ((0, 1), (1, 1))  # a plus sign with arms a third of the box wide
UNIT_POLYGONS = {  # outlines in the unit square; circles are drawn as ellipses
    "square": ((0, 0), (1, 0), (1, 1), (0, 1)),
    "triangle": ((0.5, 0), (1, 1), (0, 1)),
    "star": _star_outline(),
    "cross": tuple((u / 3, v / 3) for u, v in _CROSS_IN_THIRDS),
    "diamond": ((0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)),
}

# Caption vocabulary: every word or phrase names exactly one attribute value.
SHAPE_NOUNS: dict[str, tuple[tuple[str, str], ...]] = {  # (singular, plural)
    "circle": (("circle", "circles"), ("disc", "discs")),
    "square": (("square", "squares"),),
    "triangle": (("triangle", "triangles"),),
    "star": (("star", "stars"),),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombi")),
}
COLOUR_WORDS = {colour: (colour,) for colour in COLOURS} | {"purple": ("purple", "violet")}
SIZE_WORDS = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium-sized", "mid-sized", "medium"),
    "large": ("large", "big"),
}
POSITION_PHRASES = {
    "left": ("on the left", "on the left side", "in the left half"),
    "right": ("on the right", "on the right side", "in the right half"),
    "top": ("at the top", "near the top", "in the upper half"),
    "bottom": ("at the bottom", "near the bottom", "in the lower half"),
    "centre": ("in the centre", "in the middle", "at the center"),
}
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
SINGLE_PHRASES = ("a", "one", "a single", "1")
CAPTION_TEMPLATES = (
    "{n} {size} {colour} {noun} {pos}.",
    "{pos}, there {be} {n} {colour} {noun}; {they} {be} {size}.",
    "an image of {n} {size} {noun} coloured {colour}, placed {pos}.",
    "{n} {noun}, {size} and {colour}, {pos}.",
    "there {be} {n} {size} {colour} {noun} {pos} on a grey background.",
    "a picture showing {n} {colour} {noun} {pos}. {they} {be} {size}.",
    "{pos} of the image: {n} {size} {colour} {noun}.",
    "{n} {colour} {noun} ({size}) {pos}.",
    "a rendering of {n} {size} {colour} {noun}, located {pos}.",
)


@dataclass(frozen=True)
class Scene:
    """The attributes of one image and the top-left corner of each object's box."""

    shape: str
    colour: str
    size: str
    position: str
    diameter: int  # side of each object's square box, in pixels
    corners: tuple[tuple[int, int], ...]

    @property
    def count(self) -> int:
        return len(self.corners)


@dataclass(frozen=True, eq=False)
class Example:
    """One generated image with its mask and captions."""

    scene: Scene
    image: np.ndarray  # (size, size, 3) uint8
    mask: np.ndarray  # (size, size) uint8
    captions: list[str]


# --- spec -----------------------------------------------------------------------------------


def normalize_spec(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec with defaults filled in; ValueError naming the key when it is invalid."""
    check_keys(name, spec, required=("seed", "splits"), optional=DEFAULTS)
    splits = spec["splits"]
    if not isinstance(splits, Mapping) or not splits:
        raise spec_error(name, "splits", f"must map split names to image counts, not {splits!r}")
    for split, count in splits.items():
        if split not in SPLITS:
            raise spec_error(name, "splits", f"names unknown split {split!r} (known: {SPLITS})")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise spec_error(name, "splits", f"gives split {split!r} {count!r} images")
    if TEST not in splits:
        raise spec_error(name, "splits", "needs a 'test' split: the zero-shot tasks use it")
    n_holdout = spec_int(
        name, spec, "holdout_combinations", DEFAULTS["holdout_combinations"], 0, N_HOLDOUT_MAX
    )
    if n_holdout == 1:
        raise spec_error(name, "holdout_combinations", "must be 0 or at least 2 (classes)")
    n_templates = len(CAPTION_TEMPLATES)
    version = spec.get("version", DEFAULTS["version"])
    if isinstance(version, bool) or version not in GEOMETRIES:
        raise spec_error(name, "version", f"must be one of {list(GEOMETRIES)}, not {version!r}")
    return {
        "source": "synthetic",
        "version": version,
        "seed": spec_int(name, spec, "seed", 0, 0, 2**63 - 1),
        "splits": {str(split): count for split, count in splits.items()},
        "image_size": spec_int(name, spec, "image_size", DEFAULTS["image_size"], MIN_SIZE, 4096),
        "captions_per_image": spec_int(
            name, spec, "captions_per_image", DEFAULTS["captions_per_image"], 1, n_templates
        ),
        "max_count": spec_int(name, spec, "max_count", DEFAULTS["max_count"], 2, 10),
        "holdout_combinations": n_holdout,
    }


# --- the world ------------------------------------------------------------------------------


def holdout_combinations(seed: int, n: int) -> tuple[tuple[str, str], ...]:
    """``n`` (shape, colour) pairs with distinct shapes and colours, in SHAPES x COLOURS order."""
    rng = np.random.default_rng([seed, zlib.crc32(b"holdout")])
    shapes = rng.choice(len(SHAPES), size=n, replace=False)
    colours = rng.choice(len(COLOURS), size=n, replace=False)
    chosen = {(SHAPES[s], COLOUR_NAMES[c]) for s, c in zip(shapes, colours, strict=True)}
    return tuple(combo for combo in COMBINATIONS if combo in chosen)


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(split.encode()), index])


def choose_combination(
    rng: np.random.Generator, split: str, index: int, holdout: tuple[tuple[str, str], ...]
) -> tuple[str, str]:
    """The (shape, colour) of image ``index``: see the module docstring for the rule."""
    if split != TRAIN and holdout:
        step = len(COMBINATIONS) // len(holdout)
        if index % step == 0:
            return holdout[(index // step) % len(holdout)]
    seen = [combo for combo in COMBINATIONS if combo not in holdout]
    return seen[rng.integers(len(seen))]


def region_box(position: str, image_size: int, version: int) -> tuple[int, int, int, int]:
    fractions = GEOMETRIES[version].regions()[position]
    x0, y0, x1, y1 = (round(f * image_size) for f in fractions)
    return x0, y0, x1, y1


def object_diameter(size: str, image_size: int, version: int) -> int:
    return round(GEOMETRIES[version].sizes[SIZES.index(size)] * image_size)


def place_objects(
    rng: np.random.Generator,
    box: tuple[int, int, int, int],
    diameter: int,
    count: int,
    anchor: tuple[float, float] | None = None,
    room: int = 0,
) -> tuple[tuple[int, int], ...]:
    """Top-left corners of ``count`` d x d objects, one per cell of a grid over ``box``.

    With an ``anchor`` (x, y; 0 the box's start, 1 its end), the grid keeps only the columns
    and rows that hold an object, is only as wide as they are (an object and its gaps each)
    plus ``room`` pixels of play, and sits at the anchor of ``box``."""
    x0, y0, x1, y1 = box
    grid = math.ceil(math.sqrt(count))
    cells = [divmod(int(cell), grid) for cell in rng.choice(grid * grid, size=count, replace=False)]
    axes = []
    for axis, (lo, hi) in enumerate(((x0, x1), (y0, y1))):
        used = sorted({cell[1 - axis] for cell in cells})  # columns, then rows
        if anchor is None:
            axes.append((lo, hi, grid, {k: k for k in used}))
            continue
        width = min(hi - lo, len(used) * (diameter + 2 * GAP) + room)
        start = lo + round(anchor[axis] * (hi - lo - width))
        axes.append((start, start + width, len(used), {k: i for i, k in enumerate(used)}))
    (xl, xh, nx, column), (yl, yh, ny, row) = axes
    return tuple(
        (
            _cell_offset(rng, xl, xh, nx, column[c], diameter),
            _cell_offset(rng, yl, yh, ny, row[r], diameter),
        )
        for r, c in cells
    )


def _cell_offset(rng: np.random.Generator, lo: int, hi: int, grid: int, k: int, d: int) -> int:
    """Start of an object of width ``d`` in cell ``k`` of ``grid`` cells over [lo, hi)."""
    start, end = lo + (hi - lo) * k // grid, lo + (hi - lo) * (k + 1) // grid
    slack = end - start - d - 2 * GAP
    offset = start + GAP + int(rng.integers(slack + 1)) if slack >= 0 else (start + end - d) // 2
    return min(max(offset, lo), hi - d)


def sample_scene(
    rng: np.random.Generator, shape: str, colour: str, spec: Mapping[str, Any]
) -> Scene:
    """Size, position, count and layout of an image under a normalized spec."""
    image_size, version = spec["image_size"], spec["version"]
    size = SIZES[rng.integers(len(SIZES))]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    count = int(rng.integers(1, spec["max_count"] + 1))
    diameter = object_diameter(size, image_size, version)
    box, room = region_box(position, image_size, version), GEOMETRIES[version].room
    if room is None:
        corners = place_objects(rng, box, diameter, count)
    else:
        anchor, play = ANCHORS[position], round(room * diameter)
        corners = place_objects(rng, box, diameter, count, anchor, play)
    return Scene(shape, colour, size, position, diameter, corners)


def draw_mask(scene: Scene, image_size: int) -> np.ndarray:
    """uint8 mask: ``SHAPES.index(shape) + 1`` on object pixels, 0 elsewhere."""
    mask = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(mask)
    value = SHAPES.index(scene.shape) + 1
    last = scene.diameter - 1  # boxes are inclusive: pixels x .. x + last
    for x, y in scene.corners:
        if scene.shape == "circle":
            draw.ellipse((x, y, x + last, y + last), fill=value)
        else:
            outline = [(x + u * last, y + v * last) for u, v in UNIT_POLYGONS[scene.shape]]
            draw.polygon(outline, fill=value)
    return np.asarray(mask, dtype=np.uint8)


def paint_image(
    rng: np.random.Generator, mask: np.ndarray, rgb: tuple[int, int, int]
) -> np.ndarray:
    """A noisy grey background with the mask's object pixels in the flat colour ``rgb``."""
    base = rng.integers(*BACKGROUND_GREY)
    noise = rng.normal(0.0, BACKGROUND_NOISE, size=(*mask.shape, 3))
    image = np.clip(np.rint(base + noise), 0, 255).astype(np.uint8)
    image[mask > 0] = rgb
    return image


def describe(rng: np.random.Generator, scene: Scene, n: int) -> list[str]:
    """``n`` captions of the scene from distinct templates, with varied wording."""
    templates = rng.choice(len(CAPTION_TEMPLATES), size=n, replace=False)
    return [_caption(rng, CAPTION_TEMPLATES[t], scene) for t in templates]


def _caption(rng: np.random.Generator, template: str, scene: Scene) -> str:
    def pick(options: tuple[str, ...]) -> str:
        return options[rng.integers(len(options))]

    many = scene.count > 1
    nouns = SHAPE_NOUNS[scene.shape][rng.integers(len(SHAPE_NOUNS[scene.shape]))]
    if many:
        number = pick((NUMBER_WORDS[scene.count - 1], str(scene.count)))
    else:
        number = pick(SINGLE_PHRASES)
    text = template.format(
        n=number,
        size=pick(SIZE_WORDS[scene.size]),
        colour=pick(COLOUR_WORDS[scene.colour]),
        noun=nouns[1] if many else nouns[0],
        pos=pick(POSITION_PHRASES[scene.position]),
        be="are" if many else "is",
        they="they" if many else "it",
    )
    text = re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", text)  # "a orange" -> "an orange"
    return re.sub(r"(^|\.\s+)([a-z])", lambda m: m[1] + m[2].upper(), text)


def generate_example(
    spec: Mapping[str, Any], split: str, index: int, holdout: tuple[tuple[str, str], ...]
) -> Example:
    """Image ``index`` of ``split`` under a normalized spec: a pure function of its arguments."""
    rng = image_rng(spec["seed"], split, index)
    shape, colour = choose_combination(rng, split, index, holdout)
    scene = sample_scene(rng, shape, colour, spec)
    mask = draw_mask(scene, spec["image_size"])
    image = paint_image(rng, mask, COLOURS[colour])
    return Example(scene, image, mask, describe(rng, scene, spec["captions_per_image"]))


def unpaired_image(
    spec: Mapping[str, Any], split: str, index: int, holdout: tuple[tuple[str, str], ...]
) -> np.ndarray:
    """Image ``index`` of an unpaired ``split`` (a name outside SPLITS): no captions, no mask.

    Drawn like ``train`` (no held-out combination); its own split name gives its own
    random streams, so it never repeats an image of train, val or test.
    """
    if split in SPLITS:
        raise ValueError(f"unpaired split {split!r} must not be one of {SPLITS}")
    rng = image_rng(spec["seed"], split, index)
    shape, colour = choose_combination(rng, TRAIN, index, holdout)
    scene = sample_scene(rng, shape, colour, spec)
    return paint_image(rng, draw_mask(scene, spec["image_size"]), COLOURS[colour])


# --- tasks ----------------------------------------------------------------------------------


def attribute_classnames(max_count: int) -> dict[str, tuple[str, ...]]:
    """Class names (in class-index order) of the attribute tasks."""
    return {
        "shape": SHAPES,
        "colour": COLOUR_NAMES,
        "size": tuple(SIZE_WORDS[size][0] for size in SIZES),
        "position": tuple(POSITION_PHRASES[position][0] for position in POSITIONS),
        "count": tuple(
            f"{NUMBER_WORDS[c - 1]} shape{'s' if c > 1 else ''}" for c in range(1, max_count + 1)
        ),
    }


SEGMENTATION_CLASSES = ("background", *SHAPES)  # mask value = class index (draw_mask)


def world_tasks(holdout: tuple[tuple[str, str], ...], max_count: int) -> list[Task]:
    """One classification task per attribute, ``novel_combination``, retrieval, and
    segmentation of the masks (background and the shapes), on test."""
    classnames = attribute_classnames(max_count)
    if holdout:
        classnames["novel_combination"] = tuple(f"{colour} {shape}" for shape, colour in holdout)
    tasks = [
        Task(name, CLASSIFICATION, TEST, f"{name}_label", names, SYNTHETIC_TEMPLATES[name])
        for name, names in classnames.items()
    ]
    segmentation = Task(
        "segmentation",
        SEGMENTATION,
        TEST,
        "mask_path",
        SEGMENTATION_CLASSES,
        SYNTHETIC_TEMPLATES["segmentation"],
    )
    return [*tasks, Task("retrieval", RETRIEVAL, TEST), segmentation]


def segmentation_tasks(name: str, spec: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(task, split) of the segmentation tasks ``build`` makes, from the spec alone."""
    return [("segmentation", TEST)]


def scene_labels(scene: Scene, holdout: tuple[tuple[str, str], ...]) -> dict[str, int]:
    """The ``<task>_label`` class indices of one scene (see ``attribute_classnames``)."""
    labels = {
        "shape_label": SHAPES.index(scene.shape),
        "colour_label": COLOUR_NAMES.index(scene.colour),
        "size_label": SIZES.index(scene.size),
        "position_label": POSITIONS.index(scene.position),
        "count_label": scene.count - 1,
    }
    if holdout:
        combo = (scene.shape, scene.colour)
        labels["novel_combination_label"] = (
            holdout.index(combo) if combo in holdout else NOT_IN_TASK
        )
    return labels


# --- preparation ----------------------------------------------------------------------------


def source_files(name: str, spec: Mapping[str, Any]) -> list[Path]:
    """None: the world is generated from the spec alone."""
    return []


def build(name: str, spec: Mapping[str, Any], out_dir: Path) -> PreparedDataset:
    """Generate every split's images and masks under ``out_dir``; return tables and tasks.

    PNGs an earlier preparation generated that this one does not (fewer images, a split
    left out) are removed.
    """
    holdout = holdout_combinations(spec["seed"], spec["holdout_combinations"])
    splits = {
        split: _generate_split(name, spec, split, n_images, holdout, Path(out_dir))
        for split, n_images in spec["splits"].items()
    }
    _remove_stale_pngs(Path(out_dir), splits)
    return PreparedDataset(splits, world_tasks(holdout, spec["max_count"]))


def _remove_stale_pngs(out_dir: Path, splits: Mapping[str, Split]) -> None:
    """Delete ``<split>/{images,masks}/*.png`` files the prepared ``splits`` do not point to."""
    for split in SPLITS:
        images = splits[split].images if split in splits else None
        keep = set() if images is None else {*images["path"], *images["mask_path"]}
        for kind in ("images", "masks"):
            folder = out_dir / split / kind
            if not folder.is_dir():
                continue
            for file in folder.glob("*.png"):
                if f"{split}/{kind}/{file.name}" not in keep:
                    file.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()


def _generate_split(
    name: str,
    spec: Mapping[str, Any],
    split: str,
    n_images: int,
    holdout: tuple[tuple[str, str], ...],
    out_dir: Path,
) -> Split:
    images, captions = [], []
    for index in tqdm(range(n_images), desc=f"{name}/{split}", unit="image", leave=False):
        example = generate_example(spec, split, index, holdout)
        image_id = f"{name}-{split}-{index:06d}"
        path, mask_path = f"{split}/images/{image_id}.png", f"{split}/masks/{image_id}.png"
        write_bytes(out_dir / path, _png(example.image))
        write_bytes(out_dir / mask_path, _png(example.mask))
        scene = example.scene
        images.append(
            {
                "image_id": image_id,
                "path": path,
                "shape": scene.shape,
                "colour": scene.colour,
                "size": scene.size,
                "position": scene.position,
                "count": scene.count,
                "mask_path": mask_path,
                **scene_labels(scene, holdout),
            }
        )
        captions.extend(
            {"caption_id": f"{image_id}-c{k}", "image_id": image_id, "text": text}
            for k, text in enumerate(example.captions)
        )
    return Split(
        images=pl.DataFrame(images, infer_schema_length=None),
        captions=pl.DataFrame(captions, schema=CAPTION_SCHEMA),
        root=out_dir,
    )


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)  # lossless; fast
    return buffer.getvalue()
