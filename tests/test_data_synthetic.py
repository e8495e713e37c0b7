"""The synthetic world: determinism, faithful captions and masks, held-out combinations,
and the on-disk contract (tables, tasks, prompts, manifest)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
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


def check_drawing(image: np.ndarray, mask: np.ndarray, attributes: dict, size: int) -> None:
    """The mask marks exactly the object pixels; the objects match the attributes."""
    assert set(np.unique(mask)) == {0, world.SHAPES.index(attributes["shape"]) + 1}
    rgb = np.array(world.COLOURS[attributes["colour"]])
    objects = mask > 0
    assert (image[objects] == rgb).all()
    assert (np.abs(image[~objects].astype(int) - rgb).max(axis=1) > 60).all()
    labelled, n_objects = ndimage.label(objects, structure=np.ones((3, 3)))  # 8-connected
    assert n_objects == attributes["count"]
    x0, y0, x1, y1 = world.region_box(attributes["position"], size)
    ys, xs = np.nonzero(objects)
    assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
    side = world.object_diameter(attributes["size"], size)
    for box in ndimage.find_objects(labelled):
        extent = max(box[0].stop - box[0].start, box[1].stop - box[1].start)
        assert side - 1 <= extent <= side


def test_masks_agree_with_images_and_attributes(shapes):
    data = load_split(shapes, "test")
    for i, row in enumerate(data.images.iter_rows(named=True)):
        check_drawing(np.asarray(data.open_image(i)), data.open_mask(i), row, 64)


@pytest.mark.parametrize("image_size", [32, 97, 224])
def test_drawings_hold_at_other_image_sizes(image_size):
    spec = validate_spec("shapes", {**SPEC, "image_size": image_size})
    holdout = world.holdout_combinations(spec["seed"], spec["holdout_combinations"])
    for index in range(60 if image_size < 200 else 15):
        example = world.generate_example(spec, "test", index, holdout)
        scene = example.scene
        attributes = {key: getattr(scene, key) for key in ("shape", "colour", "size", "position")}
        check_drawing(example.image, example.mask, {**attributes, "count": scene.count}, image_size)


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
