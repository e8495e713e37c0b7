"""The on-disk format of a prepared dataset: writing it, fingerprinting it, reading it back.

Layout under ``results/datasets/<name>/``::

    <split>/images.parquet    image_id, path, then label columns; one row per distinct image
    <split>/captions.parquet  caption_id, image_id, text (empty for classification-only data)
    prompts.parquet           prompt_id, task, class_index, class_name, template_index, text
    tasks.json                the zero-shot tasks (``pipeline.data.tasks.Task``)
    manifest.json             written last: the completion marker

``path`` (and ``mask_path`` where present) is relative to the dataset folder for files
the pipeline generated and absolute for a user's files on disk. ``content_hash`` covers
the Parquet and JSON files byte for byte, the bytes of generated files, and the path,
size and modification time of user files: it changes exactly when what the later stages
read changes, so extraction keys its caches on it.

``sources_hash`` covers the path, size and modification time of the dataset's source files
(``pipeline.data.source_files``: a Karpathy JSON, class-name and template files, an image
folder's image files). A dataset counts as prepared (``is_prepared``) only when the spec,
the sources and the prepared files (``content_hash`` recomputed) are all as recorded, so
editing a source, or a user image the tables point to, prepares it again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from PIL import Image

from pipeline.atomic import write_json, write_parquet
from pipeline.data.images import load_mask, load_rgb
from pipeline.data.tasks import (
    CLASSIFICATION,
    NOT_IN_TASK,
    PROMPT_SCHEMA,
    RETRIEVAL,
    SEGMENTATION,
    Task,
)
from pipeline.data.tasks import prompts_frame as build_prompts_frame
from pipeline.fingerprint import spec_hash
from pipeline.versions import library_versions

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TASKS = "tasks.json"
PROMPTS = "prompts.parquet"
IMAGES = "images.parquet"
CAPTIONS = "captions.parquet"
IMAGE_SCHEMA = {"image_id": pl.String, "path": pl.String}
CAPTION_SCHEMA = {"caption_id": pl.String, "image_id": pl.String, "text": pl.String}
FILE_COLUMNS = ("path", "mask_path")
MANIFEST_KEYS = {"name", "spec", "spec_hash", "format_version", "splits", "content_hash"}
DATA_PACKAGES = ("pillow", "polars", "pyarrow")  # PNG and Parquet bytes depend on them


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a dataset: its images (one row each) and captions, rooted at ``root``."""

    images: pl.DataFrame
    captions: pl.DataFrame
    root: Path

    def image_path(self, i: int) -> Path:
        return self.root / self.images["path"][i]  # an absolute path stays as it is

    def open_image(self, i: int) -> Image.Image:
        """Image row ``i`` as an 8-bit RGB PIL image (``pipeline.data.images.load_rgb``)."""
        return load_rgb(self.image_path(i), self._entry(i))

    def open_mask(self, i: int, column: str = "mask_path") -> np.ndarray:
        """Segmentation mask of image row ``i`` (uint8 class indices, 0 the background, 255
        ignored; ``pipeline.data.tasks``), from the file named in ``column``."""
        if column not in self.images.columns:
            raise ValueError(f"split under {self.root} has no masks (no {column!r} column)")
        path = self.images[column][i]
        if path is None:
            raise ValueError(f"{self._entry(i)} has no mask")
        return load_mask(self.root / path, f"mask of {self._entry(i)}")

    def _entry(self, i: int) -> str:
        return f"dataset at {self.root}, image {self.images['image_id'][i]!r}"


@dataclass(frozen=True)
class PreparedDataset:
    """What an adapter hands over to be written: splits by name and zero-shot tasks."""

    splits: dict[str, Split]
    tasks: list[Task] = field(default_factory=list)


# --- spec checks shared by the adapters -----------------------------------------------------


def spec_error(name: str, key: str, problem: str) -> ValueError:
    return ValueError(f"dataset {name!r}: key {key!r} {problem}")


def check_keys(
    name: str, spec: Mapping[str, Any], required: Iterable[str], optional: Iterable[str]
) -> None:
    """Raise unless ``spec`` has every required key and nothing else but optional ones."""
    required, known = set(required), {"source", *required, *optional}
    missing, unknown = sorted(required - set(spec)), sorted(set(spec) - known)
    if missing:
        raise spec_error(name, missing[0], "is required")
    if unknown:
        raise spec_error(name, unknown[0], f"is unknown (known keys: {sorted(known)})")


