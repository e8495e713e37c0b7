"""The reproduction configurations (workflow/configs/structure.yaml and pal.yaml) on a
fabricated miniature of every dataset they list, each in its distribution's real on-disk
format (the adapter tests' miniatures: tests/test_data_benchmarks.py,
test_data_scene_parsing.py, test_data_voc.py; Karpathy's JSON here), laid out where the
configs' paths point (``data/...`` under the working directory).

- unmodified, its dry run plans the jobs its datasets, encoder pairs, methods and layer
  choices imply (``expected_jobs``; README "Reproducing the papers" states the counts);
- overlaid with only smaller grid sizes, epochs and models (and the CPU: no GPU in tests),
  and one evaluation dataset per source, it runs to the tables: the same sources, poolings,
  methods, protocol options and a timm DINOv2-family ViT at its fixed native 518 px, random
  init; a tiny RoBERTa-family text model built here from a local config.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import yaml
from PIL import Image
from test_data_benchmarks import TREES
from test_data_scene_parsing import ade_tree, context_tree
from test_data_voc import palette_png
from test_workflow import planned_jobs, snakemake

from pipeline.evaluate.tables import read_metrics

ROOT = Path(__file__).resolve().parent.parent
STRUCTURE = ROOT / "workflow/configs/structure.yaml"
PAL = ROOT / "workflow/configs/pal.yaml"
pytestmark = pytest.mark.slow

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
THINGS = ["dog", "cat", "bus", "boat", "chair", "person", "bottle", "bird"]
PLACES = ["on a street", "near a lake", "in a room", "on the grass", "by a window"]
COCO_SPLITS = {"train": 16, "restval": 4, "val": 6, "test": 10}
FLICKR_SPLITS = {"train": 4, "val": 2, "test": 8}
VOC_VAL = 4
KARPATHY = ("coco_karpathy", "flickr30k_karpathy")
SEGMENTATION = ("voc_segmentation", "pascal_context", "ade20k")
TASK_KIND = {"benchmark": "classification"} | dict.fromkeys(KARPATHY, "retrieval")
TASK_KIND |= dict.fromkeys(SEGMENTATION, "segmentation")
TOKEN_ALIGNERS = {"pal"}
PATH_KEYS = ("karpathy_json", "image_root", "root", "context")


def caption(rng: np.random.Generator) -> str:
    return (
        f"a {rng.choice(COLOURS)} {rng.choice(THINGS)} {rng.choice(PLACES)} "
        f"next to {rng.integers(1, 5)} {rng.choice(THINGS)}s"
    )


def photo(path: Path, rng: np.random.Generator, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def karpathy_entries(splits: dict[str, int], rng, coco: bool) -> list[dict]:
    entries, sentid = [], 0
    for split, count in splits.items():
        for _ in range(count):
            i = len(entries)
            sentences = []
            for _ in range(5):
                sentences.append({"raw": caption(rng), "sentid": sentid, "tokens": []})
                sentid += 1
            entry = {"imgid": i, "split": split, "sentences": sentences}
            if coco:
                folder = "train2014" if split in ("train", "restval") else "val2014"
                cocoid = 100 + i
                entry |= {
                    "filepath": folder,
                    "filename": f"COCO_{folder}_{cocoid:012d}.jpg",
                    "cocoid": cocoid,
                }
            else:
                entry["filename"] = f"{1000 + i}.jpg"
            entries.append(entry)
    return entries


def karpathy(spec: dict, rng: np.random.Generator) -> None:
    coco = spec["source"] == "coco_karpathy"
    entries = karpathy_entries(COCO_SPLITS if coco else FLICKR_SPLITS, rng, coco=coco)
    for entry in entries:
        photo(Path(spec["image_root"], entry.get("filepath", ""), entry["filename"]), rng)
    Path(spec["karpathy_json"]).write_text(json.dumps({"images": entries}))


def voc(spec: dict, rng: np.random.Generator) -> None:
    root = Path(spec["root"])
    names = [f"2008_{k:06d}" for k in range(VOC_VAL)]
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{n}\n" for n in names))
    for k, name in enumerate(names):
        photo(root / "JPEGImages" / f"{name}.jpg", rng, size=(45, 33))
        labels = np.zeros((33, 45), dtype=np.uint8)
        labels[5:25, 10:30] = 1 + k  # an object of class 1 + k on background
        labels[4, :] = 255  # VOC's ignored border
        palette_png(root / "SegmentationClass" / f"{name}.png", labels)


def benchmark(spec: dict, rng: np.random.Generator) -> None:
    Path(spec["root"]).mkdir(parents=True, exist_ok=True)  # torchvision's root, shared
    TREES[spec["dataset"]](Path(spec["root"]))


FABRICATE = {
    **dict.fromkeys(KARPATHY, karpathy),
    "benchmark": benchmark,
    "voc_segmentation": voc,
    "pascal_context": lambda spec, rng: context_tree(
        Path(spec["root"]).parent, voc=Path(spec["root"]), context=Path(spec["context"])
    ),
    "ade20k": lambda spec, rng: ade_tree(Path(spec["root"]).parent),
}


def reproduction_datasets(configfiles: tuple[Path, ...] = (STRUCTURE, PAL)) -> dict[str, dict]:
    """The datasets the configs list, by name (a name means the same data in every config)."""
    datasets: dict[str, dict] = {}
    for configfile in configfiles:
        for name, spec in yaml.safe_load(configfile.read_text())["datasets"].items():
            assert datasets.setdefault(name, spec) == spec, f"{name} differs between configs"
    return datasets


def fabricate_paper_data(workdir: Path) -> None:
    """Every dataset the reproduction configs list, in its real on-disk format, where its
    paths point (relative to ``workdir``)."""
    rng = np.random.default_rng(0)
    for spec in reproduction_datasets().values():
        relative = {k: str(workdir / v) if k in PATH_KEYS else v for k, v in spec.items()}
        FABRICATE[spec["source"]](relative, rng)


def paper_captions(workdir: Path) -> list[str]:
    """Every caption of the configs' fabricated Karpathy JSONs under ``workdir``."""
    return [
        sentence["raw"]
        for spec in reproduction_datasets().values()
        if spec["source"] in KARPATHY
        for entry in json.loads((workdir / spec["karpathy_json"]).read_text())["images"]
        for sentence in entry["sentences"]
    ]


