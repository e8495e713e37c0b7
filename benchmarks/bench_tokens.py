"""Token caches: bytes against PAL's reference layout, and extraction time against the bare
forward pass.

    python benchmarks/bench_tokens.py --parts bytes          # the default run's token sets
    python benchmarks/bench_tokens.py --parts time --n 2048  # token extraction / bare forward

Bytes. The reference layout is PAL's: float16, every caption padded to the dataset's longest,
each image once. Ours is float16 too (nothing lost), each image once, captions ragged (flat
tokens + offsets), shards zstd-compressed. Both are counted for the train split at every layer
the default run's token sets hold (``results/tokens``; without them, the last layers are
extracted into a temporary folder): logical bytes (tokens x width x 2, what a reader gets back)
and bytes on disk (every file of the store: shards, index arrays, metadata). The COCO
projection is arithmetic, not measured: ViT-L/14 at 224 px (257 tokens of width 1024, images
once) and RoBERTa-large (width 1024) over COCO train2014 (82,783 images, 414,113 captions),
with the captions' mean token count and the dataset's longest as arguments (defaults: 14.0,
a COCO caption's ~10.5 words in RoBERTa's BPE plus <s> and </s>, and 77, the paper config's
max_tokens); the default world's measured compression is shown separately, since random-weight
ViT tokens need not compress like a pretrained ViT's.

Time. Both loops run on the same pre-collated batches, as in bench_extract.py: the bare
forward (``forward_features`` / the text model's forward) against token extraction of the
chosen layers (the encoder's ``token_layers``, the copy to the host, and the stores' block
writes, ``extraction.Tokens``). Repeats alternate and medians are compared.
Goal (issue 10): ratio <= 1.10.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline import layout
from pipeline.encoders import build_encoder
from pipeline.extraction import Source, Tokens, extract
from pipeline.stores.tokens import TokenStore, TokenWriter, plan_blocks

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import DTYPES, VIT_LARGE, bare_forward, inputs, sync  # noqa: E402

COCO_IMAGES, COCO_CAPTIONS = 82_783, 414_113
VIT_L_TOKENS, WIDTH = 257, 1024
GB = 1e9

CPU_RUNTIME = {
    "device": "cpu",
    "precision": "float32",
    "batch_size": 128,
    "on_stale": "recompute",
    "num_workers": 0,
}


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def store_bytes(path: Path) -> dict[str, float]:
    store = TokenStore.open(path)
    itemsize = np.dtype(store.attrs["dtype"]).itemsize
    counts = store.token_count
    return {
        "n": store.n_samples,
        "tokens": int(counts.sum()),
        "longest": int(counts.max()) if len(counts) else 0,
        "dim": store.dim,
        "logical": int(counts.sum()) * store.dim * itemsize,
        "disk": disk_bytes(path),
        "reference": store.n_samples * (int(counts.max()) if len(counts) else 0) * store.dim * 2,
    }


def default_stores(config: dict, results: Path) -> dict[str, list[Path]]:
    """The train split's token stores of the first pair: the default run's, or extracted."""
    train = config["experiment"]["train"]
    pair = config["experiment"]["pairs"][0]
    found: dict[str, list[Path]] = {}
    for side in ("vision", "text"):
        directory = results.parent / layout.tokens_dir(train["dataset"], train["split"], pair[side])
        found[side] = sorted(directory.glob("layer_*.zarr")) if directory.is_dir() else []
    if all(found.values()):
        return found
    print("no token sets under results/: extracting the train split's last layers")
    tmp = Path(tempfile.mkdtemp())
    dataset = results / "datasets" / train["dataset"]
    for side in ("vision", "text"):
        name = pair[side]
        encoder = build_encoder(name, config["encoders"][name])
        last = len(encoder.layer_names) - 1
        source = Source(name, config["encoders"][name], dataset, train["split"], CPU_RUNTIME)
        found[side] = extract(
            Tokens({"dtype": "float16", "shard_mb": 64}), source, tmp / name, [last]
        )
    return found


def bytes_part(args: argparse.Namespace) -> None:
    config = yaml.safe_load(args.config.read_text())
    stores = default_stores(config, args.results)
    print("default world, train split, one store per chosen layer (float16):")
    print(
        f"  {'store':40s} {'samples':>8s} {'tokens':>8s} {'longest':>7s} {'ours (logical)':>15s} "
        f"{'ours (disk)':>12s} {'reference':>12s} {'disk/ref':>8s}"
    )
    totals = {"logical": 0, "disk": 0, "reference": 0}
    per_side: dict[str, dict] = {}
    for side, paths in stores.items():
        for path in paths:
            b = store_bytes(path)
            per_side.setdefault(side, b)
            for key in totals:
                totals[key] += b[key]
            print(
                f"  {side + ' ' + path.parent.name + '/' + path.name:40s} {b['n']:8d} "
                f"{b['tokens']:8d} {b['longest']:7d} {b['logical'] / 1e6:12.2f} MB "
                f"{b['disk'] / 1e6:9.2f} MB {b['reference'] / 1e6:9.2f} MB "
                f"{b['disk'] / b['reference']:8.3f}"
            )
    vision, text = per_side["vision"], per_side["text"]
    ours_pair = vision["logical"] + text["logical"]
    ref_pair = vision["reference"] + text["reference"]
    print(
        f"  per image {vision['logical'] / vision['n'] / 1e3:.1f} kB (both layouts); per caption: "
        f"ours {text['logical'] / text['n'] / 1e3:.2f} kB (mean {text['tokens'] / text['n']:.1f} "
        f"tokens), reference {text['reference'] / text['n'] / 1e3:.2f} kB "
        f"({text['longest']} tokens)"
    )
    print(
        f"  one (vision layer, text layer): ours {ours_pair / 1e6:.2f} MB logical, reference "
        f"{ref_pair / 1e6:.2f} MB: ratio {ours_pair / ref_pair:.3f}"
    )
    print(
        f"  every store above: ours {totals['disk'] / 1e6:.2f} MB on disk "
        f"({totals['logical'] / 1e6:.2f} MB logical), reference {totals['reference'] / 1e6:.2f} MB:"
        f" ratio {totals['disk'] / totals['reference']:.3f} on disk, "
        f"{totals['logical'] / totals['reference']:.3f} logical"
    )
    compression = {
        side: statistics.mean(
            disk_bytes(p) / store_bytes(p)["logical"] for p in paths if store_bytes(p)["logical"]
        )
        for side, paths in stores.items()
    }
    print(
        f"  zstd on disk / logical: vision {compression['vision']:.3f}, text "
        f"{compression['text']:.3f} (random-weight ViT, real MiniLM)"
    )

    mean, longest = args.coco_mean_tokens, args.coco_longest
    image_bytes = COCO_IMAGES * VIT_L_TOKENS * WIDTH * 2
    ours_text = COCO_CAPTIONS * mean * WIDTH * 2
    print(
        f"\nCOCO train2014 projection, ViT-L/14 @ 224 + RoBERTa-large, one layer each, float16 "
        f"(captions: mean {mean} tokens, longest {longest}):"
    )
    print(f"  images (both layouts)        {image_bytes / GB:7.1f} GB")
    for longest_case in sorted({longest, 50, 60, 77}):
        ref_text = COCO_CAPTIONS * longest_case * WIDTH * 2
        ref = image_bytes + ref_text
        ours = image_bytes + ours_text
        print(
            f"  longest {longest_case:3d}: reference {ref / GB:6.1f} GB (captions "
            f"{ref_text / GB:5.1f}), ours {ours / GB:6.1f} GB (captions {ours_text / GB:5.1f}):"
            f" ratio {ours / ref:.3f} uncompressed, {ours * compression['vision'] / ref:.3f} with"
            " the default world's vision compression"
        )


def time_part(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    if args.vit_large:
        encoders = {"vit_l14": (VIT_LARGE, args.layers or [23])}
    else:
        config = yaml.safe_load(args.config.read_text())
        pair = config["experiment"]["pairs"][0]
        encoders = {
            pair["vision"]: (config["encoders"][pair["vision"]], args.layers),
            pair["text"]: (config["encoders"][pair["text"]], args.layers),
        }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    for name, (spec, layers) in encoders.items():
        encoder = build_encoder(name, spec).to(device)
        chosen = layers or [len(encoder.layer_names) - 1]
        for layer_set in ([chosen[-1]], chosen) if len(chosen) > 1 else ([chosen[-1]],):
            bench_time(encoder, spec, sorted(set(layer_set)), args, device)


def bench_time(encoder, spec, layers, args, device) -> None:
    items = inputs(encoder.modality, args.n, spec.get("image_size", 224))
    batches = [
        {k: v.to(device) for k, v in encoder.collate(items[i : i + args.batch_size]).items()}
        for i in range(0, args.n, args.batch_size)
    ]
    dtype = DTYPES[args.precision]

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()

    if encoder.tokens_per_sample is not None:
        counts = [encoder.tokens_per_sample] * args.n
    else:
        counts = encoder.token_counts(items)

    def bare() -> float:
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode(), autocast():
            for batch in batches:
                bare_forward(encoder, batch)
        sync(device)
        return time.perf_counter() - start

    def extract(out: Path) -> float:
        sync(device)
        start = time.perf_counter()
        writers = []
        for layer in layers:
            plan = plan_blocks(
                counts, encoder.dims[layer], 2, 64 << 20, encoder.tokens_per_sample is not None
            )
            writer = TokenWriter.create_or_resume(
                out / f"layer_{layer}.zarr",
                fingerprint="bench",
                sample_ids=[str(i) for i in range(args.n)],
                plan=plan,
                dim=encoder.dims[layer],
                dtype="float16",
                attrs={"encoder": {"name": encoder.name}, "layer": layer},
            )
            writers.append(writer)
        kind = Tokens({"dtype": "float16", "shard_mb": 64})
        kind.layers = layers
        row = 0
        with torch.inference_mode(), autocast():
            for batch in batches:
                n = len(next(iter(batch.values())))
                for writer, output in zip(writers, kind.forward(encoder, batch), strict=True):
                    for b in range(n):
                        writer.add(row + b, kind.row(output, b))
                row += n
        for writer in writers:
            writer.finalize()
        return time.perf_counter() - start

    bare()  # warm-up
    bare_times, token_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            bare_times.append(bare())
            token_times.append(extract(Path(tmp) / str(r)))
    b, t = statistics.median(bare_times), statistics.median(token_times)
    print(
        f"  {encoder.name:>10} {encoder.modality:>6} layers {json.dumps(layers):10s} n={args.n} "
        f"batch={args.batch_size} {device.type}/{args.precision}: bare {args.n / b:8.1f} "
        f"samples/s, tokens {args.n / t:8.1f} samples/s, ratio {t / b:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="bytes,time")
    parser.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("--coco-mean-tokens", type=float, default=14.0)
    parser.add_argument("--coco-longest", type=int, default=77)
    parser.add_argument("--n", type=int, default=1024, help="samples per encoder (time)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=DTYPES, default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--layers", type=int, nargs="*", default=None, help="layers to extract (default: last)"
    )
    parser.add_argument("--vit-large", action="store_true", help="only the ViT-L/14 at 224 px")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if "bytes" in parts:
        bytes_part(args)
    if "time" in parts:
        time_part(args)


if __name__ == "__main__":
    main()
