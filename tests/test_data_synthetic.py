"""The synthetic world: determinism, faithful captions and masks, held-out combinations,
and the on-disk contract (tables, tasks, prompts, manifest)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from matplotlib.path import Path as MplPath
from scipy import ndimage

from pipeline.data import (
    load_prompts,
    load_split,
    load_tasks,
    prepare_dataset,
    read_manifest,
    validate_spec,
)
from pipeline.data import synthetic as world
from pipeline.data.manifest import content_hash

SPEC = {"source": "synthetic", "seed": 7, "splits": {"train": 300, "val": 30, "test": 120}}

# The test's own reading of the captions, independent of the generator's vocabulary tables.
SHAPE_KEYWORDS = {
    "circle": ("circle", "circles", "disc", "discs"),
    "square": ("square", "squares"),
    "triangle": ("triangle", "triangles"),
    "star": ("star", "stars"),
    "cross": ("cross", "crosses", "plus sign", "plus signs"),
    "diamond": ("diamond", "diamonds", "rhombus", "rhombi"),
}
PLURALS = {"circles", "discs", "squares", "triangles", "stars", "crosses", "plus signs"}
PLURALS |= {"diamonds", "rhombi"}
COLOUR_KEYWORDS = {c: (c,) for c in ("red", "green", "blue", "yellow", "orange")}
COLOUR_KEYWORDS["purple"] = ("purple", "violet")
SIZE_KEYWORDS = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium", "mid-sized"),
    "large": ("large", "big"),
}
POSITION_KEYWORDS = {
    "left": ("left",),
    "right": ("right",),
    "top": ("top", "upper"),
    "bottom": ("bottom", "lower"),
    "centre": ("centre", "center", "middle"),
}
NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
NUMBERS = {word: i + 1 for i, word in enumerate(NUMBER_WORDS)}


def mentioned(text: str, table: dict[str, tuple[str, ...]]) -> set[str]:
    return {key for key, words in table.items() if any(has_word(text, w) for w in words)}


def has_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text.lower()) is not None


def parsed_count(text: str) -> int:
    tokens = re.findall(r"[a-z0-9]+", text.lower())
    numbers = {NUMBERS[t] for t in tokens if t in NUMBERS} | {int(t) for t in tokens if t.isdigit()}
    assert len(numbers) <= 1, text
    return numbers.pop() if numbers else 1


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    prepare_dataset("shapes", SPEC, out)
    return out


def all_files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# --- determinism ----------------------------------------------------------------------------


def test_same_spec_gives_byte_identical_files(shapes, tmp_path):
    prepare_dataset("shapes", SPEC, tmp_path)
    first, second = all_files(shapes), all_files(tmp_path)
    assert first.keys() == second.keys()
    assert len(first) == 2 * 450 + 2 * 3 + 3  # images, masks, split tables, prompts/tasks/manifest
    assert all(first[name] == second[name] for name in first)


def test_other_seed_gives_other_images(shapes, tmp_path):
    prepare_dataset("shapes", {**SPEC, "seed": 8, "splits": {"test": 20}}, tmp_path)
    images = [p.relative_to(tmp_path) for p in sorted((tmp_path / "test/images").glob("*.png"))]
    same = [(shapes / p).read_bytes() == (tmp_path / p).read_bytes() for p in images]
    assert len(images) == 20 and not any(same)


def test_an_image_depends_only_on_seed_split_and_index(shapes, tmp_path):
    prepare_dataset("shapes", {**SPEC, "splits": {"train": 20, "test": 150}}, tmp_path)
    for split, n in (("train", 20), ("test", 120)):
        for folder in ("images", "masks"):
            for i in range(n):
                name = f"{split}/{folder}/shapes-{split}-{i:06d}.png"
                assert (shapes / name).read_bytes() == (tmp_path / name).read_bytes(), name
    small, large = load_split(shapes, "test"), load_split(tmp_path, "test")
    assert large.images.head(120).equals(small.images)
    assert large.captions.head(120 * 5).equals(small.captions)


# --- captions, masks, attributes -------------------------------------------------------------


def test_captions_state_the_attributes(shapes):
    for split in ("train", "val", "test"):
        data = load_split(shapes, split)
        captions = data.captions.join(data.images, on="image_id")
        assert len(captions) == 5 * len(data.images)
        for row in captions.iter_rows(named=True):
            text = row["text"]
            assert mentioned(text, SHAPE_KEYWORDS) == {row["shape"]}, text
            assert mentioned(text, COLOUR_KEYWORDS) == {row["colour"]}, text
            assert mentioned(text, SIZE_KEYWORDS) == {row["size"]}, text
            assert mentioned(text, POSITION_KEYWORDS) == {row["position"]}, text
            assert parsed_count(text) == row["count"], text
            assert any(has_word(text, p) for p in PLURALS) == (row["count"] > 1), text


def test_captions_of_an_image_are_varied(shapes):
    captions = load_split(shapes, "test").captions
    per_image = captions.group_by("image_id").agg(pl.col("text").n_unique().alias("distinct"))
    assert (per_image["distinct"] == 5).all()
    words = set(" ".join(captions["text"]).lower().split())
    assert {"two", "2", "disc", "circle", "violet", "purple", "big", "large"} <= words


# The test's own templates of the shapes on the unit square (a 5-point star with a thicker
# waist than the generator's): each object, resampled onto a 24 x 24 grid over its box, must
# be nearest (IoU) to its own shape's template.
_U, _V = np.meshgrid((np.arange(24) + 0.5) / 24, (np.arange(24) + 0.5) / 24)
_STAR = [
    ((1.0 if k % 2 == 0 else 0.5) * math.cos(a), (1.0 if k % 2 == 0 else 0.5) * math.sin(a))
    for k, a in ((k, -math.pi / 2 + k * math.pi / 5) for k in range(10))
]
SHAPE_TEMPLATES = {
    "circle": (_U - 0.5) ** 2 + (_V - 0.5) ** 2 <= 0.25,
    "square": np.ones_like(_U, dtype=bool),
    "triangle": np.abs(2 * _U - 1) <= _V,
    "star": MplPath((np.array(_STAR) - np.min(_STAR, axis=0)) / np.ptp(np.array(_STAR), axis=0))
    .contains_points(np.c_[_U.ravel(), _V.ravel()])
    .reshape(_U.shape),
    "cross": (np.abs(_U - 0.5) <= 1 / 6) | (np.abs(_V - 0.5) <= 1 / 6),
    "diamond": np.abs(_U - 0.5) + np.abs(_V - 0.5) <= 0.5,
}


def read_shape(obj: np.ndarray) -> str:
    """The template nearest to one object's bool mask (cropped to its box)."""
    h, w = obj.shape
    sampled = obj[np.minimum((_V * h).astype(int), h - 1), np.minimum((_U * w).astype(int), w - 1)]
    iou = {k: (sampled & t).sum() / (sampled | t).sum() for k, t in SHAPE_TEMPLATES.items()}
    return max(iou, key=iou.get)


