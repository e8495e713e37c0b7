"""The VOC2012-style segmentation adapter on a fabricated tree in the real on-disk format:
JPEGImages/, palette PNGs in SegmentationClass/ (255 = object borders), split lists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import jobs
from pipeline.data import (
    load_prompts,
    load_split,
    load_tasks,
    prepare_dataset,
    segmentation_tasks,
    source_files,
    validate_spec,
    voc,
)
from pipeline.data.tasks import CLIP_TEMPLATES, IGNORE_INDEX


def palette_png(path: Path, labels: np.ndarray) -> None:
    """A VOC-style mask: mode P, the palette index is the class."""
    image = Image.fromarray(labels.astype(np.uint8), mode="P")
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[1:21] = np.random.default_rng(0).integers(0, 255, (20, 3))
    palette[255] = (224, 224, 192)  # VOC's border colour
    image.putpalette(palette.ravel().tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@pytest.fixture
def tree(tmp_path) -> Path:
    root = tmp_path / "VOCdevkit" / "VOC2012"
    ids = {"train": ["2007_000032", "2007_000039"], "val": ["2007_000033", "2007_000042"]}
    rng = np.random.default_rng(1)
    for split, names in ids.items():
        lists = root / "ImageSets" / "Segmentation"
        lists.mkdir(parents=True, exist_ok=True)
        (lists / f"{split}.txt").write_text("".join(f"{name}\n" for name in names))
        for k, name in enumerate(names):
            (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 255, (6, 9, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "JPEGImages" / f"{name}.jpg")
            labels = np.zeros((6, 9), dtype=np.uint8)
            labels[1:4, 2:6] = 15 if k == 0 else 20  # person / tv monitor
            labels[0, :] = IGNORE_INDEX
            palette_png(root / "SegmentationClass" / f"{name}.png", labels)
    (root / "ImageSets" / "Segmentation" / "trainval.txt").write_text(
        "".join(f"{name}\n" for names in ids.values() for name in names)
    )
    return root


def test_voc_val_is_a_segmentation_task_with_palette_masks(tree, tmp_path):
    out = tmp_path / "prepared"
    spec = {"source": "voc_segmentation", "root": str(tree)}
    assert validate_spec("voc", spec)["splits"] == ["val"]
    assert segmentation_tasks("voc", spec) == [("segmentation", "val")]
    prepare_dataset("voc", spec, out)
    [task] = load_tasks(out)
    assert (task.name, task.kind, task.split, task.label_column) == (
        "segmentation",
        "segmentation",
        "val",
        "mask_path",
    )
    assert len(task.classnames) == 21 and task.classnames[0] == "background"
    assert task.classnames[15] == "person" and task.classnames[20] == "tv monitor"
    assert task.templates == CLIP_TEMPLATES
    data = load_split(out, "val")
    assert data.images["image_id"].to_list() == ["voc-2007_000033", "voc-2007_000042"]
    assert data.captions.is_empty()
    first, second = data.open_mask(0), data.open_mask(1)
    assert first.shape == (6, 9) and set(np.unique(first).tolist()) == {0, 15, 255}
    assert set(np.unique(second).tolist()) == {0, 20, 255}  # indices, never palette colours
    assert data.open_image(0).size == (9, 6)
    prompts = load_prompts(out)
    assert len(prompts) == 21 * len(CLIP_TEMPLATES)
    assert "a photo of the large tv monitor." in prompts["text"].to_list()
    listed = source_files("voc", spec)
    assert listed[0] == tree / "ImageSets" / "Segmentation" / "val.txt"
    assert tree / "SegmentationClass" / "2007_000042.png" in listed


def test_voc_splits_templates_and_errors(tree, tmp_path):
    templates = tmp_path / "templates.txt"
    templates.write_text("a {}.\nthe {} in a scene.\n")
    spec = {"source": "voc_segmentation", "root": str(tree), "splits": ["train", "val"]}
    prepare_dataset("voc", {**spec, "templates": str(templates)}, tmp_path / "both")
    [task] = load_tasks(tmp_path / "both")
    assert task.split == "val" and task.templates == ("a {}.", "the {} in a scene.")
    assert segmentation_tasks("voc", {**spec, "splits": ["train"]}) == [("segmentation", "train")]
    with pytest.raises(ValueError, match=r"'2007_000033' is listed in splits 'trainval'"):
        prepare_dataset("voc", {**spec, "splits": ["trainval", "val"]}, tmp_path / "overlap")
    with pytest.raises(ValueError, match=r"names unknown split 'test' .*Segmentation/<split>.txt"):
        validate_spec("voc", {**spec, "splits": ["test"]})
    for folder in ("SegmentationClass", "JPEGImages"):  # missing data: refused before any job
        (tree / folder).rename(tmp_path / folder)
        with pytest.raises(ValueError, match=rf"'root' has no {folder} folder: .*{folder} is"):
            validate_spec("voc", spec)
        (tmp_path / folder).rename(tree / folder)
    (tree / "SegmentationClass" / "2007_000042.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"mask of '2007_000042' is missing"):
        prepare_dataset("voc", spec, tmp_path / "missing")
    lists = tree / "ImageSets" / "Segmentation" / "val.txt"
    lists.write_text("2007_000033\n2007_000033\n")
    with pytest.raises(ValueError, match="lists '2007_000033' twice"):
        voc.read_list("voc", tree, "val")


def test_the_workflow_plans_vision_tokens_for_a_segmentation_split(tree):
    """Every pooled method of a config that evaluates VOC val reads its vision token set."""
    from pipeline.config import load_config

    root = Path(__file__).resolve().parent.parent
    config = load_config(root / "config.yaml")
    config["align"]["methods"].pop("pal")  # PAL would read every evaluation split's tokens
    config["datasets"]["voc"] = validate_spec(
        "voc", {"source": "voc_segmentation", "root": str(tree)}
    )
    config["experiment"]["evaluate"].append({"dataset": "voc", "split": "val"})
    vision = config["experiment"]["pairs"][0]["vision"]
    assert ("voc", "val", vision) in jobs.token_sets(config)
    job = jobs.evaluate_aligners(config, vision, "minilm", "csa", "best")
    assert job.inputs["patches_1"].endswith(f"tokens/voc/val/{vision}.done")
    config["experiment"]["evaluate"][-1]["tasks"] = []  # segmentation not asked for
    assert ("voc", "val", vision) not in jobs.token_sets(config)
