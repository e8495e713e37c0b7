"""Datasets: prepare a dataset spec into the on-disk contract, and read it back.

``prepare_dataset(name, spec, out_dir)`` writes ``results/datasets/<name>/`` (layout in
``manifest.py``); the readers (``load_split``, ``load_tasks``, ``load_prompts``,
``read_manifest``) are what the other stages use, and every image is read through
``images.load_rgb``. ``source_files(name, spec)`` lists the files a prepared dataset is
made from, for a workflow to track. Sources, chosen by ``spec["source"]``:

- ``synthetic``: the offline world of coloured shapes (``synthetic.py``);
- ``coco_karpathy`` / ``flickr30k_karpathy``: Karpathy splits on disk (``karpathy.py``);
- ``image_folder``: ``<root>/<split>/<class>/<image>`` classification sets (``image_folder.py``);
- ``voc_segmentation``: PASCAL VOC 2012-style segmentation folders (``voc.py``);
- ``benchmark``: CLIP's zero-shot classification suite in its distributions' formats, read
  through torchvision where it has the dataset (``benchmarks.py``);
- ``pascal_context`` / ``ade20k``: Pascal Context-59 and ADE20K segmentation
  (``scene_parsing.py``).

Zero-shot tasks and their label convention are described in ``tasks.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.data import benchmarks, image_folder, karpathy, scene_parsing, synthetic, voc
from pipeline.data.images import load_mask, load_rgb
from pipeline.data.manifest import (
    MANIFEST,
    PreparedDataset,
    Split,
    is_prepared,
    load_prompts,
    load_split,
    load_tasks,
    read_manifest,
    sources_hash,
    write_dataset,
)
from pipeline.data.tasks import Task

__all__ = [
    "SOURCES",
    "Split",
    "Task",
    "load_mask",
    "load_prompts",
    "load_rgb",
    "load_split",
    "load_tasks",
    "prepare_dataset",
    "read_manifest",
    "segmentation_tasks",
    "source_files",
    "validate_spec",
]


class Source(NamedTuple):
    """How one kind of dataset is checked (defaults filled in), built, and what it reads.

    ``sources`` takes a normalized spec and lists the files whose content determines the
    prepared dataset (see ``source_files``).
    """

    normalize: Callable[[str, Mapping[str, Any]], dict[str, Any]]
    build: Callable[[str, Mapping[str, Any], Path], PreparedDataset]
    sources: Callable[[str, Mapping[str, Any]], list[Path]]
    segmentation: Callable[[str, Mapping[str, Any]], list[tuple[str, str]]] = lambda name, spec: []


SOURCES: dict[str, Source] = {
    "synthetic": Source(
        synthetic.normalize_spec,
        synthetic.build,
        synthetic.source_files,
        synthetic.segmentation_tasks,
    ),
    "coco_karpathy": Source(
        karpathy.normalize_coco_spec, karpathy.build_coco, karpathy.source_files
    ),
    "flickr30k_karpathy": Source(
        karpathy.normalize_flickr_spec, karpathy.build_flickr, karpathy.source_files
    ),
    "image_folder": Source(
        image_folder.normalize_spec, image_folder.build, image_folder.source_files
    ),
    "voc_segmentation": Source(
        voc.normalize_spec, voc.build, voc.source_files, voc.segmentation_tasks
    ),
    "benchmark": Source(benchmarks.normalize_spec, benchmarks.build, benchmarks.source_files),
    "pascal_context": Source(
        scene_parsing.normalize_context,
        scene_parsing.build_context,
        scene_parsing.context_sources,
        scene_parsing.segmentation_tasks("val"),
    ),
    "ade20k": Source(
        scene_parsing.normalize_ade,
        scene_parsing.build_ade,
        scene_parsing.ade_sources,
        scene_parsing.segmentation_tasks("validation"),
    ),
}
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def validate_spec(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """Check a dataset spec before any work; return it with defaults filled in.

    Raises ValueError naming the dataset and the offending key.
    """
    if not isinstance(name, str) or not DATASET_NAME.fullmatch(name):
        raise ValueError(f"dataset name {name!r} must be letters, digits, '_', '.' or '-'")
    if not isinstance(spec, Mapping):
        raise ValueError(f"dataset {name!r}: spec must be a mapping, not {type(spec).__name__}")
    source = spec.get("source")
    if source not in SOURCES:
        raise ValueError(
            f"dataset {name!r}: key 'source' is {source!r}, not one of {list(SOURCES)}"
        )
    return SOURCES[source].normalize(name, spec)


def source_files(name: str, spec: Mapping[str, Any]) -> list[Path]:
    """The files whose content determines the prepared dataset, for a workflow to track.

    Pure (it reads only directory listings): the spec is validated, then its source lists
    them, paths as the spec names them (relative ones relative to the working directory).
    Synthetic: none. Karpathy COCO / Flickr30k: the JSON (not its 123k / 31k images; see
    ``karpathy``). Image folders: class-name and template files, then every image, sorted.
    """
    normalized = validate_spec(name, spec)
    return SOURCES[normalized["source"]].sources(name, normalized)


def segmentation_tasks(name: str, spec: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(task name, split) of every segmentation task the dataset will have, from its spec
    alone (no file is read but what validation reads): the workflow plans the token caches
    that segmentation evaluation reads before the dataset is prepared."""
    normalized = validate_spec(name, spec)
    return SOURCES[normalized["source"]].segmentation(name, normalized)


def prepare_dataset(name: str, spec: Mapping[str, Any], out_dir: Path) -> None:
    """Prepare ``spec`` into ``out_dir``; returns at once if it is already prepared.

    Prepared means: same spec, source files with the size and modification time they had
    (``source_files``), and prepared files unaltered (``manifest.is_prepared``).
    """
    normalized = validate_spec(name, spec)
    out_dir = Path(out_dir)
    sources = sources_hash(SOURCES[normalized["source"]].sources(name, normalized))
    if is_prepared(out_dir, name, normalized, sources):
        return
    (out_dir / MANIFEST).unlink(missing_ok=True)  # whatever follows is incomplete until rewritten
    prepared = SOURCES[normalized["source"]].build(name, normalized, out_dir)
    write_dataset(out_dir, name, normalized, prepared, sources)


def planned_counts(spec: Mapping[str, Any], split: str) -> tuple[int, int] | None:
    """(images, caption pairs) a normalized spec's split will hold, when the spec alone says
    (the synthetic world); None when only the prepared data can tell."""
    if spec["source"] != "synthetic" or split not in spec["splits"]:
        return None
    images = spec["splits"][split]
    return images, images * spec["captions_per_image"]


def planned_tasks(spec: Mapping[str, Any], split: str) -> list[str] | None:
    """Names of the zero-shot tasks a normalized spec's split will have, when the spec alone
    says (the synthetic world); None when only the prepared data can tell."""
    if spec["source"] != "synthetic":
        return None
    holdout = synthetic.holdout_combinations(spec["seed"], spec["holdout_combinations"])
    return [t.name for t in synthetic.world_tasks(holdout, spec["max_count"]) if t.split == split]