def separate_objects(mask: np.ndarray) -> tuple[np.ndarray, list]:
    """8-connected components of the object pixels, and their boxes."""
    labelled, _ = ndimage.label(mask > 0, structure=np.ones((3, 3)))
    return labelled, ndimage.find_objects(labelled)


def check_colour(image: np.ndarray, mask: np.ndarray, colour: str) -> None:
    """Object pixels (mask > 0) are exactly the colour; no background pixel is near it."""
    rgb = np.array(world.COLOURS[colour])
    assert (image[mask > 0] == rgb).all()
    assert (np.abs(image[mask == 0].astype(int) - rgb).max(axis=1) > 60).all()


def check_shape(mask: np.ndarray, shape: str, read: bool) -> None:
    """The mask holds the shape's class and (``read``) every object reads as that shape."""
    assert set(np.unique(mask)) == {0, world.SHAPES.index(shape) + 1}
    labelled, boxes = separate_objects(mask)
    if read:
        assert [read_shape(labelled[box] == k) for k, box in enumerate(boxes, 1)] == [shape] * len(
            boxes
        )


def check_size(mask: np.ndarray, size: str, image_size: int, version: int) -> None:
    """Every object spans its size's width (the polygon of its box may end a pixel short)."""
    side = world.object_diameter(size, image_size, version)
    for box in separate_objects(mask)[1]:
        assert side - 1 <= max(box[0].stop - box[0].start, box[1].stop - box[1].start) <= side


def check_count(mask: np.ndarray, count: int) -> None:
    assert len(separate_objects(mask)[1]) == count


def check_position(mask: np.ndarray, position: str, image_size: int, version: int) -> None:
    """The objects lie in the position's region, and their centre on the position's half of
    the image (centre: nearer the middle than a quarter of the image, on both axes)."""
    x0, y0, x1, y1 = world.region_box(position, image_size, version)
    ys, xs = np.nonzero(mask)
    assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
    labelled, boxes = separate_objects(mask)
    centres = ndimage.center_of_mass(mask > 0, labelled, range(1, len(boxes) + 1))
    y, x = (np.mean(c) / image_size for c in zip(*centres, strict=True))
    side = {"left": x < 0.5, "right": x > 0.5, "top": y < 0.5, "bottom": y > 0.5}
    assert side.get(position, abs(x - 0.5) < 0.25 and abs(y - 0.5) < 0.25), (x, y)


