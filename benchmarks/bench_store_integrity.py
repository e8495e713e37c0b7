"""Cost of the feature store's integrity checks, against the bare Zarr store and extraction.

"Checked" is the store as written and read now: a crc32c codec after zstd on every chunk,
NaN/inf refused at write, every chunk's size recorded and every chunk read back before the
marker (``finalize``), and on read a size check (``os.stat`` against the record) of every
touched chunk plus ``np.isfinite`` of what is returned.
"Bare" is the same layout without any of it (zstd only, plain Zarr reads), i.e. the
format before the checks. Both stores are written ``--repeats`` times, then read as often;
repeats alternate between the two; the table gives medians, the
ratio of the medians and the ratio of the best runs (steadier on a busy machine).

Read patterns: every layer in full (``FeatureStore.read(i)``, evaluate), the 4500 training
pairs' rows of two layers (``read(i, rows)``, align), and every layer streamed in 2048-row
slices of sorted rows (``layer(i).oindex``, similarity). The extraction reference times
the default config's encoders on ``--forward-n`` samples (pooled, all layers, CPU) and
scales that to ``--n`` rows; ``--forward-n 0`` skips it.

    python benchmarks/bench_store_integrity.py                 # 5000 rows, 12 x 192 and 7 x 384
    python benchmarks/bench_store_integrity.py --n 20000 --forward-n 0

Goal: the write-side checks cost < 5% of extraction time.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from pipeline.stores import core
from pipeline.stores.features import FeatureStore, FeatureWriter, rows_per_chunk

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"vision 12 x 192": [192] * 12, "text 7 x 384": [384] * 7}
STREAM_ROWS = 2048  # pipeline.similarity.matrix.DEFAULT_CHUNK_ROWS


def features(n: int, dims: list[int], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((n, d), dtype=np.float32) for d in dims]


def write_checked(path: Path, values: list[np.ndarray]) -> None:
    n = len(values[0])
    writer = FeatureWriter.create_or_resume(
        path,
        fingerprint="bench",
        sample_ids=[f"s{i}" for i in range(n)],
        layer_names=[f"layer.{i}" for i in range(len(values))],
        dims=[v.shape[1] for v in values],
        attrs={},
    )
    for block, start, stop in writer.pending_blocks():
        writer.write_block(block, [v[start:stop] for v in values])
    writer.finalize()


def write_bare(path: Path, values: list[np.ndarray]) -> None:
    """The same layout and block-by-block writes, without checksums or checks."""
    n, dims = len(values[0]), [v.shape[1] for v in values]
    rows = rows_per_chunk(n, dims)
    group = zarr.open_group(path, mode="w")
    dense = {"write_empty_chunks": True}
    layers = [
        group.create_array(
            f"layers/{i}",
            shape=(n, d),
            chunks=(rows, d),
            dtype="float32",
            fill_value=np.nan,
            config=dense,
            compressors=[ZstdCodec(level=0)],
        )
        for i, d in enumerate(dims)
    ]
    group.create_array("sample_id", shape=(n,), chunks=(n,), dtype=str)[:] = np.asarray(
        [f"s{i}" for i in range(n)]
    )
    flags = group.create_array(
        "block_complete", shape=(-(-n // rows),), chunks=(1,), dtype=bool, config=dense
    )
    group.attrs.update({"layer_names": [str(i) for i in dims], "dims": dims, "n_samples": n})
    for block, start in enumerate(range(0, n, rows)):
        for array, value in zip(layers, values, strict=True):
            array[start : start + rows] = value[start : start + rows]
        flags[block] = True
    with warnings.catch_warnings():  # as in BlockStoreWriter.finalize
        warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
        zarr.consolidate_metadata(path)
    core.marker_path(path).write_text("{}")


def reads(path: Path, checked: bool, rows: np.ndarray) -> dict[str, Callable[[], object]]:
    """The three read patterns, through the checked reader or bare Zarr."""
    if checked:
        opened = FeatureStore.open(path)
        layer, count = opened.layer, opened.num_layers

        def pairs() -> None:
            opened.read(0, rows), opened.read(count - 1, rows)
    else:
        group = zarr.open_group(path, mode="r")
        count = len(group.attrs["dims"])

        def layer(i: int) -> zarr.Array:
            return group[f"layers/{i}"]

        def pairs() -> None:
            order = np.argsort(rows, kind="stable")
            for i in (0, count - 1):
                values = np.empty((len(rows), layer(i).shape[1]), np.float32)
                values[order] = layer(i).oindex[rows[order], :]

    sorted_rows = np.sort(rows)

    def full() -> None:
        for i in range(count):
            layer(i)[:]

    def stream() -> None:
        for i in range(count):
            for start in range(0, len(sorted_rows), STREAM_ROWS):
                layer(i).oindex[sorted_rows[start : start + STREAM_ROWS], :]

    return {"read every layer": full, "read 2 layers' pairs": pairs, "stream all layers": stream}


def timed(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def extraction_seconds(config: Path, n_rows: int, n_forward: int) -> dict[str, float]:
    """Seconds the default encoders take to pool every layer of ``n_rows`` samples (CPU)."""
    import torch
    import yaml
    from PIL import Image

    from pipeline.encoders import build_encoder

    spec = yaml.safe_load(config.read_text())
    pair = spec["experiment"]["pairs"][0]
    rng = np.random.default_rng(0)
    seconds = {}
    for role in ("vision", "text"):
        encoder = build_encoder(pair[role], spec["encoders"][pair[role]])
        if role == "vision":
            size = spec["encoders"][pair[role]].get("image_size", 224)
            pixels = rng.integers(0, 256, (n_forward, size, size, 3), dtype=np.uint8)
            items = [Image.fromarray(p) for p in pixels]
        else:
            words = ["a", "small", "red", "circle", "two", "large", "blue", "squares", "at", "top"]
            items = [" ".join(rng.choice(words, size=rng.integers(6, 16))) for _ in items]
        start = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, n_forward, 128):
                [
                    layer.numpy()
                    for layer in encoder.pooled_layers(encoder.collate(items[i : i + 128]))
                ]
        seconds[role] = (time.perf_counter() - start) * n_rows / n_forward
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="rows per store")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--forward-n", type=int, default=256, help="samples to time encoders on")
    parser.add_argument("--config", type=Path, default=ROOT / "config.yaml")
    args = parser.parse_args()

    pair_rows = np.random.default_rng(1).integers(0, args.n, size=int(args.n * 0.9))
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, dims in SHAPES.items():
            values = features(args.n, dims)
            times = results.setdefault(name, {"bare": {}, "checked": {}})
            for _ in range(args.repeats):
                for kind, write in (("bare", write_bare), ("checked", write_checked)):
                    path = Path(tmp) / f"{kind}.zarr"
                    shutil.rmtree(path, ignore_errors=True)
                    times[kind].setdefault("write + finalize", []).append(
                        timed(lambda p=path, w=write, v=values: w(p, v))
                    )
            patterns = {
                kind: reads(Path(tmp) / f"{kind}.zarr", kind == "checked", pair_rows)
                for kind in ("bare", "checked")
            }
            for _ in range(args.repeats):
                for kind, pattern_reads in patterns.items():
                    for pattern, read in pattern_reads.items():
                        times[kind].setdefault(pattern, []).append(timed(read))
            verify = timed(lambda: FeatureStore(Path(tmp) / "checked.zarr").integrity_problems())
            times["checked"]["verify (every chunk)"] = [verify]

    extraction = extraction_seconds(args.config, args.n, args.forward_n) if args.forward_n else {}
    print(f"n = {args.n} rows, {args.repeats} repeats; seconds are medians")
    print(f"{'store':<16} {'operation':<22} {'bare':>7} {'checked':>7} {'ratio':>6} {'best':>6}")
    for name, times in results.items():
        for operation, checked in times["checked"].items():
            c = statistics.median(checked)
            if bare := times["bare"].get(operation):
                b = statistics.median(bare)
                ratios = f"{b:7.3f} {c:7.3f} {c / b:6.3f} {min(checked) / min(bare):6.3f}"
            else:
                ratios = f"{'':7} {c:7.3f}"
            print(f"{name:<16} {operation:<22} {ratios}")
    if extraction:
        print("\nwrite-side cost against extraction (forward + pooling + bare store writes):")
        for name, role in zip(SHAPES, ("vision", "text"), strict=True):
            write = {k: statistics.median(v["write + finalize"]) for k, v in results[name].items()}
            extra = write["checked"] - write["bare"]
            total = extraction[role] + write["bare"]
            print(
                f"  {name:<16} extraction ~{total:7.2f} s (default {role} encoder, scaled from "
                f"{args.forward_n}), checks +{extra:6.3f} s = {100 * extra / total:5.2f}%"
            )


if __name__ == "__main__":
    main()
