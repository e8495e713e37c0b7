"""CLIP's zero-shot classification suite (``source: benchmark``): one adapter, one table.

Spec keys: ``dataset`` (a name of ``BENCHMARKS``, as CLIP_benchmark names them), ``root``
(the folder the distribution was unpacked in: torchvision's ``root``), ``splits`` (default
``[test]``; the names the distribution has, below) and ``templates`` (optional text file,
one template with one ``{}`` per line).

Reading. Where torchvision has a dataset class it reads the distribution's own files
(``download=False``: nothing is fetched): the class's sample list gives each image's file
and label, so nothing is decoded while preparing and ``images.parquet`` points to the
user's files (absolute paths). Sets whose images come in arrays (CIFAR's pickled batches,
MNIST's idx files, STL-10's binaries, PCam's HDF5) have their images written as PNG files
into the prepared dataset (lossless, ``<split>/images/<id>.png``). Sets without a torchvision
class are read in the format their distribution (or VISSL's ``disk_folder`` preparation,
which the PAL and STRUCTURE authors' scripts produce) uses, through torchvision's
``ImageFolder`` where that is a class-folder tree, else by a reader here (Birdsnap, KITTI).
CIFAR-10/100, STL-10 and Flowers-102 are read here too, though torchvision has classes for
them: those refuse to read one split unless every file of the whole distribution is there
and matches its published md5 (STL-10's 2.6 GB unlabeled split included, hashed again on
every read), so a miniature of the format could never be read end to end.

Class names and templates come from the ``clip-benchmark`` package (its
``en_classnames.json`` and ``en_zeroshot_classification_templates.json``, read as package
data), the way its dataset builder picks them: the JSON's names where it has the dataset,
else the torchvision dataset's own ``classes`` (with the builder's clean-ups: Food-101's
``_`` and SUN397's ``_`` and ``/`` become spaces); the JSON's templates for the dataset,
else its ImageNet templates (the builder's fallback).

Missing data is a spec error raised while the config is validated (before any job): it
names the dataset and the folder or file looked for (``Benchmark.needs``: every file or
folder the reader opens for a split, but the images a listing names, which the workflow
tracks as inputs: Snakemake names a missing one before any job too).
"""

from __future__ import annotations

import importlib.util
import inspect
import io
import json
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from PIL import Image

from pipeline.atomic import write_bytes
from pipeline.data.image_folder import read_lines, read_templates
from pipeline.data.manifest import (
    CAPTION_SCHEMA,
    PreparedDataset,
    Split,
    check_keys,
    spec_error,
    spec_path,
    spec_splits,
)
from pipeline.data.tasks import CLASSIFICATION, Task, check_template

IMAGE_SCHEMA = {
    "image_id": pl.String,
    "path": pl.String,
    "label": pl.Int64,
    "class_name": pl.String,
}
TASK_SPLIT = "test"
FALLBACK_TEMPLATES = "imagenet1k"  # CLIP_benchmark's templates for a dataset it has none for


@dataclass(frozen=True)
class Samples:
    """One split as a reader gives it: labels and the dataset's own class names, and either
    each image's file (``files``) or each image in memory (``image(i)``)."""

    labels: list[int]
    classes: list[str] | None  # None: the dataset names none (its labels are CLIP's list's)
    files: list[Path] | None = None
    image: Callable[[int], Image.Image] | None = None


@dataclass(frozen=True)
class Benchmark:
    """How one distribution is read: ``needs(split)`` (the paths under root the reader opens
    for a split, for the missing-data error), its ``splits``, ``read(root, split)``, the class
    names (a key of clip-benchmark's ``en_classnames.json``, or None for the dataset's own,
    then ``rename``d), the templates' key, and ``sources`` (globs under root of the files
    besides the images that determine the samples; for a set ``in_memory``, whose images are
    decoded from its data files, they name every file, so listing them reads nothing)."""

    title: str
    needs: Callable[[str], tuple[str, ...]]
    splits: tuple[str, ...]
    read: Callable[[Path, str], Samples]
    classnames: str | None
    templates: str
    sources: tuple[str, ...]
    rename: Callable[[str], str] = lambda name: name
    requires: str | None = None  # a package read needs beyond torchvision (checked early)
    in_memory: bool = False


