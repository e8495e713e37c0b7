"""PASCAL VOC 2012-style semantic segmentation (``source: voc_segmentation``).

Input: a VOC folder as published (``VOCdevkit/VOC2012``)::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png            palette PNGs: the palette index is the class,
                                          0 background .. 20 tv monitor, 255 object borders
    ImageSets/Segmentation/<split>.txt    one image id per line (train, val, trainval)

Spec keys: ``root`` (that folder), ``splits`` (list files to prepare, default ``[val]``),
``templates`` (optional text file, one template with one ``{}`` per line; default the seven
CLIP templates). Each listed split holds its listed images, in the file's order; ids are
``<dataset>-<image id>``; ``images.parquet`` holds ``image_id``, ``path`` and ``mask_path``
(both absolute). One segmentation task, ``segmentation``, on ``val`` when it is listed,
otherwise on the first listed split: the 21 classes below (background first), masks read by
their palette indices (``pipeline.data.load_mask``), 255 ignored. There are no captions.

A line listed twice in one split, or an image in two listed splits, is an error naming both
(``trainval`` therefore cannot be prepared beside ``train`` or ``val``); so is a listed image
or mask file that does not exist.

Source files (``source_files``): the split lists, then every listed image and mask, sorted.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.data.manifest import (
    CAPTION_SCHEMA,
    PreparedDataset,
    Split,
    check_keys,
    spec_error,
    spec_path,
    spec_splits,
)
from pipeline.data.tasks import CLIP_TEMPLATES, SEGMENTATION, Task, check_template

CLASSES = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "dining table",
    "dog",
    "horse",
    "motorbike",
    "person",
    "potted plant",
    "sheep",
    "sofa",
    "train",
    "tv monitor",
)
LISTS = Path("ImageSets") / "Segmentation"
IMAGES, MASKS = "JPEGImages", "SegmentationClass"
TASK_SPLIT = "val"
IMAGE_SCHEMA = {"image_id": pl.String, "path": pl.String, "mask_path": pl.String}


def normalize_spec(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    check_keys(name, spec, required=("root",), optional=("splits", "templates"))
    root = Path(spec_path(name, spec, "root", is_dir=True))
    lists = root / LISTS
    if not lists.is_dir():
        raise spec_error(name, "root", f"has no {LISTS} folder (is it a VOC2012 folder?)")
    for folder in (IMAGES, MASKS):
        if not (root / folder).is_dir():
            raise spec_error(name, "root", f"has no {folder} folder: {root / folder} is missing")
    known = sorted(p.stem for p in lists.glob("*.txt"))
    normalized = {
        "source": "voc_segmentation",
        "root": str(root),
        "splits": spec_splits(name, spec, known, [TASK_SPLIT], f"{lists}/<split>.txt"),
    }
    if spec.get("templates") is not None:
        normalized["templates"] = spec_path(name, spec, "templates", is_dir=False)
    return normalized


def segmentation_tasks(name: str, spec: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(task, split) of the segmentation task ``build`` makes, from the spec alone."""
    splits = spec.get("splits") or [TASK_SPLIT]
    return [("segmentation", TASK_SPLIT if TASK_SPLIT in splits else splits[0])]


def read_list(name: str, root: Path, split: str) -> list[str]:
    """Image ids of one split list, in order; a repeated id is an error."""
    path = root / LISTS / f"{split}.txt"
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    seen: dict[str, int] = {}
    for number, image in enumerate(ids, start=1):
        if image in seen:
            raise ValueError(
                f"dataset {name!r}: {path} lists {image!r} twice (lines {seen[image]} and {number})"
            )
        seen[image] = number
    return ids


def _files(root: Path, image: str) -> tuple[Path, Path]:
    return root / IMAGES / f"{image}.jpg", root / MASKS / f"{image}.png"


def source_files(name: str, spec: Mapping[str, Any]) -> list[Path]:
    """The split lists and the template file, then every listed image and mask, sorted."""
    root = Path(spec["root"])
    lists = [root / LISTS / f"{split}.txt" for split in spec["splits"]]
    texts = [Path(spec["templates"])] if spec.get("templates") is not None else []
    files = sorted(
        file
        for split in spec["splits"]
        for image in read_list(name, root, split)
        for file in _files(root, image)
        if file.exists()  # a missing one is reported by build, naming it
    )
    return lists + texts + files


def build(name: str, spec: Mapping[str, Any], out_dir: Path) -> PreparedDataset:
    root = Path(spec["root"]).absolute()
    owner: dict[str, str] = {}
    splits = {}
    for split in spec["splits"]:
        rows = []
        for image in read_list(name, root, split):
            if image in owner:
                raise ValueError(
                    f"dataset {name!r}: image {image!r} is listed in splits {owner[image]!r} "
                    f"and {split!r}; prepare splits that do not overlap"
                )
            owner[image] = split
            jpeg, png = _files(root, image)
            for file, what in ((jpeg, "image"), (png, "mask")):
                if not file.is_file():
                    raise FileNotFoundError(
                        f"dataset {name!r}, split {split!r}: the {what} of {image!r} is missing "
                        f"({file})"
                    )
            rows.append({"image_id": f"{name}-{image}", "path": str(jpeg), "mask_path": str(png)})
        splits[split] = Split(
            images=pl.DataFrame(rows, schema=IMAGE_SCHEMA),
            captions=pl.DataFrame(schema=CAPTION_SCHEMA),
            root=Path(out_dir),
        )
    [(task_name, task_split)] = segmentation_tasks(name, spec)
    task = Task(task_name, SEGMENTATION, task_split, "mask_path", CLASSES, _templates(spec))
    return PreparedDataset(splits, [task])


def _templates(spec: Mapping[str, Any]) -> tuple[str, ...]:
    if spec.get("templates") is None:
        return CLIP_TEMPLATES
    templates = tuple(
        line.strip() for line in Path(spec["templates"]).read_text().splitlines() if line.strip()
    )
    for template in templates:
        check_template(template)
    if not templates:
        raise ValueError(f"{spec['templates']}: no templates")
    return templates
