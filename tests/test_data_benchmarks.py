"""CLIP's classification suite (``source: benchmark``): each set read from a miniature tree in
its distribution's real on-disk format, through the same adapter the workflow uses."""

from __future__ import annotations

import csv
import json
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from pipeline.data import load_split, load_tasks, prepare_dataset, source_files, validate_spec
from pipeline.data.benchmarks import BENCHMARKS, clip_benchmark_table

CLASSNAMES = clip_benchmark_table("classnames")
TEMPLATES = clip_benchmark_table("zeroshot_classification_templates")


def picture(path: Path, value: int, size: tuple[int, int] = (20, 14), mode: str = "RGB") -> Path:
    """A small image file whose pixels all hold ``value`` (the label, to check the pairing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 255 - value, 7)).save(path)
    return path


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---- miniature distributions: each returns {file name or index: label} of the test split ----


def cifar10(root: Path) -> dict:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    data = np.stack([np.full(3072, 10 * k, np.uint8) for k in range(4)])
    with open(base / "test_batch", "wb") as file:
        pickle.dump({"data": data, "labels": [3, 0, 9, 3]}, file)
    with open(base / "batches.meta", "wb") as file:
        pickle.dump({"label_names": [f"class {i}" for i in range(10)]}, file)
    return {0: 3, 1: 0, 2: 9, 3: 3}


def cifar100(root: Path) -> dict:
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    data = np.stack([np.full(3072, 10 * k, np.uint8) for k in range(3)])
    with open(base / "test", "wb") as file:
        pickle.dump({"data": data, "fine_labels": [99, 0, 42], "coarse_labels": [0, 0, 0]}, file)
    with open(base / "meta", "wb") as file:
        pickle.dump({"fine_label_names": [f"fine_{i}" for i in range(100)]}, file)
    return {0: 99, 1: 0, 2: 42}


def mnist(root: Path) -> dict:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    labels = [7, 2, 1]
    for prefix, n in (("t10k", 3), ("train", 1)):
        images = np.stack([np.full((28, 28), 40 * k, np.uint8) for k in range(n)])
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">iiii", 2051, n, 28, 28) + images.tobytes()
        )
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">ii", 2049, n) + bytes(labels[:n])
        )
    return dict(enumerate(labels))


def pcam(root: Path) -> dict:
    """PatchCamelyon's HDF5 pair per split: ``x`` (n, 96, 96, 3) uint8 patches, ``y`` (n, 1, 1,
    1) labels, as the distribution ships them."""
    import h5py

    base = root / "pcam"
    base.mkdir()
    labels = [1, 0, 1]
    patches = np.stack([np.full((96, 96, 3), 60 * k, np.uint8) for k in range(3)])
    for split in ("test", "train", "valid"):
        with h5py.File(base / f"camelyonpatch_level_2_split_{split}_x.h5", "w") as file:
            file.create_dataset("x", data=patches)
        with h5py.File(base / f"camelyonpatch_level_2_split_{split}_y.h5", "w") as file:
            file.create_dataset("y", data=np.asarray(labels, np.uint8).reshape(-1, 1, 1, 1))
    return dict(enumerate(labels))


def stl10(root: Path) -> dict:
    base = root / "stl10_binary"
    base.mkdir(parents=True)
    images = np.stack([np.full((3, 96, 96), 50 * k, np.uint8) for k in range(2)])
    (base / "test_X.bin").write_bytes(images.transpose(0, 1, 3, 2).tobytes())  # column-major
    (base / "test_y.bin").write_bytes(bytes([10, 1]))  # 1-based
    write(base / "class_names.txt", "\n".join(f"thing{i}" for i in range(10)) + "\n")
    return {0: 9, 1: 0}


def food101(root: Path) -> dict:
    base = root / "food-101"
    meta = {"apple_pie": ["apple_pie/101", "apple_pie/7"], "ramen": ["ramen/3"]}
    write(base / "meta" / "test.json", json.dumps(meta))
    for ids in meta.values():
        for image in ids:
            picture(base / "images" / f"{image}.jpg", 0)
    return {"101.jpg": 0, "7.jpg": 0, "3.jpg": 1}


def sun397(root: Path) -> dict:
    base = root / "SUN397"
    write(base / "ClassName.txt", "/a/abbey\n/b/bus_interior\n/o/office/cubicle\n")
    picture(base / "a" / "abbey" / "sun_aaa.jpg", 0)
    picture(base / "o" / "office" / "cubicle" / "sun_bbb.jpg", 2)
    picture(base / "b" / "bus_interior" / "sun_ccc.jpg", 1)
    return {"sun_aaa.jpg": 0, "sun_bbb.jpg": 2, "sun_ccc.jpg": 1}


def cars(root: Path) -> dict:
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012"], dtype=object)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": names})
    records = np.array(
        [("00001.jpg", 2), ("00002.jpg", 1)], dtype=[("fname", object), ("class", object)]
    )
    scipy.io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": records})
    for fname, _ in records:
        picture(base / "cars_test" / fname, 0)
    return {"00001.jpg": 1, "00002.jpg": 0}


def fgvc_aircraft(root: Path) -> dict:
    data = root / "fgvc-aircraft-2013b" / "data"
    write(data / "variants.txt", "707-320\nA340-500\nDC-3\n")
    write(data / "images_variant_test.txt", "1514522 DC-3\n0056978 707-320\n")
    picture(data / "images" / "1514522.jpg", 0)
    picture(data / "images" / "0056978.jpg", 0)
    return {"1514522.jpg": 2, "0056978.jpg": 0}


def dtd(root: Path) -> dict:
    base = root / "dtd" / "dtd"
    write(base / "labels" / "test1.txt", "banded/banded_0002.jpg\nzigzagged/zigzagged_0010.jpg\n")
    for line in ("banded/banded_0002.jpg", "zigzagged/zigzagged_0010.jpg"):
        picture(base / "images" / line, 0)
    return {"banded_0002.jpg": 0, "zigzagged_0010.jpg": 1}


def pets(root: Path) -> dict:
    base = root / "oxford-iiit-pet"
    write(
        base / "annotations" / "test.txt",
        "Abyssinian_201 1 1 1\nbasset_hound_12 4 2 3\nAmerican_bulldog_5 2 2 1\n"
        "american_pit_bull_terrier_9 3 2 2\n",
    )
    images = (
        "Abyssinian_201",
        "basset_hound_12",
        "American_bulldog_5",
        "american_pit_bull_terrier_9",
    )
    for image in images:
        picture(base / "images" / f"{image}.jpg", 0)
    return dict(zip((f"{i}.jpg" for i in images), (0, 3, 1, 2), strict=True))


def caltech101(root: Path) -> dict:
    base = root / "caltech101" / "101_ObjectCategories"
    # the real folder names sort like CLIP's list: BACKGROUND_Google, Faces, Faces_easy, ...
    folders = ["BACKGROUND_Google", "Faces", "Faces_easy", *(f"c{i:03d}" for i in range(99))]
    for folder in folders:
        picture(base / folder / "image_0001.jpg", 0)
    picture(base / "Faces_easy" / "image_0002.jpg", 0)
    expected = {f"{folder}/image_0001.jpg": i - 1 for i, folder in enumerate(folders) if i}
    return {**expected, "Faces_easy/image_0002.jpg": 1}


def flowers(root: Path) -> dict:
    base = root / "flowers-102"
    base.mkdir(parents=True)
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([[5, 102, 1]])})  # 1-based
    scipy.io.savemat(
        base / "setid.mat",
        {"trnid": np.array([[1]]), "valid": np.array([[1]]), "tstid": np.array([[2, 3]])},
    )
    for i in (1, 2, 3):
        picture(base / "jpg" / f"image_{i:05d}.jpg", 0)
    return {"image_00002.jpg": 101, "image_00003.jpg": 0}


def class_tree(base: Path, folders: list[str], suffix: str = ".jpg") -> dict:
    """One image per class folder (sorted class index = label), two in the last."""
    expected = {}
    for label, folder in enumerate(sorted(folders)):
        expected[f"{folder}/a{suffix}"] = label
        picture(base / folder / f"a{suffix}", label % 250)
    picture(base / sorted(folders)[-1] / f"b{suffix}", 1)
    expected[f"{sorted(folders)[-1]}/b{suffix}"] = len(folders) - 1
    return expected


def eurosat(root: Path) -> dict:
    folders = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial"]
    folders += ["Pasture", "PermanentCrop", "Residential", "River", "SeaLake"]
    return class_tree(root / "eurosat" / "2750", folders)


def country211(root: Path) -> dict:
    folders = [f"{chr(65 + i // 26)}{chr(65 + i % 26)}" for i in range(211)]
    return class_tree(root / "country211" / "test", folders)


def fer2013(root: Path) -> dict:
    folders = ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
    return class_tree(root / "test", folders)


def resisc45(root: Path) -> dict:
    return class_tree(root / "test", ["airplane", "baseball_diamond", "sea_ice"])


def ucf101(root: Path) -> dict:
    return class_tree(root / "test", ["ApplyEyeMakeup", "Basketball", "YoYo"])


def renderedsst2(root: Path) -> dict:
    return class_tree(root / "rendered-sst2" / "test", ["negative", "positive"], ".png")


def gtsrb(root: Path) -> dict:
    base = root / "gtsrb"
    images = base / "GTSRB" / "Final_Test" / "Images"
    with open(write(base / "GT-final_test.csv", ""), "w", newline="") as file:
        writer = csv.writer(file, delimiter=";")
        writer.writerow(
            ["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"]
        )
        writer.writerow(["00000.ppm", 20, 14, 1, 1, 19, 13, 16])
        writer.writerow(["00001.ppm", 20, 14, 1, 1, 19, 13, 42])
    picture(images / "00000.ppm", 0)
    picture(images / "00001.ppm", 0)
    return {"00000.ppm": 16, "00001.ppm": 42}


def imagenet1k(root: Path) -> dict:
    wnids = [f"n{i:08d}" for i in range(1000)]
    torch.save(({w: (f"name {w}",) for w in wnids}, wnids[:2]), root / "meta.bin")
    return class_tree(root / "val", wnids, ".JPEG")


def birdsnap(root: Path) -> dict:
    write(
        root / "species.txt",
        "id\tcommon\tscientific\tdir\n"
        "1\tAcadian Flycatcher\tEmpidonax virescens\tAcadian_Flycatcher\n"
        "2\tAcorn Woodpecker\tMelanerpes formicivorus\tAcorn_Woodpecker\n",
    )
    write(
        root / "test_images.txt",
        "path\tspecies_id\nAcorn_Woodpecker/2.jpg\t2\nAcadian_Flycatcher/9.jpg\t1\n",
    )
    images = root / "download" / "images"
    picture(images / "Acadian_Flycatcher" / "1.jpg", 0)  # a training image
    picture(images / "Acorn_Woodpecker" / "2.jpg", 0)  # Acadian_Flycatcher/9.jpg: a dead link
    return {"2.jpg": 1}


def kitti(root: Path) -> dict:
    labels = {
        "000000": "Car 0.00 0 -1.5 10 20 30 40 1.5 1.6 3.9 -2.0 1.7 6.5 0.1\n"
        "Pedestrian 0.00 0 0.2 1 2 3 4 1.7 0.6 0.8 1.0 1.7 3.0 0.2\n",
        "000001": "Van 0.00 0 -1.5 10 20 30 40 1.5 1.6 3.9 -2.0 1.7 14.0 0.1\n"
        "Truck 0.00 0 -1.5 10 20 30 40 1.5 1.6 3.9 -2.0 1.7 33.0 0.1\n",
        "000002": "DontCare -1 -1 -10 1 2 3 4 -1 -1 -1 -1000 -1000 -1000 -10\n",
        "000003": "Cyclist 0.00 0 -1.5 10 20 30 40 1.5 1.6 3.9 -2.0 1.7 2.0 0.1\n"
        "Car 0.00 0 -1.5 10 20 30 40 1.5 1.6 3.9 -2.0 1.7 45.0 0.1\n",
    }
    for image_id, text in labels.items():
        write(root / "training" / "label_2" / f"{image_id}.txt", text)
        picture(root / "training" / "image_2" / f"{image_id}.png", 0)
    write(root / "test.txt", "000000\n000001\n000002\n000003\n")
    return {"000000.png": 0, "000001.png": 1, "000002.png": 3, "000003.png": 2}


TREES: dict[str, Callable[[Path], dict]] = {
    "cifar10": cifar10, "cifar100": cifar100, "mnist": mnist, "stl10": stl10,
    "food101": food101, "sun397": sun397, "cars": cars, "fgvc_aircraft": fgvc_aircraft,
    "dtd": dtd, "pets": pets, "caltech101": caltech101, "flowers": flowers,
    "eurosat": eurosat, "gtsrb": gtsrb, "country211": country211, "fer2013": fer2013,
    "resisc45": resisc45, "ucf101": ucf101, "renderedsst2": renderedsst2,
    "imagenet1k": imagenet1k, "birdsnap": birdsnap, "kitti": kitti, "pcam": pcam,
}  # fmt: skip
IN_MEMORY = {"cifar10", "cifar100", "mnist", "stl10", "pcam"}


def test_every_benchmark_has_a_miniature_tree() -> None:
    assert set(BENCHMARKS) == set(TREES)


@pytest.mark.parametrize("dataset", sorted(TREES))
def test_a_benchmark_is_read_from_its_real_layout(dataset, tmp_path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    expected = TREES[dataset](root)
    split = "val" if dataset == "imagenet1k" else "test"
    spec = {"source": "benchmark", "dataset": dataset, "root": str(root)}
    assert validate_spec("bench", spec)["splits"] == [split]
    out = tmp_path / "prepared"
    prepare_dataset("bench", spec, out)
    images = load_split(out, split).images
    [task] = load_tasks(out)
    assert task.kind == "classification" and task.split == split and task.label_column == "label"
    benchmark = BENCHMARKS[dataset]
    if benchmark.classnames is not None:
        names = CLASSNAMES[benchmark.classnames]
        assert list(task.classnames) == (names[1:] if dataset == "caltech101" else names)
    templates = TEMPLATES.get(benchmark.templates, TEMPLATES["imagenet1k"])
    assert list(task.templates) == [t.replace("{c}", "{}") for t in templates]
    if dataset in IN_MEMORY:
        got = dict(enumerate(images["label"].to_list()))
        assert all(not Path(p).is_absolute() for p in images["path"])
    else:
        parts = len(Path(next(iter(expected))).parts)  # the keys name a file by its last parts
        got = {
            "/".join(Path(path).parts[-parts:]): label
            for path, label in zip(images["path"], images["label"], strict=True)
        }
        assert all(Path(p).is_absolute() for p in images["path"])
    assert got == expected
    assert images["class_name"].to_list() == [task.classnames[y] for y in images["label"]]
    first = load_split(out, split).open_image(0)
    assert first.mode == "RGB"


def test_in_memory_images_keep_their_pixels(tmp_path) -> None:
    cifar10(tmp_path)
    spec = {"source": "benchmark", "dataset": "cifar10", "root": str(tmp_path)}
    prepare_dataset("c", spec, tmp_path / "out")
    split = load_split(tmp_path / "out", "test")
    for i in range(4):
        assert np.array_equal(np.asarray(split.open_image(i)), np.full((32, 32, 3), 10 * i))


def test_array_images_are_decoded_in_their_formats_layout(tmp_path) -> None:
    """CIFAR's rows hold the R, G and B planes in turn, each row-major; STL-10 stores each
    channel column-major: an image whose red is its row and green its column comes back so."""
    for dataset, size in (("cifar10", 32), ("stl10", 96)):
        rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
        image = np.stack([rows * 2, cols, np.full_like(rows, 7)], axis=-1).astype(np.uint8)
        root = tmp_path / dataset
        TREES[dataset](root)
        if dataset == "cifar10":
            planes = image.transpose(2, 0, 1).reshape(1, -1)
            with open(root / "cifar-10-batches-py" / "test_batch", "wb") as file:
                pickle.dump({"data": planes, "labels": [5]}, file)
        else:
            base = root / "stl10_binary"
            (base / "test_X.bin").write_bytes(image.transpose(2, 1, 0).tobytes())
            (base / "test_y.bin").write_bytes(bytes([3]))
        spec = {"source": "benchmark", "dataset": dataset, "root": str(root)}
        prepare_dataset(dataset, spec, tmp_path / f"{dataset}-out")
        split = load_split(tmp_path / f"{dataset}-out", "test")
        assert len(split.images) == 1
        assert np.array_equal(np.asarray(split.open_image(0)), image)


def test_the_in_memory_sets_are_the_ones_read_from_arrays() -> None:
    assert {name for name, b in BENCHMARKS.items() if b.in_memory} == IN_MEMORY


def test_class_names_come_from_the_dataset_where_clip_benchmark_does(tmp_path) -> None:
    food101(tmp_path / "f")
    sun397(tmp_path / "s")
    for dataset, root, names in (
        ("food101", "f", ["apple pie", "ramen"]),
        ("sun397", "s", ["abbey", "bus interior", "office cubicle"]),
    ):
        spec = {"source": "benchmark", "dataset": dataset, "root": str(tmp_path / root)}
        prepare_dataset(dataset, spec, tmp_path / dataset)
        assert list(load_tasks(tmp_path / dataset)[0].classnames) == names


def test_missing_data_stops_validation_naming_the_dataset_and_the_path(tmp_path) -> None:
    spec = {"source": "benchmark", "dataset": "food101", "root": str(tmp_path)}
    with pytest.raises(
        ValueError, match=r"dataset 'food'.*Food-101.*food-101/meta/test.json is missing"
    ):
        validate_spec("food", spec)
    with pytest.raises(ValueError, match=r"'root' names no existing folder"):
        validate_spec("food", {**spec, "root": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match=r"UCF101 frames.*test is missing"):
        validate_spec("ucf", {"source": "benchmark", "dataset": "ucf101", "root": str(tmp_path)})
    with pytest.raises(ValueError, match="not one of"):
        validate_spec("x", {**spec, "dataset": "food-101"})
    with pytest.raises(ValueError, match="unknown split 'val'"):
        validate_spec("x", {**spec, "dataset": "cars", "splits": ["val"]})


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".ppm"}


@pytest.mark.parametrize("dataset", sorted(TREES))
def test_a_missing_file_stops_the_run_before_any_job_unless_unneeded(dataset, tmp_path) -> None:
    """Each file of the miniature but its images (the workflow's inputs: Snakemake names a
    missing one), removed alone: validation or the source listing (both before any job)
    names it, or the set is still read without it (a file of another split)."""
    root = tmp_path / "data"
    root.mkdir()
    TREES[dataset](root)
    spec = {"source": "benchmark", "dataset": dataset, "root": str(root)}
    [split] = validate_spec("b", spec)["splits"]
    assert all((root / need).exists() for need in BENCHMARKS[dataset].needs(split))
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES]
    for path in sorted(files):
        copy = tmp_path / "copy"
        shutil.copytree(root, copy)
        missing = copy / path.relative_to(root)
        missing.unlink()
        damaged = {**spec, "root": str(copy)}
        try:
            source_files("b", damaged)  # validates first
        except ValueError as err:
            assert str(missing) in str(err), err
        else:
            prepare_dataset("b", damaged, tmp_path / "out")
            shutil.rmtree(tmp_path / "out")
        shutil.rmtree(copy)


def test_pcam_without_h5py_is_refused_before_any_job(tmp_path, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "h5py" else real(name, *a)
    )
    pcam(tmp_path)
    spec = {"source": "benchmark", "dataset": "pcam", "root": str(tmp_path)}
    with pytest.raises(ValueError, match="h5py package, which is not installed"):
        validate_spec("pcam", spec)


def test_a_corrupt_distribution_is_an_error_naming_it(tmp_path) -> None:
    cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch.read_bytes()[:100])  # a download cut short
    spec = {"source": "benchmark", "dataset": "cifar10", "root": str(tmp_path)}
    with pytest.raises(ValueError, match=r"dataset 'c': cannot read CIFAR-10 split 'test'"):
        prepare_dataset("c", spec, tmp_path / "out")


def test_a_config_naming_missing_benchmark_data_fails_before_any_job(tmp_path) -> None:
    from pipeline.config import ConfigError, load_config, validate_config

    config = load_config(Path(__file__).resolve().parent.parent / "config.yaml")
    config["datasets"]["dtd"] = {"source": "benchmark", "dataset": "dtd", "root": str(tmp_path)}
    with pytest.raises(ConfigError, match=r"datasets\.dtd.*DTD data: .*test1.txt is missing"):
        validate_config(config)
    config["datasets"]["dtd"]["dataset"] = "dtd2"
    with pytest.raises(ConfigError, match=r"datasets\.dtd"):
        validate_config(config)


def test_the_schema_lists_every_benchmark() -> None:
    from pipeline.config import load_schema

    schema = load_schema()["$defs"]["benchmark_dataset"]["properties"]["dataset"]["enum"]
    assert sorted(schema) == sorted(BENCHMARKS)