def spec_int(
    name: str, spec: Mapping[str, Any], key: str, default: int, minimum: int, maximum: int
) -> int:
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise spec_error(name, key, f"must be an integer, not {value!r}")
    if not minimum <= value <= maximum:
        raise spec_error(name, key, f"must be in {minimum}..{maximum}, not {value}")
    return value


def spec_bool(name: str, spec: Mapping[str, Any], key: str, default: bool) -> bool:
    value = spec.get(key, default)
    if not isinstance(value, bool):
        raise spec_error(name, key, f"must be true or false, not {value!r}")
    return value


def spec_path(name: str, spec: Mapping[str, Any], key: str, *, is_dir: bool) -> str:
    """An existing file (or folder) named by ``spec[key]``, as a string."""
    value = spec[key]
    if not isinstance(value, str | Path) or not str(value):
        raise spec_error(name, key, f"must be a path, not {value!r}")
    exists = Path(value).is_dir() if is_dir else Path(value).is_file()
    if not exists:
        raise spec_error(name, key, f"names no existing {'folder' if is_dir else 'file'}: {value}")
    return str(value)


def spec_splits(
    name: str,
    spec: Mapping[str, Any],
    known: Iterable[str],
    default: list[str],
    found_in: str | None = None,
) -> list[str]:
    """The list of split names in ``spec['splits']``, each one of ``known`` (``found_in``: where
    the data's own splits were looked for, for the error)."""
    value = spec.get("splits", default)
    if not isinstance(value, list | tuple) or not value:
        raise spec_error(name, "splits", f"must be a non-empty list of split names, not {value!r}")
    splits = [str(s) for s in value]
    for split in splits:
        if split not in known:
            where = f", from {found_in}" if found_in else ""
            raise spec_error(
                name, "splits", f"names unknown split {split!r} (known: {known}{where})"
            )
    if len(set(splits)) != len(splits):
        raise spec_error(name, "splits", f"repeats a split: {splits}")
    return splits


# --- writing --------------------------------------------------------------------------------


def dataset_spec_hash(name: str, spec: Mapping[str, Any]) -> str:
    """Fingerprint of everything that determines a prepared dataset's files."""
    return spec_hash({"name": name, "spec": spec, "format_version": FORMAT_VERSION})