def check_drawing(
    image: np.ndarray, mask: np.ndarray, attributes: dict, image_size: int, version: int
) -> None:
    """The mask marks exactly the object pixels; the objects match every attribute."""
    check_colour(image, mask, attributes["colour"])
    check_shape(mask, attributes["shape"], read=image_size >= 64)
    check_size(mask, attributes["size"], image_size, version)
    check_count(mask, attributes["count"])
    check_position(mask, attributes["position"], image_size, version)


@pytest.fixture(scope="module", params=sorted(world.GEOMETRIES))
def drawn(request) -> tuple[int, list[world.Example]]:
    """150 test images at 64 px of each world version."""
    spec = validate_spec("shapes", {**SPEC, "version": request.param})
    holdout = world.holdout_combinations(spec["seed"], spec["holdout_combinations"])
    return request.param, [world.generate_example(spec, "test", i, holdout) for i in range(150)]


def test_colour_is_painted_exactly_on_the_mask(drawn):
    for example in drawn[1]:
        check_colour(example.image, example.mask, example.scene.colour)


def test_shape_is_the_mask_class_and_every_object_reads_as_it(drawn):
    for example in drawn[1]:
        check_shape(example.mask, example.scene.shape, read=True)
    assert {example.scene.shape for example in drawn[1]} == set(world.SHAPES)


def test_size_sets_the_width_of_every_object(drawn):
    version, examples = drawn
    widths = [world.object_diameter(size, 64, version) for size in world.SIZES]
    assert widths == sorted(widths) and min(np.diff(widths)) >= 3  # three distinct sizes
    for example in examples:
        check_size(example.mask, example.scene.size, 64, version)


def test_count_is_the_number_of_separate_objects(drawn):
    for example in drawn[1]:
        check_count(example.mask, example.scene.count)
    assert {example.scene.count for example in drawn[1]} == {1, 2, 3, 4}


def test_position_puts_the_objects_in_their_region_on_its_side(drawn):
    version, examples = drawn
    for example in examples:
        check_position(example.mask, example.scene.position, 64, version)


def test_version_2_draws_objects_over_several_patches_and_version_1_is_unchanged():
    """Version 2's objects are 14-22 px at 64 px (two to three 8 px patches across); version 1
    keeps the old geometry: half-image regions and 8-14 px objects."""
    assert [world.object_diameter(s, 64, 2) for s in world.SIZES] == [14, 18, 22]
    assert [world.object_diameter(s, 64, 1) for s in world.SIZES] == [8, 11, 14]
    assert world.region_box("left", 64, 1) == (0, 16, 32, 48)
    assert world.region_box("centre", 64, 2) == (8, 8, 56, 56)
    assert validate_spec("shapes", SPEC)["version"] == 2


def test_masks_agree_with_images_and_attributes(shapes):
    data = load_split(shapes, "test")
    for i, row in enumerate(data.images.iter_rows(named=True)):
        check_drawing(np.asarray(data.open_image(i)), data.open_mask(i), row, 64, 2)


@pytest.mark.parametrize("version", sorted(world.GEOMETRIES))
@pytest.mark.parametrize("image_size", [32, 97, 224])
def test_drawings_hold_at_other_image_sizes(image_size, version):
    spec = validate_spec("shapes", {**SPEC, "image_size": image_size, "version": version})
    holdout = world.holdout_combinations(spec["seed"], spec["holdout_combinations"])
    for index in range(60 if image_size < 200 else 15):
        example = world.generate_example(spec, "test", index, holdout)
        scene = example.scene
        attributes = {key: getattr(scene, key) for key in ("shape", "colour", "size", "position")}
        attributes["count"] = scene.count
        check_drawing(example.image, example.mask, attributes, image_size, version)


def test_label_columns_index_the_class_names(shapes):
    images = load_split(shapes, "test").images
    tasks = {task.name: task for task in load_tasks(shapes)}
    for attribute in ("shape", "colour", "size", "position"):
        task = tasks[attribute]
        words = {"shape": world.SHAPES, "colour": tuple(world.COLOURS)}.get(attribute)
        values = words or {"size": world.SIZES, "position": world.POSITIONS}[attribute]
        expected = [values.index(v) for v in images[attribute]]
        assert images[task.label_column].to_list() == expected
        assert len(task.classnames) == len(values)
    assert (images["count_label"] == images["count"] - 1).all()
    assert tasks["count"].classnames == ("one shape", "two shapes", "three shapes", "four shapes")
    assert tasks["position"].classnames[world.POSITIONS.index("left")] == "on the left"


