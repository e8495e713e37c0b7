"""Scene-parsing segmentation sets: Pascal Context-59 (``source: pascal_context``) and ADE20K
(``source: ade20k``), in the formats their distributions use.

Both write the masks again, in the pipeline's convention (``pipeline.data.tasks``: a pixel is
the class index, 0 the background, 255 ignored), as PNGs in the prepared dataset
(``<split>/masks/<id>.png``); images stay the user's files. One segmentation task,
``segmentation``, on the evaluation split; templates: the seven CLIP templates, or a
``templates`` file (one template with one ``{}`` per line).

**Pascal Context-59.** Spec keys: ``root`` (a VOC2010 folder: ``JPEGImages/`` and
``ImageSets/SegmentationContext/<split>.txt``, the split lists the Context-59 benchmark uses),
``context`` (the Stanford release unpacked: ``trainval/<id>.mat``, each with its ``LabelMap``
of raw labels, and ``labels.txt``, one ``<raw label>: <name>`` per line), ``splits`` (default
``[val]``). Classes: background, then the benchmark's 59 (``CONTEXT_59``, by their
``labels.txt`` names); every other raw label is background, as the benchmark defines it (the
PAL authors count it as a class too; the mmseg convention ignores it instead).

**ADE20K.** Spec keys: ``root`` (``ADEChallengeData2016``: ``images/<split>/<id>.jpg``,
``annotations/<split>/<id>.png``, ``objectInfo150.txt`` or ``.csv``), ``splits`` (default
``[validation]``). Classes: the 150 of ``objectInfo150`` in index order, each named by its
first synonym; annotation value v is class v - 1 and 0 ("other") is ignored (the benchmark's
150-class mIoU). ADE20K has no background class, so its task has ``background`` None: its
``miou_fg`` is its ``miou`` (no class is left out; the VOC and Context tasks leave out class 0).

Missing folders or files are spec errors raised while the config is validated, naming the
dataset and the path.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from PIL import Image

from pipeline.atomic import write_bytes
from pipeline.data.image_folder import read_lines, read_templates
from pipeline.data.images import load_mask
from pipeline.data.manifest import (
    CAPTION_SCHEMA,
    PreparedDataset,
    Split,
    check_keys,
    spec_error,
    spec_path,
    spec_splits,
)
from pipeline.data.tasks import IGNORE_INDEX, SEGMENTATION, Task

IMAGE_SCHEMA = {"image_id": pl.String, "path": pl.String, "mask_path": pl.String}
TASK = "segmentation"

# The Context-59 benchmark's classes by their labels.txt names (Mottaghi et al., 2014).
CONTEXT_59 = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "table", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor", "bag", "bed", "bench", "book", "building", "cabinet", "ceiling", "cloth",
    "computer", "cup", "door", "fence", "floor", "flower", "food", "grass", "ground",
    "keyboard", "light", "mountain", "mouse", "curtain", "platform", "sign", "plate", "road",
    "rock", "shelves", "sidewalk", "sky", "snow", "bedclothes", "track", "tree", "truck",
    "wall", "water", "window", "wood",
)  # fmt: skip
SPOKEN = {"pottedplant": "potted plant", "tvmonitor": "tv monitor", "bedclothes": "bed clothes"}
CONTEXT_LISTS = Path("ImageSets") / "SegmentationContext"


# ---- Pascal Context-59 -----------------------------------------------------------------------


def normalize_context(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    check_keys(name, spec, required=("root", "context"), optional=("splits", "templates"))
    root = Path(spec_path(name, spec, "root", is_dir=True))
    context = Path(spec_path(name, spec, "context", is_dir=True))
    _require(name, "root", root / "JPEGImages", root / CONTEXT_LISTS)
    _require(name, "context", context / "trainval", context / "labels.txt")
    known = sorted(p.stem for p in (root / CONTEXT_LISTS).glob("*.txt"))
    return _normalized(
        name,
        spec,
        "pascal_context",
        known,
        f"{root / CONTEXT_LISTS}/<split>.txt",
        "val",
        root=str(root),
        context=str(context),
    )


def context_classes(labels_txt: Path) -> tuple[tuple[str, ...], np.ndarray]:
    """The task's classes (background, then the 59) and the lookup table raw label -> class."""
    raw = {}
    for line in read_lines(labels_txt):
        number, _, label = line.partition(":")
        raw[label.strip()] = int(number)
    missing = [c for c in CONTEXT_59 if c not in raw]
    if missing:
        raise ValueError(f"{labels_txt} names no raw label for the Context-59 classes {missing}")
    table = np.zeros(max(raw.values()) + 1, dtype=np.uint8)  # everything else: background
    for index, label in enumerate(CONTEXT_59, start=1):
        table[raw[label]] = index
    return ("background", *(SPOKEN.get(c, c) for c in CONTEXT_59)), table