# ---- readers -------------------------------------------------------------------------------


def _torchvision(
    cls: str,
    split_arg: Callable[[str], dict[str, Any]],
    rows: Callable[[Any], tuple[list[Any], list[int]]] | None,
) -> Callable[[Path, str], Samples]:
    """A reader through torchvision's dataset class ``cls``: ``split_arg(split)`` its split
    keyword(s); ``rows(dataset)`` (files, labels) from its sample list, or None: the images
    are in memory (``dataset[i]``) and the labels come with them."""

    def read(root: Path, split: str) -> Samples:
        from torchvision import datasets

        klass = getattr(datasets, cls)
        offline = {"download": False} if "download" in inspect.signature(klass).parameters else {}
        dataset = klass(str(root), **offline, **split_arg(split))
        own = getattr(dataset, "classes", getattr(dataset, "categories", None))
        classes = None if own is None else list(own)
        if rows is not None:  # by file path: a folder listing's order is the file system's
            pairs = sorted((str(f), int(y)) for f, y in zip(*rows(dataset), strict=True))
            return Samples([y for _, y in pairs], classes, [Path(f) for f, _ in pairs])
        labels = [int(y) for y in _labels_in_memory(dataset)]
        return Samples(labels, classes, image=lambda i: dataset[i][0])

    return read


def _labels_in_memory(dataset: Any) -> list[int]:
    """The labels of an array-backed torchvision dataset, without decoding its images."""
    for attribute in ("targets", "labels", "_labels"):
        labels = getattr(dataset, attribute, None)
        if labels is not None:
            return [int(y) for y in labels]
    return [int(dataset[i][1]) for i in range(len(dataset))]


def _image_folder(folder: Callable[[Path, str], Path]) -> Callable[[Path, str], Samples]:
    """A ``<folder>/<class>/<image>`` tree through torchvision's ``ImageFolder``."""

    def read(root: Path, split: str) -> Samples:
        from torchvision.datasets import ImageFolder

        dataset = ImageFolder(str(folder(root, split)))
        files, labels = zip(*dataset.samples, strict=True) if dataset.samples else ((), ())
        return Samples(list(labels), list(dataset.classes), [Path(f) for f in files])

    return read


def _samples(dataset: Any) -> tuple[list[Any], list[int]]:
    files, labels = zip(
        *(dataset.samples if hasattr(dataset, "samples") else dataset._samples), strict=True
    )
    return list(files), list(labels)


def _caltech101(dataset: Any) -> tuple[list[Any], list[int]]:
    base = Path(dataset.root) / "101_ObjectCategories"
    files = [
        base / dataset.categories[y] / f"image_{index:04d}.jpg"
        for y, index in zip(dataset.y, dataset.index, strict=True)
    ]
    return files, list(dataset.y)


CIFAR10_BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR100_BATCHES = {"train": ("train",), "test": ("test",)}


def _unpickle(path: Path) -> dict[str, Any]:
    with open(path, "rb") as file:
        return pickle.load(file, encoding="latin1")  # Python 2 pickles, as torchvision reads them


def _cifar(
    folder: str, batches: Mapping[str, tuple[str, ...]], labels: str, meta: str, names: str
) -> Callable[[Path, str], Samples]:
    """CIFAR's pickled batches under ``root/folder``: ``data`` (n, 3072) uint8, the R, G and B
    planes of each 32 x 32 image in turn, the labels under ``labels``; the class names under
    ``names`` of the ``meta`` pickle."""

    def read(root: Path, split: str) -> Samples:
        base, images, targets = root / folder, [], []
        for batch in batches[split]:
            entry = _unpickle(base / batch)
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            targets += [int(y) for y in entry[labels]]
        pixels = np.ascontiguousarray(np.concatenate(images).transpose(0, 2, 3, 1))  # HWC
        if len(pixels) != len(targets):
            raise ValueError(f"{base}: {len(pixels)} images but {len(targets)} labels")
        classes = [str(c) for c in _unpickle(base / meta)[names]]
        return Samples(targets, classes, image=lambda i: Image.fromarray(pixels[i]))

    return read


