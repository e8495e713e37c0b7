"""Adapters for real data (Karpathy COCO / Flickr30k, image folders) on tiny fabricated
fixtures in the real on-disk formats."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data import (
    load_prompts,
    load_split,
    load_tasks,
    prepare_dataset,
    read_manifest,
    source_files,
    validate_spec,
)
from pipeline.data.manifest import content_hash
from pipeline.data.tasks import CLIP_TEMPLATES


def save_image(path: Path, mode: str = "RGB", value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    size = (8, 6)
    pixels = np.full((size[1], size[0], 3 if mode == "RGB" else 1), value, dtype=np.uint8)
    Image.fromarray(pixels.squeeze()).convert(mode).save(path)


def sentences(*ids: int) -> list[dict]:
    return [{"raw": f" A caption number {i}. ", "sentid": i, "tokens": ["a"]} for i in ids]


def coco_entry(cocoid: int, folder: str, split: str, *sentids: int) -> dict:
    return {
        "filepath": folder,
        "filename": f"COCO_{folder}_{cocoid:012d}.jpg",
        "cocoid": cocoid,
        "imgid": cocoid,
        "split": split,
        "sentences": sentences(*sentids),
    }


@pytest.fixture
def coco(tmp_path) -> dict:
    entries = [
        coco_entry(9, "train2014", "train", 1, 2),
        coco_entry(25, "train2014", "restval", 3),
        coco_entry(42, "val2014", "val", 4, 5),
        coco_entry(73, "val2014", "test", 6, 7, 9),
        coco_entry(74, "val2014", "test", 8),
    ]
    root = tmp_path / "coco"
    for entry in entries:
        save_image(root / entry["filepath"] / entry["filename"], value=entry["cocoid"])
    karpathy_json = tmp_path / "dataset_coco.json"
    karpathy_json.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return {"source": "coco_karpathy", "karpathy_json": str(karpathy_json), "image_root": str(root)}


@pytest.fixture
def flickr(tmp_path) -> dict:
    names = {"1000092795.jpg": "train", "10002456.jpg": "val", "1001773457.jpg": "test"}
    entries = [
        {"filename": name, "imgid": i, "split": split, "sentences": sentences(10 * i, 10 * i + 1)}
        for i, (name, split) in enumerate(names.items())
    ]
    root = tmp_path / "flickr30k-images"
    for name in names:
        save_image(root / name)
    karpathy_json = tmp_path / "dataset_flickr30k.json"
    karpathy_json.write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))
    return {
        "source": "flickr30k_karpathy",
        "karpathy_json": str(karpathy_json),
        "image_root": str(root),
    }


@pytest.fixture
def folder(tmp_path) -> dict:
    root = tmp_path / "pets"
    for split in ("train", "test"):
        save_image(root / split / "golden_retriever" / "b.jpg")
        save_image(root / split / "golden_retriever" / "a.png", mode="L", value=90)
        save_image(root / split / "tabby_cat" / "c.JPEG")
    (root / "test" / "tabby_cat" / "notes.txt").write_text("not an image")
    (root / "test" / "tabby_cat" / ".hidden.jpg").write_bytes(b"")
    (root / "test" / "tabby_cat" / "d-link.jpg").symlink_to(root / "test" / "tabby_cat" / "c.JPEG")
    return {"source": "image_folder", "root": str(root)}


# --- COCO -----------------------------------------------------------------------------------


def test_coco_karpathy_splits_ids_and_captions(coco, tmp_path):
    out = tmp_path / "out"
    prepare_dataset("coco", coco, out)
    ids = {s: load_split(out, s).images["image_id"].to_list() for s in ("train", "val", "test")}
    assert ids == {
        "train": ["coco-9", "coco-25"],
        "val": ["coco-42"],
        "test": ["coco-73", "coco-74"],
    }

    test = load_split(out, "test")
    assert test.captions.to_dicts() == [
        {"caption_id": "coco-73-6", "image_id": "coco-73", "text": "A caption number 6."},
        {"caption_id": "coco-73-7", "image_id": "coco-73", "text": "A caption number 7."},
        {"caption_id": "coco-73-9", "image_id": "coco-73", "text": "A caption number 9."},
        {"caption_id": "coco-74-8", "image_id": "coco-74", "text": "A caption number 8."},
    ]
    assert test.images["karpathy_split"].to_list() == ["test", "test"]
    assert load_split(out, "train").images["karpathy_split"].to_list() == ["train", "restval"]
    path = test.image_path(0)
    assert path.is_absolute() and path == Path(coco["image_root"]).absolute() / (
        "val2014/COCO_val2014_000000000073.jpg"
    )
    assert test.open_image(0).mode == "RGB"

    assert [t.to_dict() for t in load_tasks(out)] == [
        {"name": "retrieval", "kind": "retrieval", "split": "test"}
    ]
    prompts = load_prompts(out)
    assert prompts.is_empty() and prompts.columns[:3] == ["prompt_id", "task", "class_index"]
    manifest = read_manifest(out)
    assert manifest["spec"]["restval_in_train"] is True
    assert manifest["splits"]["test"] == {"images": 2, "captions": 4}


def test_coco_restval_can_be_left_out_and_splits_chosen(coco, tmp_path):
    prepare_dataset("coco", {**coco, "restval_in_train": False}, tmp_path / "a")
    assert load_split(tmp_path / "a", "train").images["image_id"].to_list() == ["coco-9"]

    prepare_dataset("coco", {**coco, "splits": ["val"]}, tmp_path / "b")
    assert list(read_manifest(tmp_path / "b")["splits"]) == ["val"]
    assert load_tasks(tmp_path / "b") == []  # no test split, no retrieval task
    with pytest.raises(KeyError, match="no split 'test'"):
        load_split(tmp_path / "b", "test")


def test_content_hash_of_user_files_follows_their_mtime(coco, tmp_path):
    prepare_dataset("coco", {**coco, "splits": ["test"]}, tmp_path)
    before = read_manifest(tmp_path)["content_hash"]
    assert content_hash(tmp_path, ["test"]) == before
    image = load_split(tmp_path, "test").image_path(1)
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert content_hash(tmp_path, ["test"]) != before


def write_entries(spec: dict, entries: list[dict]) -> None:
    Path(spec["karpathy_json"]).write_text(json.dumps({"images": entries}))


def test_coco_errors_name_the_problem(coco, tmp_path):
    entries = json.loads(Path(coco["karpathy_json"]).read_text())["images"]
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="key 'karpathy_json' names no existing file"):
        validate_spec("coco", {**coco, "karpathy_json": str(tmp_path / "missing.json")})
    with pytest.raises(ValueError, match="key 'image_root' names no existing folder"):
        validate_spec("coco", {**coco, "image_root": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="key 'splits' names unknown split 'validation'"):
        validate_spec("coco", {**coco, "splits": ["train", "validation"]})
    with pytest.raises(ValueError, match="key 'restval_in_train' must be true or false"):
        validate_spec("coco", {**coco, "restval_in_train": "yes"})

    Path(coco["image_root"], "val2014", entries[4]["filename"]).unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 5 image files are missing.*000000000074"):
        prepare_dataset("coco", coco, out)

    write_entries(coco, [*entries[:4], {**entries[3], "split": "val"}])
    with pytest.raises(ValueError, match=r"entries 3 \(.*split 'test'\) and 4 \(.*split 'val'\)"):
        prepare_dataset("coco", coco, out)
    write_entries(coco, [{**entries[0], "split": "dev"}])
    with pytest.raises(ValueError, match="image entry 0 has unknown split 'dev'"):
        prepare_dataset("coco", coco, out)
    write_entries(coco, [{k: v for k, v in entries[0].items() if k != "cocoid"}])
    with pytest.raises(ValueError, match=r"image entry 0 is malformed.*cocoid"):
        prepare_dataset("coco", coco, out)
    write_entries(coco, entries[:3])
    with pytest.raises(ValueError, match="has no images in split 'test'"):
        prepare_dataset("coco", coco, out)
    Path(coco["karpathy_json"]).write_text('{"annotations": []}')
    with pytest.raises(ValueError, match=r"dataset_coco\.json is not a Karpathy split file"):
        prepare_dataset("coco", coco, out)
    assert not (out / "manifest.json").exists()


def test_karpathy_repeats_are_errors_naming_both_entries(coco, tmp_path):
    entries = json.loads(Path(coco["karpathy_json"]).read_text())["images"]
    out = tmp_path / "out"
    other_file = {**entries[3], "filepath": "train2014", "filename": "COCO_other.jpg"}
    save_image(Path(coco["image_root"]) / "train2014" / "COCO_other.jpg")
    write_entries(coco, [*entries, other_file])  # one cocoid, two files
    with pytest.raises(
        ValueError,
        match=r"dataset 'coco': .*dataset_coco\.json: image entries 3 "
        r"\(val2014/COCO_val2014_000000000073\.jpg, split 'test'\) and 5 "
        r"\(train2014/COCO_other\.jpg, split 'test'\) both have id 'coco-73', with different files",
    ):
        prepare_dataset("coco", coco, out)

    write_entries(coco, [*entries, entries[3]])  # the very same entry twice
    with pytest.raises(
        ValueError, match=r"image entries 3 .* and 5 .* 'coco-73', with the same file"
    ):
        prepare_dataset("coco", coco, out)

    write_entries(coco, [*entries, {**entries[3], "cocoid": 99, "sentences": sentences(99)}])
    with pytest.raises(
        ValueError,
        match=r"image entries 3 \(id 'coco-73'\) and 5 \(id 'coco-99'\) both name the file "
        r"val2014/COCO_val2014_000000000073\.jpg",
    ):
        prepare_dataset("coco", coco, out)

    repeated = {**entries[3], "sentences": sentences(6, 7, 6)}
    write_entries(coco, [*entries[:3], repeated, entries[4]])
    with pytest.raises(
        ValueError,
        match=r"image entry 3 \('coco-73'\): sentences 0 and 2 both have sentid 6",
    ):
        prepare_dataset("coco", coco, out)
    assert not (out / "manifest.json").exists()

    shared = {**entries[4], "sentences": sentences(6)}  # another image's sentid: its own caption
    write_entries(coco, [*entries[:4], shared])
    prepare_dataset("coco", coco, out)
    assert load_split(out, "test").captions["caption_id"].to_list() == [
        "coco-73-6",
        "coco-73-7",
        "coco-73-9",
        "coco-74-6",
    ]


def test_flickr_one_id_for_two_files_is_an_error(flickr, tmp_path):
    entries = json.loads(Path(flickr["karpathy_json"]).read_text())["images"]
    save_image(Path(flickr["image_root"]) / "10002456.png")
    write_entries(flickr, [*entries, {**entries[1], "filename": "10002456.png", "split": "test"}])
    with pytest.raises(
        ValueError,
        match=r"image entries 1 \(10002456\.jpg, split 'val'\) and 3 \(10002456\.png, split "
        r"'test'\) both have id 'flickr30k-10002456'",
    ):
        prepare_dataset("flickr30k", flickr, tmp_path)


# --- Flickr30k ------------------------------------------------------------------------------


def test_flickr30k_karpathy(flickr, tmp_path):
    prepare_dataset("flickr30k", flickr, tmp_path)
    test = load_split(tmp_path, "test")
    assert test.images["image_id"].to_list() == ["flickr30k-1001773457"]
    assert test.captions["caption_id"].to_list() == [
        "flickr30k-1001773457-20",
        "flickr30k-1001773457-21",
    ]
    assert test.image_path(0) == Path(flickr["image_root"]).absolute() / "1001773457.jpg"
    assert load_split(tmp_path, "train").images["image_id"].to_list() == ["flickr30k-1000092795"]
    assert [t.name for t in load_tasks(tmp_path)] == ["retrieval"]
    with pytest.raises(ValueError, match="key 'restval_in_train' is unknown"):
        validate_spec("flickr30k", {**flickr, "restval_in_train": True})


# --- image folders --------------------------------------------------------------------------


def test_image_folder_defaults(folder, tmp_path):
    prepare_dataset("pets", folder, tmp_path)
    assert list(read_manifest(tmp_path)["splits"]) == ["test"]
    test = load_split(tmp_path, "test")
    assert test.images.columns == ["image_id", "path", "label", "class_name"]
    assert test.images["image_id"].to_list() == [
        "pets/test/golden_retriever/a.png",
        "pets/test/golden_retriever/b.jpg",
        "pets/test/tabby_cat/c.JPEG",  # d-link.jpg links to it: one image; others skipped
    ]
    assert test.images["label"].to_list() == [0, 0, 1]
    assert test.images["class_name"].to_list() == ["golden retriever"] * 2 + ["tabby cat"]
    assert test.captions.is_empty()
    image = test.open_image(0)  # a greyscale PNG, opened as RGB
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (90, 90, 90)

    (task,) = load_tasks(tmp_path)
    assert (task.name, task.kind, task.split, task.label_column) == (
        "pets",
        "classification",
        "test",
        "label",
    )
    assert task.classnames == ("golden retriever", "tabby cat")
    assert task.templates == CLIP_TEMPLATES
    prompts = load_prompts(tmp_path)
    assert len(prompts) == 2 * len(CLIP_TEMPLATES)
    assert prompts.row(len(CLIP_TEMPLATES) + 1, named=True) == {
        "prompt_id": "pets-c0001-t001",
        "task": "pets",
        "class_index": 1,
        "class_name": "tabby cat",
        "template_index": 1,
        "text": "a bad photo of the tabby cat.",
    }


def test_image_folder_with_classnames_templates_and_splits(folder, tmp_path):
    classnames = tmp_path / "classnames.txt"
    classnames.write_text("Golden Retriever\nTabby Cat\n\n")
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na blurry photo of a {}.\n")
    spec = {**folder, "classnames": str(classnames), "templates": str(templates)}
    prepare_dataset("pets", {**spec, "splits": ["train", "test"]}, tmp_path / "out")
    (task,) = load_tasks(tmp_path / "out")
    assert task.classnames == ("Golden Retriever", "Tabby Cat")
    assert task.split == "test"
    assert load_prompts(tmp_path / "out")["text"].to_list() == [
        "a photo of a Golden Retriever.",
        "a blurry photo of a Golden Retriever.",
        "a photo of a Tabby Cat.",
        "a blurry photo of a Tabby Cat.",
    ]
    train = load_split(tmp_path / "out", "train").images
    assert train["image_id"].to_list()[0] == "pets/train/golden_retriever/a.png"
    prepare_dataset("pets", {**spec, "splits": ["train"]}, tmp_path / "train_only")
    assert load_tasks(tmp_path / "train_only")[0].split == "train"


def test_image_folder_errors_name_the_problem(folder, tmp_path):
    root = Path(folder["root"])
    with pytest.raises(ValueError, match=r"key 'splits' names unknown split 'val' \(known"):
        validate_spec("pets", {**folder, "splits": ["val"]})
    with pytest.raises(ValueError, match="key 'root' names no existing folder"):
        validate_spec("pets", {**folder, "root": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="key 'classnames' names no existing file"):
        validate_spec("pets", {**folder, "classnames": str(tmp_path / "names.txt")})

    names = tmp_path / "names.txt"
    names.write_text("one name only\n")
    with pytest.raises(ValueError, match=r"names\.txt has 1 names for 2 class folders"):
        prepare_dataset("pets", {**folder, "classnames": str(names)}, tmp_path / "out")
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na photo without a slot.\n")
    with pytest.raises(ValueError, match=r"templates.txt, line 2: .*exactly one"):
        prepare_dataset("pets", {**folder, "templates": str(templates)}, tmp_path / "out")

    (root / "test" / "golden_retriever" / "d.jpg").symlink_to(root / "test/tabby_cat/c.JPEG")
    with pytest.raises(
        ValueError,
        match=r"golden_retriever/d\.jpg and .*tabby_cat/c\.JPEG are one image in two classes of "
        r"split 'test', 'golden_retriever' and 'tabby_cat'",
    ):
        prepare_dataset("pets", folder, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()
    (root / "test" / "golden_retriever" / "d.jpg").unlink()

    (root / "test" / "tabby_cat" / "e.jpg").symlink_to(root / "train/tabby_cat/c.JPEG")
    with pytest.raises(
        ValueError,
        match=r"train/tabby_cat/c\.JPEG and .*test/tabby_cat/e\.jpg are one image "
        r"in two splits, 'train' and 'test'",
    ):
        prepare_dataset("pets", {**folder, "splits": ["train", "test"]}, tmp_path / "out")
    prepare_dataset("pets", folder, tmp_path / "out")  # one split: a link beside its target
    (root / "test" / "tabby_cat" / "e.jpg").unlink()

    (root / "train" / "zebra").mkdir()
    (root / "train" / "zebra" / "notes.txt").write_text("no images yet")
    with pytest.raises(
        ValueError, match=r"dataset 'pets': class folder 'zebra' under .* has no image"
    ):
        prepare_dataset("pets", {**folder, "splits": ["train", "test"]}, tmp_path / "out")


# --- source files and re-preparation --------------------------------------------------------


def test_source_files_of_each_source(coco, flickr, folder, tmp_path):
    assert source_files("coco", coco) == [Path(coco["karpathy_json"])]
    assert source_files("flickr30k", flickr) == [Path(flickr["karpathy_json"])]
    assert source_files("shapes", {"source": "synthetic", "seed": 0, "splits": {"test": 2}}) == []

    root = Path(folder["root"])
    assert source_files("pets", folder) == [
        root / "test/golden_retriever/a.png",
        root / "test/golden_retriever/b.jpg",
        root / "test/tabby_cat/c.JPEG",
        root / "test/tabby_cat/d-link.jpg",  # links as listed; hidden and non-image skipped
    ]
    names, templates = tmp_path / "names.txt", tmp_path / "templates.txt"
    names.write_text("dog\ncat\n")
    templates.write_text("a photo of a {}.\n")
    spec = {**folder, "classnames": str(names), "templates": str(templates), "splits": ["train"]}
    assert source_files("pets", spec) == [
        names,
        templates,
        root / "train/golden_retriever/a.png",
        root / "train/golden_retriever/b.jpg",
        root / "train/tabby_cat/c.JPEG",
    ]
    with pytest.raises(ValueError, match="key 'root' names no existing folder"):
        source_files("pets", {**folder, "root": str(tmp_path / "nowhere")})


def bump_mtime(path: Path) -> None:
    """Make a rewrite visible even on file systems with coarse timestamps."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_editing_a_karpathy_json_prepares_again(coco, tmp_path):
    out = tmp_path / "out"
    prepare_dataset("coco", coco, out)
    before, stamp = read_manifest(out), (out / "manifest.json").stat().st_mtime_ns
    prepare_dataset("coco", coco, out)  # nothing changed: returns early
    assert (out / "manifest.json").stat().st_mtime_ns == stamp

    entries = json.loads(Path(coco["karpathy_json"]).read_text())["images"]
    entries[3]["sentences"][0]["raw"] = "An edited caption."
    write_entries(coco, entries)
    bump_mtime(Path(coco["karpathy_json"]))
    prepare_dataset("coco", coco, out)
    assert load_split(out, "test").captions["text"].to_list()[0] == "An edited caption."
    assert read_manifest(out)["content_hash"] != before["content_hash"]

    write_entries(coco, [e for e in entries if e["cocoid"] != 74])  # an image entry dropped
    bump_mtime(Path(coco["karpathy_json"]))
    prepare_dataset("coco", coco, out)
    assert load_split(out, "test").images["image_id"].to_list() == ["coco-73"]
    assert read_manifest(out)["splits"]["test"] == {"images": 1, "captions": 3}