def _context_pairs(spec: Mapping[str, Any], split: str) -> list[tuple[str, Path, Path]]:
    root, context = Path(spec["root"]), Path(spec["context"])
    ids = read_lines(root / CONTEXT_LISTS / f"{split}.txt")
    return [(i, root / "JPEGImages" / f"{i}.jpg", context / "trainval" / f"{i}.mat") for i in ids]


def _context_mask(table: np.ndarray) -> Callable[[Path], np.ndarray]:
    import scipy.io

    def read(path: Path) -> np.ndarray:
        labels = np.asarray(scipy.io.loadmat(path)["LabelMap"], dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= len(table)):
            raise ValueError(f"{path}: raw labels outside labels.txt's 0..{len(table) - 1}")
        return table[labels]

    return read


def build_context(name: str, spec: Mapping[str, Any], out_dir: Path) -> PreparedDataset:
    classes, table = context_classes(Path(spec["context"]) / "labels.txt")
    return _build(name, spec, out_dir, _context_pairs, _context_mask(table), classes, "val", 0)


def context_sources(name: str, spec: Mapping[str, Any]) -> list[Path]:
    lists = [Path(spec["root"]) / CONTEXT_LISTS / f"{s}.txt" for s in spec["splits"]]
    return [*lists, Path(spec["context"]) / "labels.txt", *_sources(spec, _context_pairs)]


# ---- ADE20K ----------------------------------------------------------------------------------


def normalize_ade(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    check_keys(name, spec, required=("root",), optional=("splits", "templates"))
    root = Path(spec_path(name, spec, "root", is_dir=True))
    _require(name, "root", root / "images", root / "annotations")
    if _object_info(root) is None:
        raise spec_error(name, "root", f"has no objectInfo150.txt or .csv: {root}")
    known = sorted(p.name for p in (root / "images").iterdir() if p.is_dir())
    where = f"{root / 'images'}/<split>/"
    normalized = _normalized(name, spec, "ade20k", known, where, "validation", root=str(root))
    for split in normalized["splits"]:
        _require(name, "root", root / "annotations" / split)
    return normalized


def _object_info(root: Path) -> Path | None:
    found = [root / f"objectInfo150.{suffix}" for suffix in ("txt", "csv")]
    return next((path for path in found if path.is_file()), None)


def ade_classes(path: Path) -> tuple[str, ...]:
    """The 150 class names of ``objectInfo150`` in index order, each its first synonym: the
    release's tab-separated ``.txt`` ("building, edifice") or the devkit's ``.csv``
    ("building;edifice")."""
    text = path.read_text()
    rows = list(csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix == ".txt" else ","))
    names = {int(row["Idx"]): row["Name"].replace(";", ",").split(",")[0].strip() for row in rows}
    if sorted(names) != list(range(1, 151)):
        raise ValueError(f"{path}: expected the classes 1..150, found {len(names)}")
    return tuple(names[i] for i in range(1, 151))


def _ade_pairs(spec: Mapping[str, Any], split: str) -> list[tuple[str, Path, Path]]:
    root = Path(spec["root"])
    images = sorted((root / "images" / split).glob("*.jpg"))
    return [(p.stem, p, root / "annotations" / split / f"{p.stem}.png") for p in images]


def _ade_mask(path: Path) -> np.ndarray:
    values = load_mask(path, f"ADE20K annotation {path}").astype(np.int64)
    if values.size and values.max() > 150:
        raise ValueError(f"{path}: annotation value {values.max()} is above 150")
    return np.where(values == 0, IGNORE_INDEX, values - 1)


