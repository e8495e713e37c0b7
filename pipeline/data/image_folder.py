"""Image-classification folders (``source: image_folder``): ``<root>/<split>/<class_dir>/<image>``.

Spec keys: ``root``; ``splits`` (split folders to prepare, default ``[test]``);
``classnames`` (optional text file, one human-readable name per line in sorted
class-folder order; default: folder names with underscores as spaces); ``templates``
(optional text file, one template with one ``{}`` per line; default ``CLIP_TEMPLATES``).

Classes are the class folders found in any listed split, sorted by name; class index i is
the i-th of them. A class folder with no image in any listed split is an error (it would
be a class nothing can be scored on; torchvision's ``ImageFolder`` refuses it too).
``images.parquet`` holds ``image_id`` (``<dataset>/<split>/<class_dir>/<file name>``, so
one id per file by construction), ``path`` (absolute), ``label`` (the class index: the
task's label column) and ``class_name``. Images are recognised by suffix; hidden entries
are skipped. Entries that resolve to one file (links) are one image (the first in sorted
order) when they sit in one class of one split; in two classes, or in two splits (a leak
between, say, train and test), they are an error naming both. Copies are not compared.
One classification task named after the dataset, on ``test`` when it is listed, otherwise
on the first listed split. There are no captions.

Source files (``source_files``): the class-name and template files when given, then every
image file of the listed splits, sorted, exactly those ``build`` reads (links as listed).
Adding, removing, renaming or rewriting an image changes the list or its fingerprint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
from pipeline.data.tasks import CLASSIFICATION, CLIP_TEMPLATES, Task, check_template

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
IMAGE_SCHEMA = {
    "image_id": pl.String,
    "path": pl.String,
    "label": pl.Int64,
    "class_name": pl.String,
}
TASK_SPLIT = "test"


def normalize_spec(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    check_keys(name, spec, required=("root",), optional=("splits", "classnames", "templates"))
    root = Path(spec_path(name, spec, "root", is_dir=True))
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    normalized = {
        "source": "image_folder",
        "root": str(root),
        "splits": spec_splits(name, spec, found, [TASK_SPLIT], f"{root}/<split>/"),
    }
    for key in ("classnames", "templates"):
        if spec.get(key) is not None:
            normalized[key] = spec_path(name, spec, key, is_dir=False)
    return normalized


def source_files(name: str, spec: Mapping[str, Any]) -> list[Path]:
    """Class-name and template files (when given), then every image file, sorted."""
    texts = [Path(spec[key]) for key in ("classnames", "templates") if spec.get(key) is not None]
    listing = list_images(Path(spec["root"]), spec["splits"])
    return texts + sorted(file for files in listing.values() for file in files)


def list_images(root: Path, splits: Iterable[str]) -> dict[tuple[str, str], list[Path]]:
    """Image files by (split, class folder), in sorted order; empty class folders included."""
    listing: dict[tuple[str, str], list[Path]] = {}
    for split in splits:
        for class_dir in sorted((root / split).iterdir()):
            if class_dir.name.startswith(".") or not class_dir.is_dir():
                continue
            listing[split, class_dir.name] = [
                file
                for file in sorted(class_dir.iterdir())
                if not file.name.startswith(".")
                and file.suffix.lower() in IMAGE_SUFFIXES
                and not file.is_dir()
            ]
    return listing


def build(name: str, spec: Mapping[str, Any], out_dir: Path) -> PreparedDataset:
    root = Path(spec["root"]).absolute()
    listing = list_images(root, spec["splits"])
    class_dirs = sorted({class_dir for _, class_dir in listing})
    if len(class_dirs) < 2:
        raise spec_error(
            name, "root", f"needs at least 2 class folders in its splits, found {class_dirs}"
        )
    empty = [c for c in class_dirs if not any(listing.get((s, c)) for s in spec["splits"])]
    if empty:
        raise ValueError(
            f"dataset {name!r}: class folder {empty[0]!r} under {root} has no image in the "
            f"splits {spec['splits']}; remove it or add images"
        )
    classnames = _classnames(name, spec.get("classnames"), class_dirs)
    templates = read_templates(spec.get("templates"))
    no_captions = pl.DataFrame(schema=CAPTION_SCHEMA)
    seen: dict[Path, dict[str, Any]] = {}  # resolved file -> its row, across splits
    splits = {
        split: Split(
            images=_split_rows(name, root, split, listing, class_dirs, classnames, seen),
            captions=no_captions,
            root=Path(out_dir),
        )
        for split in spec["splits"]
    }
    task_split = TASK_SPLIT if TASK_SPLIT in splits else spec["splits"][0]
    task = Task(name, CLASSIFICATION, task_split, "label", tuple(classnames), templates)
    return PreparedDataset(splits, [task])


def read_lines(path: Path) -> list[str]:
    """Non-empty lines of a text file (trailing blank lines dropped; inner ones an error)."""
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line:
            raise ValueError(f"{path}, line {number}: blank line")
    return lines


def _classnames(name: str, path: str | None, class_dirs: list[str]) -> list[str]:
    if path is None:
        return [class_dir.replace("_", " ") for class_dir in class_dirs]
    classnames = read_lines(Path(path))
    if len(classnames) != len(class_dirs):
        raise spec_error(
            name,
            "classnames",
            f"file {path} has {len(classnames)} names for {len(class_dirs)} class folders",
        )
    return classnames


def read_templates(path: str | None) -> tuple[str, ...]:
    """The templates of a file (one per line, each with one ``{}``), or CLIP_TEMPLATES."""
    if path is None:
        return CLIP_TEMPLATES
    templates = read_lines(Path(path))
    if not templates:
        raise ValueError(f"template file {path} is empty")
    for number, template in enumerate(templates, start=1):
        try:
            check_template(template)
        except ValueError as err:
            raise ValueError(f"{path}, line {number}: {err}") from None
    return tuple(templates)


def _split_rows(
    name: str,
    root: Path,
    split: str,
    listing: Mapping[tuple[str, str], list[Path]],
    class_dirs: list[str],
    classnames: list[str],
    seen: dict[Path, dict[str, Any]],
) -> pl.DataFrame:
    """One row per distinct image file of ``split``; ``seen`` carries rows across splits."""
    rows: list[dict[str, Any]] = []
    for label, class_dir in enumerate(class_dirs):
        for file in listing.get((split, class_dir), []):
            real = file.resolve()
            if real in seen:
                other = seen[real]
                if other["split"] == split and other["label"] == label:
                    continue  # a link beside its target: one image
                where = (
                    f"two classes of split {split!r}, {class_dirs[other['label']]!r} and "
                    f"{class_dir!r}"
                    if other["split"] == split
                    else f"two splits, {other['split']!r} and {split!r}"
                )
                raise ValueError(
                    f"dataset {name!r}: {other['path']} and {file} are one image in {where}"
                )
            row = {
                "image_id": f"{name}/{split}/{class_dir}/{file.name}",
                "path": str(file),
                "label": label,
                "class_name": classnames[label],
            }
            seen[real] = {**row, "split": split}
            rows.append(row)
    if not rows:
        raise ValueError(f"dataset {name!r}: no image files under {root / split}/<class folder>/")
    return pl.DataFrame(rows, schema=IMAGE_SCHEMA)
