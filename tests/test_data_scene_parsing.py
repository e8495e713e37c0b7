"""Pascal Context-59 and ADE20K segmentation: miniature trees in the distributions' formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from pipeline.data import (
    load_split,
    load_tasks,
    prepare_dataset,
    segmentation_tasks,
    source_files,
    validate_spec,
)
from pipeline.data.scene_parsing import CONTEXT_59
from pipeline.data.tasks import CLIP_TEMPLATES

SIZE = (20, 14)  # width, height of every image


def image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", SIZE, (90, 120, 30)).save(path)


def context_tree(
    tmp_path: Path, voc: Path | None = None, context: Path | None = None
) -> tuple[dict, np.ndarray]:
    """Raw labels.txt numbering unlike the 59's order (and with classes outside the 59); the
    VOC2010 and Context folders under ``tmp_path`` unless named."""
    voc, context = voc or tmp_path / "VOC2010", context or tmp_path / "context"
    raw = ["accordion", *reversed(CONTEXT_59), "zebra"]  # raw label r + 1 names raw[r]
    (context / "trainval").mkdir(parents=True)
    (context / "labels.txt").write_text("".join(f"{i}: {n}\n" for i, n in enumerate(raw, 1)))
    lists = voc / "ImageSets" / "SegmentationContext"
    lists.mkdir(parents=True)
    (lists / "val.txt").write_text("2008_000002\n2008_000010\n")
    (lists / "train.txt").write_text("2008_000003\n")
    number = {n: i for i, n in enumerate(raw, 1)}
    label_map = np.zeros(SIZE[::-1], dtype=np.uint16)
    label_map[:, :5] = number["aeroplane"]  # class 1
    label_map[:, 5:10] = number["wood"]  # class 59
    label_map[:, 10:15] = number["zebra"]  # not one of the 59: background
    label_map[:, 15:] = number["tvmonitor"]  # class 20
    for image_id in ("2008_000002", "2008_000010", "2008_000003"):
        image(voc / "JPEGImages" / f"{image_id}.jpg")
        scipy.io.savemat(context / "trainval" / f"{image_id}.mat", {"LabelMap": label_map})
    expected = np.zeros(SIZE[::-1], dtype=np.uint8)
    expected[:, :5], expected[:, 5:10], expected[:, 15:] = 1, 59, 20
    return {"source": "pascal_context", "root": str(voc), "context": str(context)}, expected


def ade_tree(tmp_path: Path) -> tuple[dict, np.ndarray]:
    """``ADEChallengeData2016`` under ``tmp_path``: one image per split."""
    root = tmp_path / "ADEChallengeData2016"
    names = ["wall", "building, edifice", *(f"thing {i}, stuff" for i in range(3, 151))]
    rows = "".join(f"{i}\t0.01\t100\t10\t{n}\n" for i, n in enumerate(names, 1))
    root.mkdir()
    (root / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n" + rows)
    annotation = np.zeros(SIZE[::-1], dtype=np.uint8)  # 0: "other", ignored
    annotation[:, 5:10], annotation[:, 10:] = 1, 150
    for split, image_id in (("validation", "ADE_val_00000001"), ("training", "ADE_train_00000001")):
        image(root / "images" / split / f"{image_id}.jpg")
        (root / "annotations" / split).mkdir(parents=True)
        Image.fromarray(annotation).save(root / "annotations" / split / f"{image_id}.png")
    expected = np.full(SIZE[::-1], 255, dtype=np.uint8)
    expected[:, 5:10], expected[:, 10:] = 0, 149
    return {"source": "ade20k", "root": str(root)}, expected


@pytest.mark.parametrize("tree", [context_tree, ade_tree])
def test_masks_are_written_in_the_pipelines_convention(tree, tmp_path) -> None:
    spec, expected = tree(tmp_path)
    split = "val" if spec["source"] == "pascal_context" else "validation"
    assert segmentation_tasks("d", spec) == [("segmentation", split)]
    assert validate_spec("d", spec)["splits"] == [split]
    assert source_files("d", spec)
    prepare_dataset("d", spec, tmp_path / "out")
    [task] = load_tasks(tmp_path / "out")
    assert task.kind == "segmentation" and task.split == split and task.templates == CLIP_TEMPLATES
    data = load_split(tmp_path / "out", split)
    assert len(data.images) == (2 if spec["source"] == "pascal_context" else 1)
    for row in range(len(data.images)):
        assert np.array_equal(data.open_mask(row), expected)
        assert data.open_image(row).size == SIZE
    if spec["source"] == "pascal_context":
        assert len(task.classnames) == 60 and task.classnames[0] == "background"
        assert task.background == 0  # miou_fg leaves it out
        assert task.classnames[1] == "aeroplane" and task.classnames[20] == "tv monitor"
        assert task.classnames[59] == "wood"
    else:
        assert len(task.classnames) == 150
        assert task.classnames[:2] == ("wall", "building") and task.classnames[149] == "thing 150"
        assert task.background is None  # no background: miou_fg must not drop "wall"


def test_other_splits_and_missing_data(tmp_path) -> None:
    spec, _ = context_tree(tmp_path)
    assert segmentation_tasks("d", {**spec, "splits": ["train"]}) == [("segmentation", "train")]
    with pytest.raises(ValueError, match=r"unknown split 'test' .*SegmentationContext/<split>"):
        validate_spec("d", {**spec, "splits": ["test"]})
    (Path(spec["context"]) / "labels.txt").unlink()
    with pytest.raises(ValueError, match=r"dataset 'd': key 'context'.*labels.txt is missing"):
        validate_spec("d", spec)
    (tmp_path / "ade").mkdir()
    spec, _ = ade_tree(tmp_path / "ade")
    (Path(spec["root"]) / "objectInfo150.txt").unlink()
    with pytest.raises(ValueError, match="has no objectInfo150"):
        validate_spec("d", spec)
    with pytest.raises(ValueError, match=r"key 'root' holds no images: .*images is missing"):
        validate_spec("d", {"source": "ade20k", "root": str(tmp_path)})


def test_a_listed_image_without_its_annotation_is_an_error(tmp_path) -> None:
    spec, _ = context_tree(tmp_path)
    (Path(spec["context"]) / "trainval" / "2008_000010.mat").unlink()
    with pytest.raises(FileNotFoundError, match="annotation of '2008_000010' is missing"):
        prepare_dataset("d", spec, tmp_path / "out")