def sources_hash(paths: Iterable[Path]) -> str:
    """sha256 over each source file's path, size and modification time, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            stat = Path(path).stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"source file {path} is missing") from None
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def is_prepared(out_dir: Path, name: str, spec: Mapping[str, Any], sources: str) -> bool:
    """Whether ``out_dir`` holds a complete, unaltered preparation of this spec and sources.

    ``sources`` is the ``sources_hash`` of the dataset's source files now. The prepared
    files are fingerprinted again (``content_hash``), which also notices a user image
    that changed or went missing since.
    """
    try:
        manifest = read_manifest(out_dir)
        if manifest["spec_hash"] != dataset_spec_hash(name, spec):
            return False
        if manifest.get("sources_hash") != sources:
            return False
        return content_hash(out_dir, sorted(manifest["splits"])) == manifest["content_hash"]
    except (OSError, ValueError, TypeError, KeyError, pl.exceptions.PolarsError):
        return False


def check_prepared(name: str, prepared: PreparedDataset) -> None:
    """Raise ValueError where the frames or tasks break the on-disk contract."""
    for split_name, split in prepared.splits.items():
        where = f"dataset {name!r}, split {split_name!r}"
        _check_schema(split.images, IMAGE_SCHEMA, f"{where}: images")
        _check_schema(split.captions, CAPTION_SCHEMA, f"{where}: captions")
        for frame, column in ((split.images, "image_id"), (split.captions, "caption_id")):
            duplicated = frame.filter(pl.col(column).is_duplicated())[column].unique().sort()
            if len(duplicated):
                raise ValueError(f"{where}: repeated {column}s {duplicated.head(3).to_list()}")
        orphans = set(split.captions["image_id"]) - set(split.images["image_id"])
        if orphans:
            raise ValueError(f"{where}: captions of unknown images {sorted(orphans)[:3]}")
    names = [task.name for task in prepared.tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"dataset {name!r}: repeated task names in {names}")
    for task in prepared.tasks:
        _check_task(name, task, prepared.splits)


def _check_schema(frame: pl.DataFrame, schema: Mapping[str, Any], where: str) -> None:
    for column, dtype in schema.items():
        if column not in frame.columns:
            raise ValueError(f"{where} lack column {column!r} (columns: {frame.columns})")
        if frame.schema[column] != dtype:
            raise ValueError(f"{where}: column {column!r} is {frame.schema[column]}, not {dtype}")


def _check_task(name: str, task: Task, splits: Mapping[str, Split]) -> None:
    where = f"dataset {name!r}, task {task.name!r}"
    if task.split not in splits:
        raise ValueError(f"{where}: split {task.split!r} is not prepared ({sorted(splits)})")
    split = splits[task.split]
    if task.kind == RETRIEVAL and split.captions.is_empty():
        raise ValueError(f"{where}: split {task.split!r} has no captions to retrieve")
    if task.kind == SEGMENTATION:
        masks = (
            split.images.get_column(task.label_column)
            if task.label_column in split.images.columns
            else None
        )
        if masks is None or masks.dtype != pl.String:
            raise ValueError(f"{where}: images need a string column {task.label_column!r} (masks)")
        if masks.null_count() == len(masks):
            raise ValueError(f"{where}: no image of split {task.split!r} has a mask")
    if task.kind == CLASSIFICATION:
        dtype = split.images.schema.get(task.label_column)
        if dtype is None or not dtype.is_integer():
            raise ValueError(f"{where}: images need an integer column {task.label_column!r}")
        labels = split.images[task.label_column]
        if labels.min() < NOT_IN_TASK or labels.max() >= len(task.classnames):
            raise ValueError(
                f"{where}: {task.label_column!r} must hold class indices in "
                f"0..{len(task.classnames) - 1} (or {NOT_IN_TASK})"
            )
        if (labels == NOT_IN_TASK).all():
            raise ValueError(f"{where}: no image of split {task.split!r} belongs to the task")


def write_dataset(
    out_dir: Path, name: str, spec: Mapping[str, Any], prepared: PreparedDataset, sources: str
) -> None:
    """Write every file of the contract atomically, ``manifest.json`` last.

    ``sources`` is the ``sources_hash`` taken before the dataset was built. Tables of
    splits an earlier preparation wrote and this one does not are removed.
    """
    check_prepared(name, prepared)
    out_dir = Path(out_dir)
    remove_stale_tables(out_dir, prepared.splits)
    for split_name, split in prepared.splits.items():
        labels = [c for c in split.images.columns if c not in IMAGE_SCHEMA]
        write_parquet(split.images.select(*IMAGE_SCHEMA, *labels), out_dir / split_name / IMAGES)
        write_parquet(split.captions.select(*CAPTION_SCHEMA), out_dir / split_name / CAPTIONS)
    write_parquet(build_prompts_frame(prepared.tasks), out_dir / PROMPTS)
    write_json(out_dir / TASKS, [task.to_dict() for task in prepared.tasks])
    split_names = sorted(prepared.splits)
    manifest = {
        "name": name,
        "spec": dict(spec),
        "spec_hash": dataset_spec_hash(name, spec),
        "format_version": FORMAT_VERSION,
        "splits": {
            s: {
                "images": len(prepared.splits[s].images),
                "captions": len(prepared.splits[s].captions),
            }
            for s in split_names
        },
        "tasks": [task.name for task in prepared.tasks],
        "content_hash": content_hash(out_dir, split_names),
        "sources_hash": sources,
        "versions": dataset_versions(),
    }
    write_json(out_dir / MANIFEST, manifest)


def remove_stale_tables(out_dir: Path, keep: Iterable[str]) -> None:
    """Remove split tables, then their emptied folders, from folders not named in ``keep``."""
    out_dir, keep = Path(out_dir), set(keep)
    if not out_dir.is_dir():
        return
    for folder in sorted(out_dir.iterdir()):
        tables = [folder / table for table in (IMAGES, CAPTIONS)]
        if folder.name in keep or folder.is_symlink() or not any(t.is_file() for t in tables):
            continue
        for table in tables:
            table.unlink(missing_ok=True)
        if not any(folder.iterdir()):
            folder.rmdir()


def dataset_versions() -> dict[str, str]:
    """The project's tracked library versions plus those that write the dataset's bytes."""
    return library_versions() | {package: metadata.version(package) for package in DATA_PACKAGES}


def content_hash(out_dir: Path, split_names: Iterable[str]) -> str:
    """sha256 over the written tables and the files the image tables point to."""
    out_dir = Path(out_dir)
    digest = hashlib.sha256()

    def feed(label: str, data: bytes) -> None:
        digest.update(f"{label}\0{len(data)}\0".encode())
        digest.update(data)

    for split in split_names:
        for table in (IMAGES, CAPTIONS):
            feed(f"{split}/{table}", _read_bytes(out_dir / split / table))
        images = pl.read_parquet(out_dir / split / IMAGES)
        for column in FILE_COLUMNS:
            for value in images[column] if column in images.columns else ():
                feed(value, _file_fingerprint(out_dir, value))
    for table in (PROMPTS, TASKS):
        feed(table, _read_bytes(out_dir / table))
    return digest.hexdigest()


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"dataset file {path} is missing") from None


def _file_fingerprint(out_dir: Path, value: str) -> bytes:
    """Bytes of a generated (relative) file; size and mtime of a user's (absolute) file."""
    path = out_dir / value
    if not Path(value).is_absolute():
        return _read_bytes(path)
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"dataset file {path} is missing") from None
    return f"{stat.st_size}:{stat.st_mtime_ns}".encode()


