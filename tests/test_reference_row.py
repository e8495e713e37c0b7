"""The reference row: a randomly initialised tiny CLIP's two towers as encoders, scored with no
aligner (``aligner: none``), reproduce CLIP's own zero-shot logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.align.params import NoneParams
from pipeline.align.reference import IdentityAligner
from pipeline.encoders import EncoderSpecError, build_encoder, validate_encoder_spec

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2},
}
PROMPTS = ["a photo of a cat.", "a photo of a dog.", "a red square.", "noise"]


def tower(source: str) -> dict:
    return {"source": source, "name": "ViT-B-32", "init_seed": 3, "model_kwargs": TINY_CLIP}


def images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def towers():
    return build_encoder("v", tower("open_clip_vision")), build_encoder(
        "t", tower("open_clip_text")
    )


def test_no_aligner_scores_the_pair_as_clip_does(towers) -> None:
    vision, text = towers
    assert vision.layer_names == text.layer_names == ["embed"] and vision.dims == text.dims == [16]
    with torch.inference_mode():
        x = vision.pooled_layers(vision.collate(images(4)))[0].numpy()
        y = text.pooled_layers(text.collate(PROMPTS))[0].numpy()
        # CLIP's own forward: normalised towers and its temperature
        clip = vision.model  # both towers come from one seeded init: the same weights
        assert all(
            torch.equal(a, b)
            for a, b in zip(
                clip.state_dict().values(), text.model.state_dict().values(), strict=True
            )
        )
        pixels, ids = vision.collate(images(4))["pixel_values"], text.collate(PROMPTS)["input_ids"]
        image_features, text_features, scale = clip(pixels, ids)[:3]
        logits = (scale * image_features @ text_features.T).numpy()
    aligner = IdentityAligner(NoneParams())
    aligner.fit(x, y, None, None, seed=0)  # four (image, prompt) pairs
    scores = aligner.similarity(aligner.embed_image(x), aligner.embed_text(y))
    np.testing.assert_allclose(scores * float(scale), logits, rtol=1e-4, atol=1e-4)
    assert np.array_equal(scores.argmax(1), logits.argmax(1))
    restored = IdentityAligner(NoneParams())
    restored.load_state(aligner.state())
    np.testing.assert_array_equal(restored.embed_text(y), aligner.embed_text(y))


def test_no_aligner_refuses_a_pair_of_two_spaces() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"already-aligned pair.*16 wide, text features 8"):
        IdentityAligner(NoneParams()).fit(
            rng.normal(size=(4, 16)), rng.normal(size=(4, 8)), None, None, 0
        )


def test_open_clip_specs_are_checked_without_loading(towers) -> None:
    with pytest.raises(EncoderSpecError, match="'init_seed': is required for a random init"):
        validate_encoder_spec("v", {"source": "open_clip_vision", "name": "ViT-B-32"})
    with pytest.raises(EncoderSpecError, match="'weights': file not found"):
        validate_encoder_spec(
            "v", {"source": "open_clip_text", "name": "ViT-B-32", "weights": "nope.pt"}
        )
    with pytest.raises(EncoderSpecError, match="unknown key"):
        validate_encoder_spec("v", {**tower("open_clip_text"), "pooling": "mean"})
    validate_encoder_spec(
        "v", {"source": "open_clip_vision", "name": "ViT-B-32", "pretrained": "openai"}
    )
    encoder = towers[1]
    with pytest.raises(NotImplementedError, match="joint embedding only"):
        encoder.token_layers(encoder.collate(["a"]), [0])
