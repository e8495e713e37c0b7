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
from scipy import ndimage

from pipeline import jobs, layout
from pipeline.config import ConfigError, load_config, validate_config
from pipeline.data import synthetic
from pipeline.encoders import build_encoder
from pipeline.pretrain import PretrainSpecError, initial_spec, parse_settings, pretrained_spec
from pipeline.pretrain.simclr import SATURATION, nt_xent, object_view, run_pretrain

ROOT = Path(__file__).resolve().parent.parent
DATASET = {
    "source": "synthetic",
    "seed": 3,
    "image_size": 32,
    "splits": {"train": 8, "test": 8},
    "captions_per_image": 1,
}
TINY = {  # the default's architecture, smaller: a ResNet stem (stride 4), 2 x 2 patches of
    # its features (8 px tokens: a 4 x 4 grid on 32 px images), then two 32-wide blocks
    "source": "timm",
    "name": "vit_tiny_r_s16_p8_224",
    "pooling": "cls",
    "image_size": 32,
    "model_kwargs": {"img_size": 32, "patch_size": 2, "depth": 2, "embed_dim": 32, "num_heads": 2},
}


def tiny_encoder(**pretrain) -> dict:
    block = {"dataset": "shapes", "images": 64, "steps": 3, "batch_size": 8}
    return {**TINY, "pretrain": {**block, "recolour": 0.5, "rescale": 1.4, **pretrain}}


@pytest.mark.parametrize(
    ("block", "key"),
    [
        ({"dataset": "shapes", "steps": 0}, "steps"),
        ({"dataset": "shapes", "lr": -1.0}, "lr"),
        ({"dataset": "shapes", "batch_size": 1}, "batch_size"),
        ({"dataset": "shapes", "temperature": True}, "temperature"),
        ({"dataset": "shapes", "colour_jitter": 1}, "colour_jitter"),
        ({"dataset": "shapes", "recolour": 1.5}, "recolour"),
        ({"dataset": "shapes", "rescale": 0.5}, "rescale"),
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


def objects_of(image: np.ndarray) -> np.ndarray:
    return image.max(axis=2).astype(int) - image.min(axis=2) > SATURATION


def components(mask: np.ndarray) -> list[np.ndarray]:
    """The bool crops of the 4-connected components of ``mask``, largest first."""
    labels, _ = ndimage.label(mask)
    crops = [labels[box] == k for k, box in enumerate(ndimage.find_objects(labels), start=1)]
    return sorted(crops, key=lambda crop: -crop.sum())


@pytest.fixture(scope="module")
def unpaired() -> list[np.ndarray]:
    spec = synthetic.normalize_spec("shapes", {**DATASET, "image_size": 64})
    holdout = synthetic.holdout_combinations(spec["seed"], spec["holdout_combinations"])
    return [synthetic.unpaired_image(spec, "pretrain", index, holdout) for index in range(40)]


def test_a_view_moves_the_objects_and_repaints_the_background(unpaired) -> None:
    rng = np.random.default_rng(0)
    for image in unpaired:
        view = object_view(image, rng)
        mask = objects_of(view)
        before, after = components(objects_of(image)), components(mask)
        assert len(after) == len(before)  # the count is kept: objects never touch
        if mask.sum() == objects_of(image).sum():  # not shrunk to fit: the very same objects
            assert all(np.array_equal(a, b) for a, b in zip(after, before, strict=True))
        assert {tuple(p) for p in view[mask]} == {tuple(p) for p in image[objects_of(image)]}
        grey = view[~mask].astype(int)
        assert np.all(grey.max(axis=1) - grey.min(axis=1) <= SATURATION)
        assert not np.array_equal(view, image)


def test_a_recoloured_rescaled_view_keeps_count_and_scales_every_object_alike(unpaired) -> None:
    rng = np.random.default_rng(1)
    colours, scales = set(), []
    for image in unpaired:
        view = object_view(image, rng, recolour=True, rescale=1.4)
        mask = objects_of(view)
        before, after = components(objects_of(image)), components(mask)
        assert len(after) == len(before)
        painted = {tuple(p) for p in view[mask]}
        assert len(painted) == 1  # one colour for every object of the view
        colours |= painted
        ratios = [a.shape[0] / b.shape[0] for a, b in zip(after, before, strict=True)]
        assert max(ratios) - min(ratios) < 0.15  # one scale (up to rounding) for all
        scales.append(np.mean(ratios))
    assert len(colours) > 30  # a fresh random colour each time
    assert 1 / 1.4 - 0.05 <= np.median(scales) <= 1.4 and min(scales) < 0.9 < 1.1 < max(scales)


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
    # the same bytes, so the same SHA-256 in the record and in every store made from them
    assert paths[0].read_bytes() == paths[1].read_bytes()
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


def test_a_tiny_budget_lowers_the_loss_and_recoloured_rescaled_views_are_harder(tmp_path) -> None:
    """Sixty steps bring the training loss well below its start (ln 63 for 32 images, two
    views each). Views that repaint and rescale the objects leave only shape and count to
    tell images apart, so the same budget lowers their loss less. What pretraining buys
    downstream is measured by benchmarks/bench_probe.py (docs/pretrain.md), not here."""
    final = {}
    for name, views in (("plain", {"recolour": 0.0, "rescale": 1.0}), ("default", {})):
        spec = tiny_encoder(images=256, steps=60, batch_size=32, lr=2e-3, **views)
        weights, record = tmp_path / f"{name}.safetensors", tmp_path / f"{name}.json"
        run_pretrain("vit", spec, DATASET, weights, record, threads=1)
        losses = json.loads(record.read_text())["losses"]
        assert losses[0] == pytest.approx(math.log(63), abs=0.1)
        final[name] = float(np.mean(losses[-10:]))
    assert final["plain"] < 0.8 * math.log(63), final
    assert final["plain"] + 0.5 < final["default"] < math.log(63) - 0.15, final


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
