"""Image-classification folders (``source: image_folder``): ``<root>/<split>/<class_dir>/<image>``.

Spec keys: ``root``; ``splits`` (split folders to prepare, default ``[test]``);
``classnames`` (optional text file, one human-readable name per line in sorted
class-folder order; default: folder names with underscores as spaces); ``templates``
(optional text file, one template with one ``{}`` per line; default ``CLIP_TEMPLATES``).

Classes are the class folders found in any listed split, sorted by name; class index i is
the i-th of them. ``images.parquet`` holds ``image_id`` (``<dataset>/<split>/<class_dir>/
<file name>``), ``path`` (absolute), ``label`` (the class index: the task's label column)
and ``class_name``. Images are recognised by suffix; hidden entries are skipped. Entries
that resolve to one file (links) are one image, an error if they sit in different classes.
One classification task named after the dataset, on ``test`` when it is listed, otherwise
on the first listed split. There are no captions.
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
        "splits": spec_splits(name, spec, found, [TASK_SPLIT]),
    }
    for key in ("classnames", "templates"):
        if spec.get(key) is not None:
            normalized[key] = spec_path(name, spec, key, is_dir=False)
    return normalized


def build(name: str, spec: Mapping[str, Any], out_dir: Path) -> PreparedDataset:
    root = Path(spec["root"]).absolute()
    class_dirs = sorted(
        {
            entry.name
            for split in spec["splits"]
            for entry in (root / split).iterdir()
            if entry.is_dir() and not entry.name.startswith(".")
        }
    )
    if len(class_dirs) < 2:
        raise spec_error(
            name, "root", f"needs at least 2 class folders in its splits, found {class_dirs}"
        )
    classnames = _classnames(name, spec.get("classnames"), class_dirs)
    templates = _templates(spec.get("templates"))
    no_captions = pl.DataFrame(schema=CAPTION_SCHEMA)
    splits = {
        split: Split(
            images=_scan_split(name, root / split, class_dirs, classnames, f"{name}/{split}"),
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


def _templates(path: str | None) -> tuple[str, ...]:
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


def _scan_split(
    name: str, folder: Path, class_dirs: list[str], classnames: list[str], id_prefix: str
) -> pl.DataFrame:
    """One row per distinct image file under ``folder/<class_dir>/``."""
    rows: list[dict[str, Any]] = []
    seen: dict[Path, dict[str, Any]] = {}  # resolved file -> its row
    for label, class_dir in enumerate(class_dirs):
        if not (folder / class_dir).is_dir():
            continue
        for file in sorted((folder / class_dir).iterdir()):
            if file.name.startswith(".") or file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            real = file.resolve()
            if real in seen:
                if seen[real]["label"] != label:
                    raise ValueError(
                        f"dataset {name!r}: {file} and {seen[real]['path']} are one image in "
                        f"two classes, {class_dirs[seen[real]['label']]!r} and {class_dir!r}"
                    )
                continue
            row = {
                "image_id": f"{id_prefix}/{class_dir}/{file.name}",
                "path": str(file),
                "label": label,
                "class_name": classnames[label],
            }
            seen[real] = row
            rows.append(row)
    if not rows:
        raise ValueError(f"dataset {name!r}: no image files under {folder}/<class folder>/")
    return pl.DataFrame(rows, schema=IMAGE_SCHEMA)
