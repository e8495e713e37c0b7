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
Entries naming the same image are merged into one row (sentences united by ``sentid``);
they must agree on the split. Rows keep the JSON's order; captions follow their images.
Task: retrieval on ``test`` when it is prepared.
"""

from __future__ import annotations

import json
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
    """One distinct image of the JSON: its split after the restval rule, row and captions."""

    split: str | None
    row: dict[str, str]
    captions: dict[str, dict[str, str]] = field(default_factory=dict)  # by caption_id


def _build(name: str, spec: Mapping[str, Any], out_dir: Path, locate: Locate) -> PreparedDataset:
    json_path = Path(spec["karpathy_json"])
    merged = _merge_entries(
        json_path,
        locate,
        image_root=Path(spec["image_root"]).absolute(),
        restval_in_train=spec.get("restval_in_train", False),
    )
    splits = {}
    for split in spec["splits"]:
        chosen = [image for image in merged.values() if image.split == split]
        if not chosen:
            raise ValueError(f"dataset {name!r}: {json_path} has no images in split {split!r}")
        splits[split] = Split(
            images=pl.DataFrame([image.row for image in chosen], schema=IMAGE_SCHEMA),
            captions=pl.DataFrame(
                [caption for image in chosen for caption in image.captions.values()],
                schema=CAPTION_SCHEMA,
            ),
            root=Path(out_dir),
        )
    _check_files_exist(name, [path for s in splits.values() for path in s.images["path"]])
    tasks = [Task("retrieval", RETRIEVAL, "test")] if "test" in splits else []
    return PreparedDataset(splits, tasks)


def _merge_entries(
    json_path: Path, locate: Locate, image_root: Path, restval_in_train: bool
) -> dict[str, _Image]:
    """The JSON's images by id, in first-seen order; repeated entries of an image merged."""
    merged: dict[str, _Image] = {}
    for i, entry in enumerate(read_karpathy_json(json_path)):
        where = f"{json_path}: image entry {i}"
        try:
            image_id, relative = locate(entry)
            karpathy_split, sentences = entry["split"], entry["sentences"]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{where} is malformed: {err!r}") from None
        if karpathy_split not in TARGET_SPLIT:
            raise ValueError(f"{where} has unknown split {karpathy_split!r}")
        dropped = karpathy_split == "restval" and not restval_in_train
        split = None if dropped else TARGET_SPLIT[karpathy_split]
        row = {"image_id": image_id, "path": str(image_root / relative)}
        image = merged.setdefault(
            image_id, _Image(split, {**row, "karpathy_split": karpathy_split})
        )
        if image.split != split:
            raise ValueError(f"{where}: image {image_id!r} is listed in two splits")
        for caption in _captions(image_id, sentences, where):
            image.captions.setdefault(caption["caption_id"], caption)
    return merged


def _captions(image_id: str, sentences: Any, where: str) -> list[dict[str, str]]:
    captions = []
    for sentence in sentences:
        try:
            caption_id, text = f"{image_id}-{int(sentence['sentid'])}", sentence["raw"].strip()
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{where} has a malformed sentence: {err!r}") from None
        if not text:
            raise ValueError(f"{where}: sentence {caption_id!r} is empty")
        captions.append({"caption_id": caption_id, "image_id": image_id, "text": text})
    return captions


def _check_files_exist(name: str, paths: list[str]) -> None:
    missing = [path for path in paths if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(
            f"dataset {name!r}: {len(missing)} of {len(paths)} image files are missing, "
            f"e.g. {missing[:3]}"
        )