# --- reading --------------------------------------------------------------------------------


def read_manifest(dataset_dir: Path) -> dict[str, Any]:
    """The manifest of a prepared dataset; errors name the file when absent or malformed."""
    path = Path(dataset_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"dataset at {dataset_dir} is not prepared: no {path}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or not set(manifest) >= MANIFEST_KEYS:
        missing = sorted(MANIFEST_KEYS - set(manifest)) if isinstance(manifest, dict) else "all"
        raise ValueError(f"{path} is malformed: missing keys {missing}")
    return manifest


def load_split(dataset_dir: Path, split: str) -> Split:
    """Read one prepared split; the images and captions frames keep the on-disk row order."""
    dataset_dir = Path(dataset_dir)
    counts = read_manifest(dataset_dir)["splits"]
    if split not in counts:
        raise KeyError(
            f"dataset at {dataset_dir} has no split {split!r} (splits: {sorted(counts)})"
        )
    images = _read_table(dataset_dir / split / IMAGES, IMAGE_SCHEMA)
    captions = _read_table(dataset_dir / split / CAPTIONS, CAPTION_SCHEMA)
    expected = counts[split]
    if (len(images), len(captions)) != (expected["images"], expected["captions"]):
        raise ValueError(
            f"{dataset_dir / split}: {len(images)} images and {len(captions)} captions, but the "
            f"manifest says {expected['images']} and {expected['captions']}; prepare it again"
        )
    return Split(images=images, captions=captions, root=dataset_dir)


def load_tasks(dataset_dir: Path) -> list[Task]:
    dataset_dir = Path(dataset_dir)
    read_manifest(dataset_dir)
    path = dataset_dir / TASKS
    try:
        records = json.loads(_read_bytes(path))
        if not isinstance(records, list):
            raise ValueError("expected a list of tasks")
        return [Task.from_dict(record) for record in records]
    except (json.JSONDecodeError, ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{path} is malformed: {err}") from None


def load_prompts(dataset_dir: Path) -> pl.DataFrame:
    dataset_dir = Path(dataset_dir)
    read_manifest(dataset_dir)
    return _read_table(dataset_dir / PROMPTS, PROMPT_SCHEMA)


def _read_table(path: Path, schema: Mapping[str, Any]) -> pl.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} is missing")
    try:
        frame = pl.read_parquet(path)
    except Exception as err:  # polars raises several error types for unreadable files
        raise ValueError(f"{path} is not a readable Parquet file: {err}") from None
    _check_schema(frame, schema, str(path))
    return frame
