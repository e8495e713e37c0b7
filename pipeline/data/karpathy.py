"""Karpathy splits of COCO-2014 (``source: coco_karpathy``) and Flickr30k (``flickr30k_karpathy``).

Input: Karpathy's ``dataset_coco.json`` / ``dataset_flickr30k.json``::

    {"images": [{"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg",
                 "split": "train|restval|val|test", "cocoid": 391895,
                 "sentences": [{"raw": "A man ...", "sentid": 770337}, ...]}, ...]}

Flickr30k entries have no ``filepath`` (all images in ``image_root``) and no ``cocoid``.

Splits: ``train`` (with COCO's ``restval`` when ``restval_in_train``, the default; dropped
otherwise), ``val`` and ``test`` (the 5k COCO / 1k Flickr30k Karpathy test). The optional
key ``splits`` prepares a subset of them. Ids: ``coco-<cocoid>`` or
``flickr30k-<file name stem>``; captions ``<image_id>-<sentid>``. ``images.parquet`` holds
``image_id``, ``path`` (absolute) and ``karpathy_split`` (the split named in the JSON).
Rows keep the JSON's order; captions follow their images. Task: retrieval on ``test`` when
it is prepared.

Repeats are errors that name both entries: two entries with one image id (whether they
name one file or two), two entries naming one file (under two ids), and one ``sentid``
twice in an entry. Karpathy's files have none; a repeat means an edited or concatenated
file, and merging it would either pair one file's captions with another file's pixels or
silently change how many captions (pairs) an image has. Images may share ``sentid`` values
(their caption ids differ), as hand-made files numbering sentences per image do.

Source files (``source_files``): the JSON only. The images it references are not listed:
COCO has 123k of them, listing them means parsing the JSON (over 100 MB) and stat-ing every
image each time a workflow is planned, and they are published, unchanging files. Each
image's size and modification time are still recorded in the manifest's
``content_hash``, which ``prepare_dataset`` checks again before returning early.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.data.manifest import (
    CAPTION_SCHEMA,
    PreparedDataset,
    Split,
    check_keys,
    spec_bool,
    spec_path,
    spec_splits,
)
from pipeline.data.tasks import RETRIEVAL, Task

SPLITS = ("train", "val", "test")
TARGET_SPLIT = {"train": "train", "restval": "train", "val": "val", "test": "test"}
IMAGE_SCHEMA = {"image_id": pl.String, "path": pl.String, "karpathy_split": pl.String}

# (image_id, path relative to image_root) of one JSON entry
Locate = Callable[[Mapping[str, Any]], tuple[str, str]]


def locate_coco(entry: Mapping[str, Any]) -> tuple[str, str]:
    return f"coco-{int(entry['cocoid'])}", f"{entry['filepath']}/{entry['filename']}"


def locate_flickr(entry: Mapping[str, Any]) -> tuple[str, str]:
    return f"flickr30k-{Path(entry['filename']).stem}", entry["filename"]


def normalize_coco_spec(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    return _normalize(name, spec, "coco_karpathy", with_restval=True)


def normalize_flickr_spec(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    return _normalize(name, spec, "flickr30k_karpathy", with_restval=False)


def _normalize(
    name: str, spec: Mapping[str, Any], source: str, with_restval: bool
) -> dict[str, Any]:
    optional = ("restval_in_train", "splits") if with_restval else ("splits",)
    check_keys(name, spec, required=("karpathy_json", "image_root"), optional=optional)
    normalized = {
        "source": source,
        "karpathy_json": spec_path(name, spec, "karpathy_json", is_dir=False),
        "image_root": spec_path(name, spec, "image_root", is_dir=True),
        "splits": spec_splits(name, spec, SPLITS, list(SPLITS)),
    }
    if with_restval:
        normalized["restval_in_train"] = spec_bool(name, spec, "restval_in_train", True)
    return normalized


def source_files(name: str, spec: Mapping[str, Any]) -> list[Path]:
    """The files a prepared Karpathy dataset is made from: its JSON (see the module docstring)."""
    return [Path(spec["karpathy_json"])]


def build_coco(name: str, spec: Mapping[str, Any], out_dir: Path) -> PreparedDataset:
    return _build(name, spec, out_dir, locate_coco)


def build_flickr(name: str, spec: Mapping[str, Any], out_dir: Path) -> PreparedDataset:
    return _build(name, spec, out_dir, locate_flickr)


def read_karpathy_json(path: Path) -> list[dict[str, Any]]:
    """The ``images`` list of a Karpathy split file; errors name the file."""
    try:
        document = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(document, dict) or not isinstance(document.get("images"), list):
        raise ValueError(f"{path} is not a Karpathy split file: no 'images' list")
    return document["images"]


@dataclass
class _Image:
    """One image entry of the JSON: its split after the restval rule, row and captions."""

    split: str | None
    row: dict[str, str]
    captions: list[dict[str, str]] = field(default_factory=list)


def _build(name: str, spec: Mapping[str, Any], out_dir: Path, locate: Locate) -> PreparedDataset:
    json_path = Path(spec["karpathy_json"])
    images = _read_images(
        name,
        json_path,
        locate,
        image_root=Path(spec["image_root"]).absolute(),
        restval_in_train=spec.get("restval_in_train", False),
    )
    splits = {}
    for split in spec["splits"]:
        chosen = [image for image in images if image.split == split]
        if not chosen:
            raise ValueError(f"dataset {name!r}: {json_path} has no images in split {split!r}")
        splits[split] = Split(
            images=pl.DataFrame([image.row for image in chosen], schema=IMAGE_SCHEMA),
            captions=pl.DataFrame(
                [caption for image in chosen for caption in image.captions],
                schema=CAPTION_SCHEMA,
            ),
            root=Path(out_dir),
        )
    _check_files_exist(name, [path for s in splits.values() for path in s.images["path"]])
    tasks = [Task("retrieval", RETRIEVAL, "test")] if "test" in splits else []
    return PreparedDataset(splits, tasks)


def _read_images(
    name: str, json_path: Path, locate: Locate, image_root: Path, restval_in_train: bool
) -> list[_Image]:
    """The JSON's image entries in order; each id, file and caption id exactly once."""
    images: list[_Image] = []
    by_id: dict[str, int] = {}  # image id -> entry index
    by_file: dict[str, int] = {}  # path relative to image_root -> entry index
    files: list[str] = []
    for i, entry in enumerate(read_karpathy_json(json_path)):
        where = f"dataset {name!r}: {json_path}: image entry {i}"
        try:
            image_id, relative = locate(entry)
            relative = posixpath.normpath(relative)
            karpathy_split, sentences = entry["split"], entry["sentences"]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where} is malformed: {err!r}") from None
        if karpathy_split not in TARGET_SPLIT:
            raise ValueError(f"{where} has unknown split {karpathy_split!r}")
        files.append(relative)
        if image_id in by_id:
            j = by_id[image_id]
            same = "the same file" if files[j] == relative else "different files"
            raise ValueError(
                f"dataset {name!r}: {json_path}: image entries {j} ({files[j]}, split "
                f"{images[j].row['karpathy_split']!r}) and {i} ({relative}, split "
                f"{karpathy_split!r}) both have id {image_id!r}, with {same}; each image must "
                "be listed once"
            )
        if relative in by_file:
            j = by_file[relative]
            raise ValueError(
                f"dataset {name!r}: {json_path}: image entries {j} (id "
                f"{images[j].row['image_id']!r}) and {i} (id {image_id!r}) both name the "
                f"file {relative}; each image must be listed once"
            )
        by_id[image_id], by_file[relative] = i, i
        dropped = karpathy_split == "restval" and not restval_in_train
        row = {
            "image_id": image_id,
            "path": str(image_root / relative),
            "karpathy_split": karpathy_split,
        }
        captions = _captions(image_id, sentences, f"{where} ({image_id!r})")
        images.append(_Image(None if dropped else TARGET_SPLIT[karpathy_split], row, captions))
    return images


def _captions(image_id: str, sentences: Any, where: str) -> list[dict[str, str]]:
    """The entry's captions; a sentid given twice is an error naming both sentences."""
    captions: list[dict[str, str]] = []
    positions: dict[str, int] = {}  # caption id -> index in sentences
    if not isinstance(sentences, list):
        raise ValueError(f"{where}: 'sentences' must be a list, not {type(sentences).__name__}")
    for k, sentence in enumerate(sentences):
        try:
            sentid = int(sentence["sentid"])
            caption_id, text = f"{image_id}-{sentid}", sentence["raw"].strip()
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{where} has a malformed sentence {k}: {err!r}") from None
        if not text:
            raise ValueError(f"{where}: sentence {k} (sentid {sentid}) is empty")
        if caption_id in positions:
            raise ValueError(
                f"{where}: sentences {positions[caption_id]} and {k} both have sentid {sentid}"
            )
        positions[caption_id] = k
        captions.append({"caption_id": caption_id, "image_id": image_id, "text": text})
    return captions


def _check_files_exist(name: str, paths: list[str]) -> None:
    missing = [path for path in paths if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(
            f"dataset {name!r}: {len(missing)} of {len(paths)} image files are missing, "
            f"e.g. {missing[:3]}"
        )