def _read_stl10(root: Path, split: str) -> Samples:
    """STL-10's binaries: ``<split>_X.bin`` 96 x 96 RGB images, each channel stored
    column-major; ``<split>_y.bin`` one label 1..10 per image; ``class_names.txt``."""
    base = root / "stl10_binary"
    raw = np.memmap(base / f"{split}_X.bin", dtype=np.uint8, mode="r").reshape(-1, 3, 96, 96)
    labels = [int(y) - 1 for y in np.fromfile(base / f"{split}_y.bin", dtype=np.uint8)]
    if len(raw) != len(labels):
        raise ValueError(f"{base}: {len(raw)} images but {len(labels)} labels for {split!r}")
    pixels = raw.transpose(0, 3, 2, 1)  # (image, channel, column, row) -> (image, row, column, RGB)
    classes = read_lines(base / "class_names.txt")
    return Samples(
        labels, classes, image=lambda i: Image.fromarray(np.ascontiguousarray(pixels[i]))
    )


FLOWERS_SETS = {"train": "trnid", "val": "valid", "test": "tstid"}


def _read_flowers(root: Path, split: str) -> Samples:
    """Flowers-102: ``setid.mat`` (the image ids 1..n of each split: ``trnid``, ``valid``,
    ``tstid``), ``imagelabels.mat`` (``labels``: each image's class 1..102) and
    ``jpg/image_<id:05d>.jpg``."""
    import scipy.io

    base = root / "flowers-102"
    ids = sorted(
        int(i) for i in np.ravel(scipy.io.loadmat(base / "setid.mat")[FLOWERS_SETS[split]])
    )
    labels = np.ravel(scipy.io.loadmat(base / "imagelabels.mat")["labels"])
    if ids and not 1 <= ids[0] <= ids[-1] <= len(labels):
        raise ValueError(
            f"{base / 'setid.mat'}: image ids outside imagelabels.mat's 1..{len(labels)}"
        )
    files = [base / "jpg" / f"image_{i:05d}.jpg" for i in ids]
    return Samples([int(labels[i - 1]) - 1 for i in ids], None, files)


def _read_birdsnap(root: Path, split: str) -> Samples:
    """Birdsnap as its ``get_birdsnap.py`` leaves it: ``species.txt`` (tab-separated, a header,
    then id, common name, scientific name, folder), ``test_images.txt`` (a header, then one
    ``<folder>/<file>`` per line) and ``download/images/<folder>/<file>``. The test split is
    the listed images, the train split every other downloaded one; listed images the download
    did not get (dead links) are left out."""
    species = [line.split("\t") for line in read_lines(root / "species.txt")[1:]]
    folders = [row[3] for row in species]
    index = {folder: i for i, folder in enumerate(folders)}
    images = root / "download" / "images"
    listed = {line.split("\t")[0] for line in read_lines(root / "test_images.txt")[1:]}
    found = sorted(
        f"{path.parent.name}/{path.name}"
        for folder in folders
        if (images / folder).is_dir()
        for path in (images / folder).iterdir()
        if path.is_file()
    )
    chosen = [p for p in found if (p in listed) == (split == "test")]
    return Samples(
        [index[p.split("/")[0]] for p in chosen],
        [row[1] for row in species],
        [images / p for p in chosen],
    )


KITTI_VEHICLES = ("Car", "Van", "Truck")
KITTI_THRESHOLDS = (8.0, 20.0, 999.0)  # metres: VTAB's closest_vehicle_distance bins


def _read_kitti(root: Path, split: str) -> Samples:
    """KITTI's object data (``training/image_2/<id>.png``, ``training/label_2/<id>.txt``) as
    VTAB's closest-vehicle-distance task: the depth z (column 14 of a label line) of the
    nearest Car, Van or Truck, binned at 8, 20 and 999 m, a fourth class when there is none.
    ``<split>.txt`` under root, when present, lists the image ids of a split (VTAB's own
    split comes from TFDS); without it the split is every labelled image."""
    images, labels_dir = root / "training" / "image_2", root / "training" / "label_2"
    listing = root / f"{split}.txt"
    ids = (
        read_lines(listing)
        if listing.is_file()
        else sorted(p.stem for p in labels_dir.glob("*.txt"))
    )
    labels = []
    for image_id in ids:
        depths = [
            float(fields[13])
            for fields in (line.split() for line in read_lines(labels_dir / f"{image_id}.txt"))
            if fields and fields[0] in KITTI_VEHICLES
        ]
        nearest = min(depths, default=1000.0)
        labels.append(sum(nearest > t for t in KITTI_THRESHOLDS))
    return Samples(
        labels, ["close", "nearby", "distant", "none"], [images / f"{i}.png" for i in ids]
    )