def test_novel_combinations_occur_in_test_but_never_in_train(shapes):
    holdout = world.holdout_combinations(SPEC["seed"], 4)
    assert len(holdout) == 4
    assert len({s for s, _ in holdout}) == 4 and len({c for _, c in holdout}) == 4

    def combinations(split: str) -> set[tuple[str, str]]:
        images = load_split(shapes, split).images
        return set(zip(images["shape"], images["colour"], strict=True))

    train = combinations("train")
    assert not train & set(holdout)
    assert train == set(world.COMBINATIONS) - set(holdout)  # 300 images cover the other 32
    assert set(holdout) <= combinations("test")

    task = next(t for t in load_tasks(shapes) if t.name == "novel_combination")
    assert task.split == "test"
    assert task.classnames == tuple(f"{c} {s}" for s, c in holdout)
    test = load_split(shapes, "test").images
    for row in test.iter_rows(named=True):
        combo = (row["shape"], row["colour"])
        expected = holdout.index(combo) if combo in holdout else -1
        assert row["novel_combination_label"] == expected
    assert (load_split(shapes, "train").images["novel_combination_label"] == -1).all()


def test_no_holdout_means_no_novel_task(tmp_path):
    prepare_dataset("plain", {**SPEC, "splits": {"test": 10}, "holdout_combinations": 0}, tmp_path)
    assert "novel_combination" not in [task.name for task in load_tasks(tmp_path)]
    assert "novel_combination_label" not in load_split(tmp_path, "test").images.columns


# --- the on-disk contract --------------------------------------------------------------------


def test_tables_follow_the_contract(shapes):
    for split, n in SPEC["splits"].items():
        data = load_split(shapes, split)
        images, captions = data.images, data.captions
        assert images.columns[:2] == ["image_id", "path"]
        assert images["image_id"].n_unique() == len(images) == n
        assert images["path"].n_unique() == n
        assert images["image_id"][3] == f"shapes-{split}-000003"
        assert captions.columns == ["caption_id", "image_id", "text"]
        assert captions["caption_id"].n_unique() == len(captions) == 5 * n
        assert set(captions["image_id"]) == set(images["image_id"])
        assert not any(Path(p).is_absolute() for p in images["path"])
        assert data.image_path(0) == shapes / images["path"][0]
        assert data.open_image(0).mode == "RGB" and data.open_image(0).size == (64, 64)


def test_tasks_and_prompts(shapes):
    tasks = load_tasks(shapes)
    names = ["shape", "colour", "size", "position", "count", "novel_combination", "retrieval"]
    assert [task.name for task in tasks] == [*names, "segmentation"]
    assert all(task.split == "test" for task in tasks)
    assert json.loads((shapes / "tasks.json").read_text())[-2] == {
        "name": "retrieval",
        "kind": "retrieval",
        "split": "test",
    }
    segmentation = tasks[-1]
    assert segmentation.kind == "segmentation" and segmentation.label_column == "mask_path"
    assert segmentation.classnames == ("background", *world.SHAPES)  # mask value = class index
    data = load_split(shapes, "test")
    for i in range(5):
        values = set(np.unique(data.open_mask(i)).tolist())
        assert values == {0, world.SHAPES.index(data.images["shape"][i]) + 1}
    prompts = load_prompts(shapes)
    classification = [task for task in tasks if task.kind in ("classification", "segmentation")]
    assert len(prompts) == sum(len(t.classnames) * len(t.templates) for t in classification)
    assert prompts["prompt_id"].n_unique() == len(prompts)
    assert all(len(task.templates) >= 4 for task in classification)
    for row in prompts.iter_rows(named=True):
        task = next(t for t in classification if t.name == row["task"])
        assert row["class_name"] == task.classnames[row["class_index"]]
        assert row["text"] == task.templates[row["template_index"]].replace("{}", row["class_name"])
    assert "a picture of a star." in prompts["text"].to_list()