def build_ade(name: str, spec: Mapping[str, Any], out_dir: Path) -> PreparedDataset:
    classes = ade_classes(_object_info(Path(spec["root"])))
    return _build(name, spec, out_dir, _ade_pairs, _ade_mask, classes, "validation", None)


def ade_sources(name: str, spec: Mapping[str, Any]) -> list[Path]:
    return [_object_info(Path(spec["root"])), *_sources(spec, _ade_pairs)]


# ---- shared ----------------------------------------------------------------------------------


def _require(name: str, key: str, *paths: Path) -> None:
    for path in paths:
        if not path.exists():
            raise spec_error(name, key, f"holds no {path.name}: {path} is missing")


def _normalized(
    name: str,
    spec: Mapping[str, Any],
    source: str,
    known: list[str],
    found_in: str,
    task_split: str,
    **paths: str,
) -> dict[str, Any]:
    """The normalized spec; ``known``: the splits found on disk, in ``found_in``."""
    splits = spec_splits(name, spec, known, [task_split], found_in)
    normalized = {"source": source, **paths, "splits": splits}
    if spec.get("templates") is not None:
        normalized["templates"] = spec_path(name, spec, "templates", is_dir=False)
    return normalized


def segmentation_tasks(default: str) -> Callable[[str, Mapping[str, Any]], list[tuple[str, str]]]:
    """(task, split) of the one segmentation task, from the spec alone."""

    def tasks(name: str, spec: Mapping[str, Any]) -> list[tuple[str, str]]:
        splits = spec.get("splits") or [default]
        return [(TASK, default if default in splits else splits[0])]

    return tasks


Pairs = Callable[[Mapping[str, Any], str], list[tuple[str, Path, Path]]]


def _sources(spec: Mapping[str, Any], pairs: Pairs) -> list[Path]:
    """Every listed image and annotation that exists (a missing one is build's error), sorted."""
    return sorted(
        file
        for split in spec["splits"]
        for _, image, annotation in pairs(spec, split)
        for file in (image, annotation)
        if file.exists()
    )


def _build(
    name: str,
    spec: Mapping[str, Any],
    out_dir: Path,
    pairs: Pairs,
    read_mask: Callable[[Path], np.ndarray],
    classes: tuple[str, ...],
    default: str,
    background: int | None,
) -> PreparedDataset:
    splits = {}
    for split in spec["splits"]:
        rows = []
        for image_id, image, annotation in pairs(spec, split):
            for file, what in ((image, "image"), (annotation, "annotation")):
                if not file.is_file():
                    raise FileNotFoundError(
                        f"dataset {name!r}, split {split!r}: the {what} of {image_id!r} is "
                        f"missing ({file})"
                    )
            mask = read_mask(annotation)
            with Image.open(image) as opened:
                width, height = opened.size
            if mask.shape != (height, width):
                raise ValueError(f"{annotation}: mask {mask.shape} does not fit image {image}")
            mask_path = f"{split}/masks/{image_id}.png"
            buffer = io.BytesIO()
            Image.fromarray(mask.astype(np.uint8)).save(buffer, format="PNG", compress_level=1)
            write_bytes(Path(out_dir) / mask_path, buffer.getvalue())
            rows.append(
                {
                    "image_id": f"{name}-{image_id}",
                    "path": str(image.absolute()),
                    "mask_path": mask_path,
                }
            )
        if not rows:
            raise ValueError(f"dataset {name!r}: split {split!r} lists no images")
        splits[split] = Split(
            images=pl.DataFrame(rows, schema=IMAGE_SCHEMA),
            captions=pl.DataFrame(schema=CAPTION_SCHEMA),
            root=Path(out_dir),
        )
    [(task, task_split)] = segmentation_tasks(default)(name, spec)
    return PreparedDataset(
        splits,
        [
            Task(
                task,
                SEGMENTATION,
                task_split,
                "mask_path",
                classes,
                read_templates(spec.get("templates")),
                background,
            )
        ],
    )