def _paths(*patterns: str) -> Callable[[str], tuple[str, ...]]:
    """``needs`` of a reader that opens ``patterns`` under root, ``{split}`` the split's name."""
    return lambda split: tuple(pattern.format(split=split) for pattern in patterns)


def _words(name: str) -> str:
    """UCF101's CamelCase class folders as words ("ApplyEyeMakeup" -> "Apply Eye Makeup")."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", name).replace("_", " ")


def _split_folder(root: Path, split: str) -> Path:
    return root / split


def _train(split: str) -> dict[str, Any]:
    return {"train": split == "train"}


def _split(split: str) -> dict[str, Any]:
    return {"split": split}


def _no_split(split: str) -> dict[str, Any]:
    return {}


# Per set: what must exist under root, its splits, how it is read, where its class names come
# from (a key of clip-benchmark's en_classnames.json, or None: the dataset's own), the key of
# its templates, and the globs of the files besides the images that determine it.
T = Benchmark  # short, for the table


def _files_labels(dataset: Any) -> tuple[list[Any], list[int]]:
    return dataset._image_files, dataset._labels


# fmt: off
MNIST_FILES = tuple(f"MNIST/raw/{p}-{k}-ubyte" for p in ("train", "t10k")
                    for k in ("images-idx3", "labels-idx1"))  # torchvision opens all four
PCAM_FILES = {"train": "train", "val": "valid", "test": "test"}
BENCHMARKS: dict[str, Benchmark] = {
    "cifar10": T("CIFAR-10", splits=("train", "test"),
                 needs=lambda s: tuple(f"cifar-10-batches-py/{f}"
                                       for f in ("batches.meta", *CIFAR10_BATCHES[s])),
                 read=_cifar("cifar-10-batches-py", CIFAR10_BATCHES, "labels", "batches.meta",
                             "label_names"),
                 classnames=None, templates="cifar10", sources=("cifar-10-batches-py/*",),
                 in_memory=True),
    "cifar100": T("CIFAR-100", splits=("train", "test"),
                  needs=lambda s: tuple(f"cifar-100-python/{f}"
                                        for f in ("meta", *CIFAR100_BATCHES[s])),
                  read=_cifar("cifar-100-python", CIFAR100_BATCHES, "fine_labels", "meta",
                              "fine_label_names"),
                  classnames=None, templates="cifar100", sources=("cifar-100-python/*",),
                  in_memory=True),
    "mnist": T("MNIST", needs=_paths(*MNIST_FILES), splits=("train", "test"),
               read=_torchvision("MNIST", _train, None), classnames="mnist",
               templates="mnist", sources=("MNIST/raw/*-ubyte",), in_memory=True),
    "stl10": T("STL-10", splits=("train", "test"),
               needs=_paths("stl10_binary/{split}_X.bin", "stl10_binary/{split}_y.bin",
                            "stl10_binary/class_names.txt"),
               read=_read_stl10, classnames=None, templates="stl10",
               sources=("stl10_binary/*",), in_memory=True),
    "pcam": T("PatchCamelyon", splits=("train", "val", "test"),
              needs=lambda s: tuple(f"pcam/camelyonpatch_level_2_split_{PCAM_FILES[s]}_{xy}.h5"
                                    for xy in "xy"),
              read=_torchvision("PCAM", _split, None), classnames="pcam",
              templates="pcam", sources=("pcam/*.h5",), requires="h5py", in_memory=True),
    "food101": T("Food-101", needs=_paths("food-101/meta/{split}.json", "food-101/images"),
                 splits=("train", "test"),
                 read=_torchvision("Food101", _split, _files_labels), classnames=None,
                 templates="food101", sources=("food-101/meta/*.json",),
                 rename=lambda n: n.replace("_", " ")),
    "sun397": T("SUN397", needs=_paths("SUN397/ClassName.txt"), splits=("test",),
                read=_torchvision("SUN397", _no_split, _files_labels), classnames=None,
                templates="sun397", sources=("SUN397/ClassName.txt",),
                rename=lambda n: n.replace("_", " ").replace("/", " ")),
    "cars": T("Stanford Cars", splits=("train", "test"),
              needs=lambda s: ("stanford_cars/devkit/cars_meta.mat", *(
                  ("stanford_cars/devkit/cars_train_annos.mat", "stanford_cars/cars_train")
                  if s == "train" else
                  ("stanford_cars/cars_test_annos_withlabels.mat", "stanford_cars/cars_test"))),
              read=_torchvision("StanfordCars", _split, _samples), classnames=None,
              templates="cars", sources=("stanford_cars/devkit/*.mat", "stanford_cars/*.mat")),
    "fgvc_aircraft": T("FGVC Aircraft", splits=("train", "val", "trainval", "test"),
                       needs=_paths("fgvc-aircraft-2013b/data/variants.txt",
                                    "fgvc-aircraft-2013b/data/images_variant_{split}.txt",
                                    "fgvc-aircraft-2013b/data/images"),
                       read=_torchvision("FGVCAircraft",
                                         lambda s: {"split": s, "annotation_level": "variant"},
                                         _files_labels),
                       classnames=None, templates="fgvc_aircraft",
                       sources=("fgvc-aircraft-2013b/data/*.txt",)),
    "dtd": T("DTD", needs=_paths("dtd/dtd/labels/{split}1.txt", "dtd/dtd/images"),
             splits=("train", "val", "test"),
             read=_torchvision("DTD", lambda s: {"split": s, "partition": 1}, _files_labels),
             classnames=None, templates="dtd", sources=("dtd/dtd/labels/*1.txt",)),
    "pets": T("Oxford-IIIT Pets",
              needs=_paths("oxford-iiit-pet/annotations/{split}.txt", "oxford-iiit-pet/images"),
              splits=("trainval", "test"),
              read=_torchvision("OxfordIIITPet",
                                lambda s: {"split": s, "target_types": "category"},
                                lambda d: (d._images, d._labels)),
              classnames=None, templates="pets",
              sources=("oxford-iiit-pet/annotations/*.txt",)),
    "caltech101": T("Caltech-101", needs=_paths("caltech101/101_ObjectCategories"),
                    splits=("test",),
                    read=_torchvision("Caltech101", lambda s: {"target_type": "category"},
                                      _caltech101),
                    classnames="caltech101", templates="caltech101", sources=()),
    "flowers": T("Flowers-102", splits=("train", "val", "test"),
                 needs=_paths("flowers-102/setid.mat", "flowers-102/imagelabels.mat",
                              "flowers-102/jpg"),
                 read=_read_flowers, classnames="flowers", templates="flowers",
                 sources=("flowers-102/*.mat",)),
    "eurosat": T("EuroSAT", needs=_paths("eurosat/2750"), splits=("test",),
                 read=_torchvision("EuroSAT", _no_split, _samples), classnames="eurosat",
                 templates="eurosat", sources=()),
    "gtsrb": T("GTSRB", splits=("train", "test"),
               needs=lambda s: ("gtsrb/GTSRB/Training",) if s == "train" else
               ("gtsrb/GTSRB/Final_Test/Images", "gtsrb/GT-final_test.csv"),
               read=_torchvision("GTSRB", _split, _samples), classnames="gtsrb",
               templates="gtsrb", sources=("gtsrb/GT-final_test.csv",)),
    "country211": T("Country211", needs=_paths("country211/{split}"),
                    splits=("train", "valid", "test"),
                    read=_torchvision("Country211", _split, _samples),
                    classnames="country211", templates="country211", sources=()),
    "renderedsst2": T("Rendered SST2", needs=_paths("rendered-sst2/{split}"),
                      splits=("train", "val", "test"),
                      read=_torchvision("RenderedSST2", _split, _samples), classnames=None,
                      templates="renderedsst2", sources=()),
    "imagenet1k": T("ImageNet", needs=_paths("meta.bin", "{split}"), splits=("train", "val"),
                    read=_torchvision("ImageNet", _split, _samples),
                    classnames="imagenet1k", templates="imagenet1k", sources=("meta.bin",)),
    # class-folder trees (<root>/<split>/<class>/<image>) read by torchvision's ImageFolder:
    # FER2013 as the Kaggle folders CLIP_benchmark reads, RESISC45 and UCF101's middle frames
    # as VISSL's disk_folder preparation writes them
    "fer2013": T("FER2013", needs=_paths("{split}"), splits=("train", "test"),
                 read=_image_folder(_split_folder), classnames="fer2013",
                 templates="fer2013", sources=()),
    "resisc45": T("RESISC45", needs=_paths("{split}"), splits=("train", "val", "test"),
                  read=_image_folder(_split_folder), classnames=None, templates="resisc45",
                  sources=(), rename=lambda n: n.replace("_", " ")),
    "ucf101": T("UCF101 frames", needs=_paths("{split}"), splits=("train", "val", "test"),
                read=_image_folder(_split_folder), classnames=None, templates="ucf101",
                sources=(), rename=_words),
    # readers of their own
    "birdsnap": T("Birdsnap", needs=_paths("species.txt", "test_images.txt", "download/images"),
                  splits=("train", "test"), read=_read_birdsnap, classnames=None,
                  templates="birdsnap", sources=("species.txt", "test_images.txt")),
    "kitti": T("KITTI closest vehicle distance",
               needs=_paths("training/image_2", "training/label_2"),
               splits=("train", "val", "test"), read=_read_kitti,
               classnames="kitti_closest_vehicle_distance",
               templates="kitti_closest_vehicle_distance",
               sources=("*.txt", "training/label_2/*.txt")),
}
# fmt: on


@cache
def clip_benchmark_table(kind: str) -> dict[str, list[str]]:
    """clip-benchmark's English ``classnames`` or ``zeroshot_classification_templates`` JSON."""
    files = resources.files("clip_benchmark.datasets")
    return json.loads((files / f"en_{kind}.json").read_text())


