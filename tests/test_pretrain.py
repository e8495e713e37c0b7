"""Self-supervised pretraining: settings, views, the loss, determinism, the weights' round trip
through the encoder registry, and a probe that improves on a tiny budget."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline import jobs, layout
from pipeline.config import ConfigError, load_config, validate_config
from pipeline.data import synthetic
from pipeline.encoders import build_encoder
from pipeline.pretrain import PretrainSpecError, initial_spec, parse_settings, pretrained_spec
from pipeline.pretrain.simclr import SATURATION, nt_xent, object_view, run_pretrain
from pipeline.probe import probe_layers

ROOT = Path(__file__).resolve().parent.parent
DATASET = {
    "source": "synthetic",
    "seed": 3,
    "image_size": 32,
    "splits": {"train": 8, "test": 8},
    "captions_per_image": 1,
}
TINY = {  # a two-block ViT on 32 px images, 8 x 8 patches of 4 px
    "source": "timm",
    "name": "vit_tiny_patch16_224",
    "pooling": "cls",
    "image_size": 32,
    "model_kwargs": {"img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2},
}


def tiny_encoder(**pretrain) -> dict:
    block = {"dataset": "shapes", "images": 64, "steps": 3, "batch_size": 8, **pretrain}
    return {**TINY, "pretrain": block}


@pytest.mark.parametrize(
    ("block", "key"),
    [
        ({"dataset": "shapes", "steps": 0}, "steps"),
        ({"dataset": "shapes", "lr": -1.0}, "lr"),
        ({"dataset": "shapes", "batch_size": 1}, "batch_size"),
        ({"dataset": "shapes", "temperature": True}, "temperature"),
        ({"dataset": "shapes", "colour_jitter": 1}, "colour_jitter"),
        ({"steps": 3}, "dataset"),
    ],
)
def test_bad_settings_name_the_encoder_and_key(block: dict, key: str) -> None:
    with pytest.raises(PretrainSpecError, match=f"encoder 'vit'.*'{key}'"):
        parse_settings("vit", block)


def test_initial_spec_is_a_seeded_random_init_and_the_pretrained_spec_loads_weights() -> None:
    spec = tiny_encoder(seed=7)
    assert initial_spec(spec) == {**TINY, "pretrained": False, "init_seed": 7}
    loaded = pretrained_spec({**spec, "pretrained": True}, "w.safetensors")
    assert loaded["weights"] == "w.safetensors" and loaded["pretrain"] == spec["pretrain"]
    assert "pretrained" not in loaded and "init_seed" not in loaded


def test_a_view_keeps_every_object_pixel_and_repaints_the_background() -> None:
    spec = synthetic.normalize_spec("shapes", {**DATASET, "image_size": 64})
    holdout = synthetic.holdout_combinations(spec["seed"], spec["holdout_combinations"])
    rng = np.random.default_rng(0)
    for index in range(20):
        image = synthetic.unpaired_image(spec, "pretrain", index, holdout)
        view = object_view(image, rng)
        objects = lambda x: x.max(axis=2).astype(int) - x.min(axis=2) > SATURATION  # noqa: E731
        # the same colours on (at most, when objects overlap) as many pixels; grey elsewhere
        assert objects(view).sum() <= objects(image).sum()
        assert objects(view).sum() >= 0.6 * objects(image).sum()
        assert {tuple(p) for p in view[objects(view)]} == {tuple(p) for p in image[objects(image)]}
        grey = view[~objects(view)].astype(int)
        assert np.all(grey.max(axis=1) - grey.min(axis=1) <= SATURATION)


def test_nt_xent_equals_the_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)
    z = torch.nn.functional.normalize(torch.cat([z1, z2]), dim=1).double()
    total = 0.0
    for i in range(10):
        twin = (i + 5) % 10
        others = [math.exp(float(z[i] @ z[j]) / 0.2) for j in range(10) if j != i]
        total -= math.log(math.exp(float(z[i] @ z[twin]) / 0.2) / sum(others))
    assert float(nt_xent(z1, z2, 0.2)) == pytest.approx(total / 10, rel=1e-5)


def test_pretraining_is_deterministic_and_its_weights_round_trip(tmp_path) -> None:
    spec = tiny_encoder()
    paths = []
    for run in ("a", "b"):
        weights, record = tmp_path / f"{run}.safetensors", tmp_path / f"{run}.json"
        run_pretrain("vit", spec, DATASET, weights, record, threads=1)
        paths.append(weights)
    first, second = load_file(paths[0]), load_file(paths[1])
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    record = json.loads((tmp_path / "a.json").read_text())
    assert len(record["losses"]) == 3 and record["image_passes"] == 48
    assert (
        record["weights_sha256"]
        == build_encoder("vit", pretrained_spec(spec, paths[0])).provenance()["weights_sha256"]
    )
    # the registry loads exactly the trained tensors, and they differ from the init
    loaded = build_encoder("vit", pretrained_spec(spec, paths[0])).model.state_dict()
    init = build_encoder("vit", initial_spec(spec)).model.state_dict()
    assert all(torch.equal(loaded[key], first[key]) for key in first)
    assert not torch.equal(loaded["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"])


def test_a_tiny_budget_lowers_the_contrastive_loss(tmp_path) -> None:
    """Sixty steps bring the training loss well below its start (ln 63 for 32 images, two
    views each). What pretraining buys downstream is measured by benchmarks/bench_probe.py:
    on this tiny model, matching held-out views to their twins is no better than at init
    (0.09-0.13 against 0.11 on 256 images, depending on the budget), so it is not asserted."""
    spec = tiny_encoder(images=256, steps=60, batch_size=32, lr=5e-4)
    run_pretrain("vit", spec, DATASET, tmp_path / "w.safetensors", tmp_path / "w.json", threads=1)
    losses = json.loads((tmp_path / "w.json").read_text())["losses"]
    assert losses[0] == pytest.approx(math.log(63), abs=0.1)
    assert np.mean(losses[-10:]) < 0.8 * losses[0], losses


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda e: e["pretrain"].update(steps=0), r"encoders\.vit_tiny\.pretrain\.steps"),
        (lambda e: e["pretrain"].update(dataset="nope"), r"encoders\.vit_tiny\.pretrain'.*nope"),
        (lambda e: e.update(weights="w.safetensors"), r"encoders\.vit_tiny\.pretrain'.*weights"),
    ],
)
def test_config_errors_name_the_pretrain_key(edit, message: str) -> None:
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    edit(config["encoders"]["vit_tiny"])
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_extraction_of_a_pretrained_encoder_waits_for_and_loads_its_weights() -> None:
    config = load_config(ROOT / "config.yaml")
    pretrain = jobs.pretrain_encoder(config, "vit_tiny")
    weights = layout.pretrained_weights("vit_tiny")
    assert pretrain.outputs == {"weights": weights, "record": layout.pretrain_record("vit_tiny")}
    assert pretrain.spec["dataset"] == config["datasets"]["shapes"]
    for job in (
        jobs.extract_features(config, "shapes", "test", "vit_tiny"),
        jobs.extract_tokens(config, "shapes", "test", "vit_tiny"),
    ):
        assert job.input("weights") == weights
        assert job.spec["encoder"]["weights"] == weights
        assert job.spec["encoder"]["pretrain"] == config["encoders"]["vit_tiny"]["pretrain"]
    assert "weights" not in jobs.extract_features(config, "shapes", "test", "minilm").inputs
    with pytest.raises(KeyError):
        jobs.pretrain_encoder(config, "minilm")


def test_probes_score_a_linearly_coded_layer_high_and_a_noise_layer_at_chance() -> None:
    rng = np.random.default_rng(0)
    labels = {"shape": rng.integers(0, 4, size=600)}
    coded = np.eye(4)[labels["shape"]] * 3.0 + rng.normal(size=(600, 4)) * 0.3
    noise = rng.normal(size=(600, 4))
    train = ([coded[:400], noise[:400]], {"shape": labels["shape"][:400]})
    test = ([coded[400:], noise[400:]], {"shape": labels["shape"][400:]})
    table = probe_layers(train, test, ("shape",))
    assert table["layer"].to_list() == [0, 1] and table["attribute"].to_list() == ["shape"] * 2
    coded_accuracy, noise_accuracy = table["accuracy"].to_list()
    assert coded_accuracy > 0.95 and noise_accuracy < 0.45  # chance is 0.25