def test_changing_an_image_folder_prepares_again(folder, tmp_path):
    root, out = Path(folder["root"]), tmp_path / "out"
    prepare_dataset("pets", folder, out)
    assert len(load_split(out, "test").images) == 3

    save_image(root / "test" / "tabby_cat" / "e.png")
    assert root / "test/tabby_cat/e.png" in source_files("pets", folder)
    prepare_dataset("pets", folder, out)
    assert load_split(out, "test").images["image_id"].to_list()[-1] == "pets/test/tabby_cat/e.png"

    (root / "test" / "golden_retriever" / "b.jpg").unlink()
    assert root / "test/golden_retriever/b.jpg" not in source_files("pets", folder)
    prepare_dataset("pets", folder, out)
    assert "pets/test/golden_retriever/b.jpg" not in load_split(out, "test").images["image_id"]

    classnames = tmp_path / "names.txt"
    classnames.write_text("dog\ncat\n")
    spec = {**folder, "classnames": str(classnames)}
    prepare_dataset("pets", spec, out)
    classnames.write_text("Dog\nCat\n")
    bump_mtime(classnames)
    prepare_dataset("pets", spec, out)
    assert load_tasks(out)[0].classnames == ("Dog", "Cat")

    image = root / "test" / "golden_retriever" / "a.png"  # rewritten in place
    save_image(image, mode="L", value=200)
    bump_mtime(image)
    prepare_dataset("pets", spec, out)
    assert load_split(out, "test").open_image(0).getpixel((0, 0)) == (200, 200, 200)
    assert read_manifest(out)["content_hash"] == content_hash(out, ["test"])


def test_a_changed_user_image_or_table_prepares_again(coco, tmp_path):
    out = tmp_path / "out"
    prepare_dataset("coco", {**coco, "splits": ["test"]}, out)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    bump_mtime(load_split(out, "test").image_path(0))  # not a source file, but in the tables
    prepare_dataset("coco", {**coco, "splits": ["test"]}, out)
    assert (out / "manifest.json").stat().st_mtime_ns != stamp
    assert read_manifest(out)["content_hash"] == content_hash(out, ["test"])

    (out / "test" / "captions.parquet").write_bytes(b"garbage")
    prepare_dataset("coco", {**coco, "splits": ["test"]}, out)
    assert len(load_split(out, "test").captions) == 4


def test_tables_of_splits_no_longer_prepared_are_removed(coco, tmp_path):
    out = tmp_path / "out"
    prepare_dataset("coco", coco, out)
    assert (out / "train" / "images.parquet").is_file()
    (out / "notes").mkdir()  # not a split folder: left alone
    prepare_dataset("coco", {**coco, "splits": ["test"]}, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "notes",
        "prompts.parquet",
        "tasks.json",
        "test",
    ]