# ---- the Source ----------------------------------------------------------------------------


def normalize_spec(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    check_keys(name, spec, required=("dataset", "root"), optional=("splits", "templates"))
    dataset = spec["dataset"]
    if dataset not in BENCHMARKS:
        raise spec_error(name, "dataset", f"is {dataset!r}, not one of {sorted(BENCHMARKS)}")
    benchmark = BENCHMARKS[dataset]
    root = Path(spec_path(name, spec, "root", is_dir=True))
    default = [TASK_SPLIT] if TASK_SPLIT in benchmark.splits else [benchmark.splits[-1]]
    splits = spec_splits(name, spec, benchmark.splits, default)
    for need in dict.fromkeys(need for split in splits for need in benchmark.needs(split)):
        if not (root / need).exists():
            raise spec_error(
                name, "root", f"holds no {benchmark.title} data: {root / need} is missing"
            )
    if benchmark.requires is not None and importlib.util.find_spec(benchmark.requires) is None:
        raise spec_error(
            name,
            "dataset",
            f"{dataset!r} is read with the {benchmark.requires} package, which is not installed",
        )
    normalized = {"source": "benchmark", "dataset": dataset, "root": str(root), "splits": splits}
    if spec.get("templates") is not None:
        normalized["templates"] = spec_path(name, spec, "templates", is_dir=False)
    return normalized


def source_files(name: str, spec: Mapping[str, Any]) -> list[Path]:
    """The distribution's annotation and data files (the entry's ``sources`` globs), then
    every image file the listed splits use, sorted. A set whose images are in its data files
    is not read: those are all its sources (the workflow lists them on every run)."""
    benchmark, root = BENCHMARKS[spec["dataset"]], Path(spec["root"])
    texts = [Path(spec["templates"])] if spec.get("templates") is not None else []
    meta = sorted(path for pattern in benchmark.sources for path in root.glob(pattern))
    if benchmark.in_memory:
        return texts + meta
    files = sorted({file for split in spec["splits"] for file in _read(name, spec, split).files})
    return texts + meta + files


def _read(name: str, spec: Mapping[str, Any], split: str) -> Samples:
    benchmark = BENCHMARKS[spec["dataset"]]
    try:
        samples = benchmark.read(Path(spec["root"]), split)
    except (
        OSError,
        RuntimeError,
        ValueError,
        KeyError,
        IndexError,
        EOFError,
        pickle.UnpicklingError,
    ) as err:
        raise ValueError(
            f"dataset {name!r}: cannot read {benchmark.title} split {split!r} under "
            f"{spec['root']}: {err}"
        ) from err
    return samples


def build(name: str, spec: Mapping[str, Any], out_dir: Path) -> PreparedDataset:
    benchmark = BENCHMARKS[spec["dataset"]]
    splits, classes = {}, None
    for split in spec["splits"]:
        samples = _read(name, spec, split)
        if classes is not None and samples.classes != classes:
            raise ValueError(f"dataset {name!r}: splits {spec['splits']} disagree on the classes")
        classes = samples.classes
        names = class_names(name, benchmark, classes)
        splits[split] = Split(
            images=_rows(name, split, samples, names, Path(out_dir)),
            captions=pl.DataFrame(schema=CAPTION_SCHEMA),
            root=Path(out_dir),
        )
    task_split = TASK_SPLIT if TASK_SPLIT in splits else spec["splits"][0]
    task = Task(
        name, CLASSIFICATION, task_split, "label", tuple(names), _templates(benchmark, spec)
    )
    return PreparedDataset(splits, [task])


def class_names(name: str, benchmark: Benchmark, classes: list[str]) -> list[str]:
    """CLIP's names for the dataset's classes: clip-benchmark's list where it has one (as many
    names as the data has classes, where the data names them), else the dataset's own,
    renamed."""
    if benchmark.classnames is None:
        if classes is None:
            raise ValueError(f"dataset {name!r}: {benchmark.title} names no classes")
        return [benchmark.rename(c) for c in classes]
    names = clip_benchmark_table("classnames")[benchmark.classnames]
    if benchmark.classnames == "caltech101":
        names = names[1:]  # CLIP's list starts with the background class torchvision drops
    if classes is not None and len(names) != len(classes):
        raise ValueError(
            f"dataset {name!r}: clip-benchmark names {len(names)} classes of "
            f"{benchmark.title}, the data has {len(classes)}"
        )
    return list(names)


def _templates(benchmark: Benchmark, spec: Mapping[str, Any]) -> tuple[str, ...]:
    """The spec's template file, else clip-benchmark's templates (its placeholder ``{c}``
    becomes ``{}``)."""
    if spec.get("templates") is not None:
        return read_templates(spec["templates"])
    table = clip_benchmark_table("zeroshot_classification_templates")
    templates = table.get(benchmark.templates, table[FALLBACK_TEMPLATES])
    templates = tuple(t.replace("{c}", "{}") for t in templates)
    for template in templates:
        check_template(template)
    return templates


def _rows(name: str, split: str, samples: Samples, names: list[str], out_dir: Path) -> pl.DataFrame:
    """One row per image: the user's file, or the in-memory image written as a PNG."""
    if not samples.labels:
        raise ValueError(f"dataset {name!r}: split {split!r} has no images")
    rows = []
    for i, label in enumerate(samples.labels):
        if not 0 <= label < len(names):
            raise ValueError(f"dataset {name!r}: image {i} of {split!r} has label {label}")
        image_id = f"{name}-{split}-{i:06d}"
        if samples.files is not None:
            path = str(samples.files[i].absolute())
        else:
            path = f"{split}/images/{image_id}.png"
            buffer = io.BytesIO()
            samples.image(i).save(buffer, format="PNG", compress_level=1)  # lossless
            write_bytes(out_dir / path, buffer.getvalue())
        rows.append(
            {
                "image_id": image_id,
                "path": path,
                "label": label,
                "class_name": names[label],
            }
        )
    return pl.DataFrame(rows, schema=IMAGE_SCHEMA)