def tiny_roberta(folder: Path, texts: list[str]) -> None:
    """A RoBERTa-family model (byte-level BPE trained here on ``texts``), random weights."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaModel

    roles = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>"}
    roles |= {"unk_token": "<unk>", "mask_token": "<mask>"}
    specials = list(roles.values())  # ids 0..4 in this order
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=1, special_tokens=specials)
    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        **roles,
    )
    tokenizer.save_pretrained(folder)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=80,  # 77 tokens + RoBERTa's padding offset
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        type_vocab_size=1,
    )
    torch.manual_seed(0)
    RobertaModel(config, add_pooling_layer=False).save_pretrained(folder)


def scaled_down(paper: dict, text_model: Path) -> dict:
    """The config with smaller grid sizes, epochs and models, on the CPU, and of its
    evaluation datasets the first of each source (the test suite's and CI's time: every
    listed dataset is planned by the dry run and read by its adapter test); nothing else."""
    config = copy.deepcopy(paper)
    config["runtime"] = {**config["runtime"], "device": "cpu", "precision": "float32"}
    config["runtime"] |= {"batch_size": 16, "num_workers": 0}
    for spec in config["encoders"].values():
        if spec["source"] == "timm":
            spec |= {
                "name": "vit_small_patch14_dinov2.lvd142m",  # same family, fixed input of 518 px
                "pretrained": False,
                "init_seed": 0,
                # LayerScale off: random DINOv2 blocks start as the identity to 1e-5
                # (init_values), so every image would get the same class token
                "model_kwargs": {
                    **spec.get("model_kwargs", {}),
                    **{"depth": 2, "embed_dim": 32, "num_heads": 2, "init_values": None},
                },
            }
        elif spec["source"] == "huggingface":  # the tiny model's 77 positions, not RoBERTa's 512
            spec |= {"name": str(text_model), "max_tokens": 77}
    experiment = config["experiment"]
    firsts: dict[str, dict] = {}
    for ref in experiment["evaluate"]:
        firsts.setdefault(config["datasets"][ref["dataset"]]["source"], ref)
    experiment["evaluate"] = list(firsts.values())
    used = {ref["dataset"] for ref in (experiment["train"], experiment["val"], *firsts.values())}
    config["datasets"] = {
        name: config["datasets"][name] for name in config["datasets"] if name in used
    }
    align = config["align"]
    align["n_pairs"] = [8, "full"]
    align["seeds"] = align["seeds"][:2]
    align["threads"] = 1
    for spec in align["methods"].values():
        if "max_epochs" in spec:
            spec |= {"max_epochs": 2, "patience": 1}
        if spec["aligner"] in ("linear", "mlp"):
            spec["dim"] = 16
        if spec["aligner"] == "mlp":
            spec["hidden"] = 32
        if spec["aligner"] == "pal":
            spec["anchors"] = 16
    return config


def expected_jobs(config: dict[str, Any]) -> dict[str, int]:
    """The jobs per rule a config implies, counted from it: one preparation per dataset
    referenced; per encoder pair, a feature store of each encoder on every paired split
    (train, val, each evaluation split: a part a dataset lacks, such as a classification
    set's captions, is an empty store: which parts exist is known only once the data is
    prepared) and of the text encoder on each evaluation dataset's prompts; the same token
    sets when a method is a token aligner (PAL), else the vision tokens of segmentation
    splits only; one layer comparison per pair; one fit and one evaluation per pair, method
    and layer choice. Grid sizes, seeds and layers are runs inside those jobs, not jobs."""
    datasets, exp = config["datasets"], config["experiment"]
    refs = [exp["train"], exp["val"], *exp["evaluate"]]
    splits = {(ref["dataset"], ref["split"]) for ref in refs}
    evaluated = {ref["dataset"] for ref in exp["evaluate"]}
    segmentation = {
        (ref["dataset"], ref["split"])
        for ref in exp["evaluate"]
        if datasets[ref["dataset"]]["source"] in SEGMENTATION
    }
    pairs = {(pair["vision"], pair["text"]) for pair in exp["pairs"]}
    vision = {v for v, _ in pairs}
    text = {t for _, t in pairs}
    stores = len(splits) * len(vision | text) + len(evaluated) * len(text)
    methods = config["align"]["methods"].values()
    tokens = any(m["aligner"] in TOKEN_ALIGNERS for m in methods)
    runs = len(pairs) * len(config["align"]["methods"]) * len(config["align"]["layer_choices"])
    counts = {
        "prepare_dataset": len({ref["dataset"] for ref in refs}),
        "extract_features": stores,
        "extract_tokens": stores if tokens else len(segmentation) * len(vision),
        "compare_layers": len(pairs),
        "fit_aligners": runs,
        "evaluate_aligners": runs,
        "aggregate": 1,
        "publish": 1,
        "all": 1,
    }
    return {rule: n for rule, n in counts.items() if n}  # a dry run lists rules with jobs


@pytest.fixture(scope="module")
def paper_tree(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("paper")
    fabricate_paper_data(workdir)
    return workdir


# Each paper's benchmarks, by the config's dataset names: STRUCTURE's 24 (COCO and Flickr30k
# retrieval, 22 zero-shot classification sets: its authors' list without Kinetics700, Hateful
# Memes, CLEVR and Rendered SST2) and PAL's 10 (the same retrieval, five of those sets, three
# segmentation sets), each listed by its own config.
STRUCTURE_BENCHMARKS = {
    "coco", "flickr30k", "stl10", "caltech101", "food101", "cifar10", "cifar100", "imagenet",
    "ucf101", "sun397", "eurosat", "resisc45", "mnist", "dtd", "gtsrb", "kitti", "country211",
    "fer2013", "pcam", "birdsnap", "cars", "fgvc_aircraft", "pets", "flowers",
}  # fmt: skip
PAL_BENCHMARKS = {
    "coco", "flickr30k", "stl10", "cifar100", "caltech101", "dtd", "eurosat", "voc2012",
    "pascal_context", "ade20k",
}  # fmt: skip
REPRODUCTIONS = {STRUCTURE: STRUCTURE_BENCHMARKS, PAL: PAL_BENCHMARKS}


@pytest.mark.parametrize("configfile", sorted(REPRODUCTIONS), ids=lambda path: path.name)
def test_a_reproduction_config_evaluates_every_benchmark_of_its_papers(configfile) -> None:
    config = yaml.safe_load(configfile.read_text())
    datasets = config["datasets"]
    evaluated = [ref["dataset"] for ref in config["experiment"]["evaluate"]]
    assert sorted(evaluated) == sorted(REPRODUCTIONS[configfile])  # each once
    kinds = {name: TASK_KIND[datasets[name]["source"]] for name in evaluated}
    assert {n for n, kind in kinds.items() if kind == "retrieval"} == {"coco", "flickr30k"}
    for name, spec in datasets.items():  # a benchmark is the set its name says
        if spec["source"] == "benchmark":
            assert spec["dataset"] == {"imagenet": "imagenet1k"}.get(name, name)
    assert len(STRUCTURE_BENCHMARKS) == 24 and len(PAL_BENCHMARKS) == 10


@pytest.mark.parametrize("configfile", sorted(REPRODUCTIONS), ids=lambda path: path.name)
def test_an_unmodified_reproduction_config_plans_the_expected_jobs(paper_tree, configfile):
    planned = planned_jobs(paper_tree, configfile=configfile)
    assert planned == expected_jobs(yaml.safe_load(configfile.read_text()))
    print(f"\n{configfile.name} plans {sum(planned.values())} jobs: {planned}")


def test_sharded_extraction_adds_shard_jobs_for_every_split_store(paper_tree, tmp_path):
    """runtime.extract_shards = 4 (the PAL config: feature stores and token sets): the
    feature stores and the token sets of dataset splits (not those of prompts) are each written
    by 4 shard jobs; every store and set keeps its own (completing) job."""
    config = yaml.safe_load(PAL.read_text())
    config["runtime"]["extract_shards"] = 4
    sharded = tmp_path / "pal_sharded.yaml"
    sharded.write_text(yaml.safe_dump(config))
    expected = expected_jobs(config)
    prompts = len({ref["dataset"] for ref in config["experiment"]["evaluate"]})
    assert planned_jobs(paper_tree, configfile=sharded) == {
        **expected,
        "extract_features_shard": (expected["extract_features"] - prompts) * 4,
        "extract_tokens_shard": (expected["extract_tokens"] - prompts) * 4,
    }


@pytest.fixture(scope="module")
def scaled_runs(paper_tree, tmp_path_factory) -> dict[str, tuple[dict, Any, pl.DataFrame | None]]:
    """Both scaled-down configs run one after the other in one working directory, PAL's first,
    as someone reproducing both papers would: the same encoders and training data, so the
    second finds the datasets and stores it shares with the first. By config file name: the
    scaled config, the run's result and the metrics table it published (None if it failed)."""
    workdir = tmp_path_factory.mktemp("scaled")
    (workdir / "data").symlink_to(paper_tree / "data")
    tiny_roberta(workdir / "roberta", paper_captions(paper_tree))
    runs = {}
    for configfile in (PAL, STRUCTURE):
        config = scaled_down(yaml.safe_load(configfile.read_text()), workdir / "roberta")
        (workdir / f"scaled_{configfile.name}").write_text(yaml.safe_dump(config))
        result = snakemake(workdir, configfile=workdir / f"scaled_{configfile.name}")
        table = workdir / "results" / "tables" / "metrics.parquet"
        runs[configfile.name] = (
            config,
            result,
            read_metrics(table) if result.returncode == 0 else None,
        )
    return runs


