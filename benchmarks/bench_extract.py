"""Extraction overhead: (every layer pooled and written to Zarr) / (bare forward pass).

Both loops run on the same pre-collated batches, so the ratio isolates what extraction adds
to the model's own forward pass: reading every block, pooling, the copy to the host and the
Zarr writes. Repeats alternate between the two loops and the medians are compared.

    python benchmarks/bench_extract.py                      # default vision and text encoders
    python benchmarks/bench_extract.py --vit-large --device cuda --precision bfloat16 --n 4096
    python benchmarks/bench_extract.py --paper --device cuda --precision bfloat16 --n 4096

``--paper``: the paper config's shapes with random weights (nothing is downloaded): DINOv2
ViT-L/14 at its native 518 px (CLS) and a RoBERTa-large-sized text model (24 layers, 1024
wide, byte-level BPE trained here) at 77 tokens a caption (mean). Its samples/s are the
figures for the paper's GPU-time estimate.

Goal (issue 2): ratio <= 1.10 on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from pipeline.encoders import build_encoder
from pipeline.pretrain import initial_spec
from pipeline.stores.features import FeatureWriter

ROOT = Path(__file__).resolve().parent.parent
VIT_LARGE = {  # ViT-L/14 shape at 224 px (the CLIP vision tower), random weights
    "source": "timm",
    "name": "vit_large_patch14_clip_224",
    "pretrained": False,
    "init_seed": 0,
    "image_size": 224,
}
DINOV2_LARGE = {  # the paper config's vision encoder, random weights (LayerScale at timm's init)
    "source": "timm",
    "name": "vit_large_patch14_dinov2",
    "pretrained": False,
    "init_seed": 0,
    "pooling": "cls",
    "image_size": 518,
}
PAPER_TOKENS = 77
WORDS = ["a", "small", "red", "circle", "two", "large", "blue", "squares", "at", "the", "top"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def inputs(modality: str, n: int, image_size: int, long: bool = False) -> list:
    rng = np.random.default_rng(0)
    if modality == "vision":
        pixels = rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8)
        return [Image.fromarray(p) for p in pixels]
    words = [
        "a",
        "small",
        "red",
        "circle",
        "two",
        "large",
        "blue",
        "squares",
        "at",
        "the",
        "top",
        "left",
        "of",
        "a",
        "picture",
    ]
    if long:  # past 77 tokens, so every caption is cut to exactly 77
        return [" ".join(rng.choice(words, size=120)) for _ in range(n)]
    return [" ".join(rng.choice(words, size=rng.integers(6, 16))) for _ in range(n)]


def roberta_large_shaped(folder: Path) -> dict:
    """A RoBERTa-large-sized model (random weights, a byte-level BPE trained on the bench's
    words) saved to ``folder``; returns its encoder spec at 77 tokens."""
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaModel

    roles = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>"}
    roles |= {"unk_token": "<unk>", "mask_token": "<mask>"}
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        inputs("text", 512, 0), vocab_size=300, special_tokens=[*roles.values()]
    )
    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", 2), ("<s>", 0))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, **roles)
    tokenizer.save_pretrained(folder)
    config = RobertaConfig(
        vocab_size=50265,  # RoBERTa's: the embedding table as large as the real one
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        max_position_embeddings=514,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        type_vocab_size=1,
    )
    torch.manual_seed(0)
    RobertaModel(config, add_pooling_layer=False).save_pretrained(folder)
    return {
        "source": "huggingface",
        "name": str(folder),
        "pooling": "mean",
        "max_tokens": PAPER_TOKENS,
    }


def bare_forward(encoder, batch):
    if encoder.modality == "vision":
        return encoder.model.forward_features(batch["pixel_values"])
    return encoder.model(**batch)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_bare(encoder, batches, device, autocast) -> float:
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode(), autocast():
        for batch in batches:
            bare_forward(encoder, batch)
    sync(device)
    return time.perf_counter() - start


def time_extract(encoder, batches, device, autocast, out: Path) -> float:
    """Pool every layer, copy it to the host, and write it block by block to a fresh store."""
    n = sum(len(next(iter(b.values()))) for b in batches)
    sync(device)
    start = time.perf_counter()
    writer = FeatureWriter.create_or_resume(
        out,
        fingerprint="bench",
        sample_ids=[str(i) for i in range(n)],
        layer_names=encoder.layer_names,
        dims=encoder.dims,
        attrs={},
    )
    pooled: list[list[np.ndarray]] = [[] for _ in encoder.dims]
    with torch.inference_mode(), autocast():
        for batch in batches:
            for values, layer in zip(pooled, encoder.pooled_layers(batch), strict=True):
                values.append(layer.float().cpu().numpy())
    layers = [np.concatenate(values) for values in pooled]
    for block, first, stop in writer.pending_blocks():
        writer.write_block(block, [layer[first:stop] for layer in layers])
    writer.finalize()
    return time.perf_counter() - start


def bench(
    name: str,
    spec: dict,
    n: int,
    batch_size: int,
    device: torch.device,
    precision: str,
    repeats: int,
) -> None:
    encoder = build_encoder(name, spec).to(device)
    image_size = spec.get("image_size", 224)
    items = inputs(encoder.modality, n, image_size, long=spec.get("max_tokens") == PAPER_TOKENS)
    batches = [
        {k: v.to(device) for k, v in encoder.collate(items[i : i + batch_size]).items()}
        for i in range(0, n, batch_size)
    ]
    dtype = DTYPES[precision]

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    time_bare(encoder, batches[:1], device, autocast)  # warm-up
    bare, full = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            bare.append(time_bare(encoder, batches, device, autocast))
            full.append(time_extract(encoder, batches, device, autocast, Path(tmp) / f"{r}.zarr"))
    b, f = statistics.median(bare), statistics.median(full)
    print(
        f"{name:>10} {encoder.modality:>6} {len(encoder.dims):>2} layers  n={n} batch={batch_size} "
        f"{device.type}/{precision}: bare {n / b:8.1f} samples/s, extract {n / f:8.1f} samples/s, "
        f"ratio {f / b:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    parser.add_argument("--n", type=int, default=1024, help="samples per encoder")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=DTYPES, default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vit-large", action="store_true", help="only the ViT-L/14 at 224 px")
    parser.add_argument(
        "--paper", action="store_true", help="DINOv2 ViT-L/14 at 518 px, RoBERTa-large-sized text"
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    with tempfile.TemporaryDirectory() as models:
        if args.paper:
            encoders = {"dinov2_l14": DINOV2_LARGE, "roberta_l": roberta_large_shaped(Path(models))}
        elif args.vit_large:
            encoders = {"vit_l14": VIT_LARGE}
        else:
            config = yaml.safe_load(args.config.read_text())
            pair = config["experiment"]["pairs"][0]
            encoders = {role: config["encoders"][role] for role in (pair["vision"], pair["text"])}
            # an encoder pretrained by the pipeline: its architecture at its seeded init (the
            # cost of a forward pass does not depend on the weights)
            encoders = {
                name: initial_spec(spec) if "pretrain" in spec else spec
                for name, spec in encoders.items()
            }
        for name, spec in encoders.items():
            bench(name, spec, args.n, args.batch_size, device, args.precision, args.repeats)


if __name__ == "__main__":
    main()