def test_manifest_is_complete_and_written_last(shapes):
    manifest = read_manifest(shapes)
    assert manifest["spec"] == validate_spec("shapes", SPEC)
    assert manifest["spec"]["captions_per_image"] == 5  # defaults are recorded
    assert manifest["splits"] == {
        "train": {"images": 300, "captions": 1500},
        "val": {"images": 30, "captions": 150},
        "test": {"images": 120, "captions": 600},
    }
    assert manifest["content_hash"] == content_hash(shapes, ["test", "train", "val"])
    assert {"python", "numpy", "polars", "pillow"} <= set(manifest["versions"])
    written_last = (shapes / "manifest.json").stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns <= written_last for p in shapes.rglob("*") if p.is_file())


def test_prepare_is_idempotent_and_reruns_when_incomplete_or_changed(tmp_path):
    spec = {**SPEC, "splits": {"train": 4, "test": 6}}
    prepare_dataset("tiny", spec, tmp_path)
    image = tmp_path / "test/images/tiny-test-000000.png"
    stamp = image.stat().st_mtime_ns
    prepare_dataset("tiny", dict(spec), tmp_path)  # same spec: returns early
    assert image.stat().st_mtime_ns == stamp

    (tmp_path / "manifest.json").unlink()  # as if interrupted before completion
    with pytest.raises(FileNotFoundError, match=r"not prepared.*manifest\.json"):
        load_split(tmp_path, "test")
    prepare_dataset("tiny", spec, tmp_path)
    assert image.stat().st_mtime_ns != stamp

    prepare_dataset("tiny", {**spec, "captions_per_image": 2}, tmp_path)
    assert read_manifest(tmp_path)["splits"]["test"] == {"images": 6, "captions": 12}


def test_preparing_fewer_images_removes_the_old_ones(tmp_path):
    prepare_dataset("tiny", {**SPEC, "splits": {"train": 3, "test": 5}}, tmp_path)
    prepare_dataset("tiny", {**SPEC, "splits": {"test": 2}}, tmp_path)
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert files == [
        "manifest.json",
        "prompts.parquet",
        "tasks.json",
        "test",
        "test/captions.parquet",
        "test/images",
        "test/images.parquet",
        "test/images/tiny-test-000000.png",
        "test/images/tiny-test-000001.png",
        "test/masks",
        "test/masks/tiny-test-000000.png",
        "test/masks/tiny-test-000001.png",
    ]
    assert len(load_split(tmp_path, "test").images) == 2


def test_a_changed_generated_image_is_generated_again(tmp_path):
    prepare_dataset("tiny", {**SPEC, "splits": {"test": 3}}, tmp_path)
    image = tmp_path / "test/images/tiny-test-000001.png"
    original = image.read_bytes()
    image.write_bytes(original + b"\0")
    prepare_dataset("tiny", {**SPEC, "splits": {"test": 3}}, tmp_path)
    assert image.read_bytes() == original


def test_content_hash_sees_a_changed_image(tmp_path):
    prepare_dataset("tiny", {**SPEC, "splits": {"test": 3}}, tmp_path)
    before = read_manifest(tmp_path)["content_hash"]
    image = tmp_path / "test/images/tiny-test-000001.png"
    image.write_bytes(image.read_bytes() + b"\0")
    assert content_hash(tmp_path, ["test"]) != before


def test_readers_name_what_is_wrong(shapes, tmp_path):
    with pytest.raises(KeyError, match="no split 'holdout'"):
        load_split(shapes, "holdout")
    with pytest.raises(FileNotFoundError, match="not prepared"):
        load_tasks(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest\.json is not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="missing keys"):
        read_manifest(tmp_path)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": "7"}, "seed"),
        ({"splits": {"train": 10}}, "splits"),
        ({"splits": {"test": 10, "holdout": 5}}, "splits"),
        ({"splits": {"test": 0}}, "splits"),
        ({"image_size": 16}, "image_size"),
        ({"captions_per_image": 10}, "captions_per_image"),
        ({"max_count": 1}, "max_count"),
        ({"holdout_combinations": 1}, "holdout_combinations"),
        ({"holdout_combinations": 7}, "holdout_combinations"),
        ({"colours": 3}, "colours"),
        ({"version": 3}, "version"),
        ({"version": True}, "version"),
    ],
)
def test_validate_spec_names_the_bad_key(change, key):
    with pytest.raises(ValueError, match=rf"dataset 'shapes': key '{key}'"):
        validate_spec("shapes", {**SPEC, **change})


def test_validate_spec_checks_source_and_name():
    with pytest.raises(ValueError, match="key 'source'"):
        validate_spec("shapes", {**SPEC, "source": "synthetc"})
    with pytest.raises(ValueError, match="dataset name"):
        validate_spec("bad/name", SPEC)