@pytest.mark.parametrize("configfile", sorted(REPRODUCTIONS), ids=lambda path: path.name)
def test_a_scaled_down_reproduction_config_runs_to_the_tables(scaled_runs, configfile):
    paper = yaml.safe_load(configfile.read_text())
    config, result, metrics = scaled_runs[configfile.name]
    assert result.returncode == 0, result.output[-6000:]
    assert set(metrics["method"].unique()) == set(paper["align"]["methods"])
    tasks = {
        (task.split(".")[0], kind)
        for task, kind in metrics.select("task", "task_kind").unique().rows()
    }
    sources = {
        config["datasets"][ref["dataset"]]["source"] for ref in config["experiment"]["evaluate"]
    }
    listed = {
        paper["datasets"][ref["dataset"]]["source"] for ref in paper["experiment"]["evaluate"]
    }
    assert sources == listed  # every kind of source the config reads
    assert tasks == {
        (ref["dataset"], TASK_KIND[config["datasets"][ref["dataset"]]["source"]])
        for ref in config["experiment"]["evaluate"]
    }
    # the authors' training set: the first caption of each Karpathy train image, restval out
    full = COCO_SPLITS["train"]
    assert set(metrics["n_pairs"].unique()) == {8, full}
    assert metrics.filter(pl.col("metric").is_null() | pl.col("value").is_nan()).is_empty()


def test_the_second_config_reuses_the_stores_the_first_made(scaled_runs):
    """STRUCTURE's scaled run after PAL's: the datasets and the text encoder's stores it reads
    were made by PAL's run (the same data and text model), so it prepares and encodes none of
    them again; the vision stores are its own (PAL feeds DINOv2 224 px, STRUCTURE 518 px)."""
    _, result, _ = scaled_runs[STRUCTURE.name]
    assert result.returncode == 0, result.output[-3000:]
    assert "rule prepare_dataset:" not in result.output
    written = re.findall(r"^\s+output: (.*)$", result.output, re.MULTILINE)
    stores = [path for path in written if "/features/" in path]
    assert stores and all("dinov2_vitl14" in path for path in stores), stores


def test_the_two_configs_cover_every_kind_of_source():
    """Between them the scaled-down runs read every adapter kind of the papers' benchmarks."""
    sources = {spec["source"] for spec in reproduction_datasets().values()}
    assert sources == set(TASK_KIND)
