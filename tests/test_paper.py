"""The paper configuration (workflow/configs/paper.yaml) on a fabricated miniature of its data:
COCO and Flickr30k in Karpathy's format, an ImageNet-style class folder and a VOC2012 tree,
laid out where the config's paths point (``data/...`` under the working directory).

- unmodified, its dry run plans the expected jobs (the counts README's "Reproducing the
  paper" states);
- overlaid with only smaller grid sizes, epochs and models (and the CPU: no GPU in tests), it
  runs to the tables: the same sources, poolings, methods, protocol options and a timm
  DINOv2-family ViT at its fixed native 518 px, random init; a tiny RoBERTa-family text model
  built here from a local config.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from PIL import Image
from test_data_voc import palette_png
from test_workflow import planned_jobs, snakemake

from pipeline.evaluate.tables import read_metrics

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "workflow/configs/paper.yaml"
pytestmark = pytest.mark.slow

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]
THINGS = ["dog", "cat", "bus", "boat", "chair", "person", "bottle", "bird"]
PLACES = ["on a street", "near a lake", "in a room", "on the grass", "by a window"]
COCO_SPLITS = {"train": 16, "restval": 4, "val": 6, "test": 10}
FLICKR_SPLITS = {"train": 4, "val": 2, "test": 8}
IMAGENET_CLASSES = {"n01440764": "tench", "n02102040": "English springer", "n03000684": "chainsaw"}
VOC_VAL = 4


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


def fabricate_paper_data(workdir: Path) -> None:
    """Every file paper.yaml names, in the real on-disk formats, under ``workdir/data``."""
    rng = np.random.default_rng(0)
    data = workdir / "data"
    coco = karpathy_entries(COCO_SPLITS, rng, coco=True)
    for entry in coco:
        photo(data / "coco" / entry["filepath"] / entry["filename"], rng)
    (data / "coco" / "dataset_coco.json").write_text(json.dumps({"images": coco}))
    flickr = karpathy_entries(FLICKR_SPLITS, rng, coco=False)
    for entry in flickr:
        photo(data / "flickr30k" / "flickr30k-images" / entry["filename"], rng)
    (data / "flickr30k" / "dataset_flickr30k.json").write_text(json.dumps({"images": flickr}))
    imagenet = data / "imagenet"
    for wnid in IMAGENET_CLASSES:
        for k in range(2):
            photo(imagenet / "val" / wnid / f"ILSVRC2012_val_{wnid}_{k}.JPEG", rng)
    (imagenet / "classnames.txt").write_text("\n".join(IMAGENET_CLASSES.values()) + "\n")
    (imagenet / "templates.txt").write_text("a photo of a {}.\na bad photo of the {}.\n")
    voc = data / "VOCdevkit" / "VOC2012"
    names = [f"2008_{k:06d}" for k in range(VOC_VAL)]
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("".join(f"{n}\n" for n in names))
    for k, name in enumerate(names):
        photo(voc / "JPEGImages" / f"{name}.jpg", rng, size=(45, 33))
        labels = np.zeros((33, 45), dtype=np.uint8)
        labels[5:25, 10:30] = 1 + k  # an object of class 1 + k on background
        labels[4, :] = 255  # VOC's ignored border
        palette_png(voc / "SegmentationClass" / f"{name}.png", labels)


def paper_captions(workdir: Path) -> list[str]:
    """Every caption of the fabricated COCO and Flickr30k JSONs under ``workdir/data``."""
    return [
        sentence["raw"]
        for name in ("coco/dataset_coco.json", "flickr30k/dataset_flickr30k.json")
        for entry in json.loads((workdir / "data" / name).read_text())["images"]
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
    """paper.yaml with smaller grid sizes, epochs and models, on the CPU; nothing else."""
    config = copy.deepcopy(paper)
    config["runtime"] = {**config["runtime"], "device": "cpu", "precision": "float32"}
    config["runtime"] |= {"batch_size": 16, "num_workers": 0}
    vision = config["encoders"]["dinov2_vitl14"]
    vision |= {
        "name": "vit_small_patch14_dinov2.lvd142m",  # same family, fixed input of 518 px
        "pretrained": False,
        "init_seed": 0,
        # LayerScale off: random DINOv2 blocks start as the identity to 1e-5 (init_values),
        # so every image would get the same class token
        "model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2, "init_values": None},
    }
    config["encoders"]["roberta_large"]["name"] = str(text_model)
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


# What the unmodified paper config plans (README, "Reproducing the paper"): 4 datasets; a
# pooled store and a token store of every split an aligner reads, for each encoder: images,
# captions and class prompts of each evaluate dataset (a part the dataset lacks, such as
# COCO's prompts or ImageNet's captions, is an empty store: which parts exist is known only
# once the data is prepared), COCO train and val; token stores hold only the chosen layers.
PAPER_JOBS = {
    "prepare_dataset": 4,
    "extract_features": 16,
    "extract_tokens": 16,
    "compare_layers": 1,
    "fit_aligners": 18,
    "evaluate_aligners": 18,
    "aggregate": 1,
    "publish": 1,
    "all": 1,
}


@pytest.fixture(scope="module")
def paper_tree(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("paper")
    fabricate_paper_data(workdir)
    return workdir


def test_the_unmodified_paper_config_plans_the_expected_jobs(paper_tree):
    assert planned_jobs(paper_tree, configfile=PAPER) == PAPER_JOBS


def test_sharded_extraction_adds_shard_jobs_for_every_split_store(paper_tree, tmp_path):
    """runtime.extract_shards = 4: the 12 feature stores and the 12 token sets of dataset
    splits (not the 4 of prompts each) are each written by 4 shard jobs; every store and set
    keeps its own (completing) job."""
    config = yaml.safe_load(PAPER.read_text())
    config["runtime"]["extract_shards"] = 4
    sharded = tmp_path / "paper_sharded.yaml"
    sharded.write_text(yaml.safe_dump(config))
    planned = planned_jobs(paper_tree, configfile=sharded)
    assert planned == {
        **PAPER_JOBS,
        "extract_features_shard": 12 * 4,
        "extract_tokens_shard": 12 * 4,
    }


def test_the_scaled_down_paper_config_runs_to_the_tables(paper_tree, tmp_path):
    paper = yaml.safe_load(PAPER.read_text())
    tiny_roberta(tmp_path / "roberta", paper_captions(paper_tree))
    config = scaled_down(paper, tmp_path / "roberta")
    (paper_tree / "scaled.yaml").write_text(yaml.safe_dump(config))
    result = snakemake(paper_tree, configfile=paper_tree / "scaled.yaml")
    assert result.returncode == 0, result.output[-6000:]

    metrics = read_metrics(paper_tree / "results" / "tables" / "metrics.parquet")
    methods = set(paper["align"]["methods"])
    assert set(metrics["method"].unique()) == methods
    tasks = {
        (task.split(".")[0], kind)
        for task, kind in metrics.select("task", "task_kind").unique().rows()
    }
    assert tasks == {
        ("coco", "retrieval"),
        ("flickr30k", "retrieval"),
        ("imagenet", "classification"),
        ("voc2012", "segmentation"),
    }
    # the authors' training set: the first caption of each Karpathy train image, restval out
    full = COCO_SPLITS["train"]
    assert set(metrics["n_pairs"].unique()) == {8, full}
    assert metrics.filter(pl.col("metric").is_null() | pl.col("value").is_nan()).is_empty()
