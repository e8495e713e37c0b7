"""Benchmark of the all-layer-pair similarity code.

1. The full vision x text matrix of linear and unbiased CKA from per-layer statistics
   (``pipeline.similarity.matrix``) against per-pair loops that rebuild both n x n Gram
   matrices for every pair: centred or U-centred Grams (as common CKA scripts do), Song's
   sums on the Grams (leaner), and an explicit n x n centring matrix (as widely copied
   scripts do; timed on one pair by default and extrapolated). Prints time, speed-up and
   the largest absolute difference. Default: n = 5000, 13 vision layers of width 192,
   7 text layers of width 384.
2. Peak memory of streaming linear CKA over layers generated chunk by chunk (never held in
   full), each size in a fresh process. Default: n = 200,000 samples, 25 layers of width
   1024 on each side. Reported both as the tracemalloc peak (NumPy's traced allocations)
   and as the growth of the process's peak resident set size (``resource.getrusage``
   ru_maxrss), which also counts BLAS buffers. The exact float64 cross-products cost
   1.36 GFLOP per row at that width, about 2.7e14 FLOP for 200,000 rows (hours on two
   cores): ``--stream-n 1024,8192`` shows the memory at full width on fewer rows, and
   ``--stream-n 10000,200000 --stream-width 128`` the memory over all 200,000 rows.

3. The cost of calibration in one run: ``compute_similarity`` (what ``compare_layers`` runs)
   on two feature stores shaped like the default config's (a pool of 1500 pairs, 12 vision
   layers of width 96, 7 text layers of width 384, the default metrics), once as before
   (the full pool, no null, no bootstrap), once with the permutation null and bootstrap,
   and once with the default settings (null, bootstrap and the pool sizes 250, 1000, full).
   Prints each time and its ratio to the first.

    python benchmarks/bench_similarity.py            # full size
    python benchmarks/bench_similarity.py --quick    # n = 1000; streams of 2,000 and 10,000 rows
    python benchmarks/bench_similarity.py --parts calibration   # part 3 only
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import tempfile
import time
import tracemalloc
from concurrent.futures import ProcessPoolExecutor
from itertools import product
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline.pairs import Pairs
from pipeline.similarity.calibration import CalibrationSettings
from pipeline.similarity.compute import FULL, compute_similarity
from pipeline.similarity.matrix import centred_moments, linear_cka_matrix, unbiased_cka_matrix
from pipeline.stores.features import FeatureWriter

# ---- part 1: vectorised matrix against a per-pair loop over Gram matrices ----


def centre_gram(k: np.ndarray) -> np.ndarray:
    """H K H, computed with row and column means instead of n x n products."""
    return k - k.mean(axis=0) - k.mean(axis=1)[:, None] + k.mean()


def u_centre_gram(k: np.ndarray) -> np.ndarray:
    """U-centred Gram (diagonal zeroed; <U(K), U(L)> = n(n-3) HSIC_1(K, L))."""
    n = len(k)
    k = k.copy()
    np.fill_diagonal(k, 0.0)
    means = k.sum(axis=0) / (n - 2)
    means -= means.sum() / (2 * (n - 1))
    k -= means[:, None]
    k -= means[None, :]
    np.fill_diagonal(k, 0.0)
    return k


def grams(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = x.astype(np.float64), y.astype(np.float64)
    return x @ x.T, y @ y.T


def pair_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Per pair: both Grams, centred, HSIC = tr(KHLH) / (n-1)^2 (the scale cancels)."""
    kc, lc = (centre_gram(g) for g in grams(x, y))
    return np.vdot(kc, lc) / np.sqrt(np.vdot(kc, kc) * np.vdot(lc, lc))


def pair_linear_cka_explicit_h(x: np.ndarray, y: np.ndarray) -> float:
    """Per pair as widely copied CKA scripts do: H = I - 11^T/n as a matrix, HKH by products,
    and each HSIC call centring its own Grams (n^3 work per centring)."""
    h = np.eye(len(x)) - 1.0 / len(x)

    def hsic(k, l):  # noqa: E741
        return np.sum((h @ k @ h) * (h @ l @ h))

    k, l = grams(x, y)  # noqa: E741
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def pair_unbiased_cka_u_centred(x: np.ndarray, y: np.ndarray) -> float:
    """Per pair, as common debiased-CKA scripts do: both Grams, U-centred, inner products."""
    ku, lu = (u_centre_gram(g) for g in grams(x, y))
    return np.vdot(ku, lu) / np.sqrt(np.vdot(ku, ku) * np.vdot(lu, lu))


def pair_unbiased_cka_song(x: np.ndarray, y: np.ndarray) -> float:
    """Per pair, leaner: both Grams with zeroed diagonals in Song et al.'s sum formula."""
    n = len(x)

    def hsic(k, l):  # noqa: E741
        return (
            np.vdot(k, l)
            + k.sum() * l.sum() / ((n - 1) * (n - 2))
            - 2 / (n - 2) * k.sum(axis=0) @ l.sum(axis=1)
        ) / (n * (n - 3))

    k, l = grams(x, y)  # noqa: E741
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def layered_features(n: int, widths: list[int], seed: int, latent: np.ndarray) -> list[np.ndarray]:
    """Float32 layers (as read from a store) that share a latent signal in varying amounts."""
    rng = np.random.default_rng(seed)
    layers = []
    for index, width in enumerate(widths):
        signal = latent @ rng.standard_normal((latent.shape[1], width)) * (index / len(widths))
        layers.append((rng.standard_normal((n, width)) + signal + 3.0).astype(np.float32))
    return layers


def spread(pairs: list[tuple[int, int]], count: int | None) -> list[tuple[int, int]]:
    """``count`` pairs spread evenly over the list (all of them when None)."""
    return pairs if count is None else pairs[:: -(-len(pairs) // max(count, 1))][:count]


def bench_matrix(n: int, baseline_pairs: int | None, explicit_h_pairs: int) -> None:
    latent = np.random.default_rng(0).standard_normal((n, 16))
    vision = layered_features(n, [192] * 13, seed=1, latent=latent)
    text = layered_features(n, [384] * 7, seed=2, latent=latent)
    all_pairs = list(product(range(len(vision)), range(len(text))))
    print(
        f"\n[1] all layer pairs: n={n}, 13 x 192 (vision) by 7 x 384 (text), {len(all_pairs)} pairs"
    )

    start = time.perf_counter()
    moments = centred_moments(vision, text, progress=False)
    linear, unbiased = linear_cka_matrix(moments), unbiased_cka_matrix(moments)
    vectorised = time.perf_counter() - start
    print(f"  vectorised, both metrics from one streaming pass: {vectorised:.2f} s")

    baselines = (
        ("linear CKA, centred Grams", pair_linear_cka, linear, baseline_pairs),
        ("unbiased CKA, U-centred Grams", pair_unbiased_cka_u_centred, unbiased, baseline_pairs),
        ("unbiased CKA, Song sums on Grams", pair_unbiased_cka_song, unbiased, baseline_pairs),
        ("linear CKA, explicit n x n H", pair_linear_cka_explicit_h, linear, explicit_h_pairs),
    )
    for name, per_pair, ours, count in baselines:
        timed = spread(all_pairs, count)
        if not timed:
            continue
        start = time.perf_counter()
        pairs = tqdm(timed, desc=name, leave=False)
        reference = {(a, b): per_pair(vision[a], text[b]) for a, b in pairs}
        total = (time.perf_counter() - start) * len(all_pairs) / len(timed)
        difference = max(abs(ours[a, b] - value) for (a, b), value in reference.items())
        how = (
            "measured on all pairs"
            if len(timed) == len(all_pairs)
            else f"measured on {len(timed)} of {len(all_pairs)} pairs, extrapolated"
        )
        print(f"  per-pair loop, {name}: {total:.2f} s ({how})")
        print(f"    speed-up of the vectorised matrix: {total / vectorised:.1f}x")
        print(f"    max |vectorised - per-pair| = {difference:.2e}")


# ---- part 2: memory of streaming linear CKA over generated chunks ----


class GeneratedLayer:
    """A layer whose rows are generated on demand from small fixed banks (deterministic per row).

    Row i = noise_bank[(i + offset) % B] + latent_bank[i % B'] @ loadings: never held in full.
    """

    def __init__(self, n: int, noise_bank: np.ndarray, latent_bank: np.ndarray, seed: int):
        rng = np.random.default_rng(seed)
        self.shape = (n, noise_bank.shape[1])
        self.noise_bank, self.latent_bank = noise_bank, latent_bank
        self.loadings = 0.1 * rng.standard_normal((latent_bank.shape[1], noise_bank.shape[1]))
        self.offset = int(rng.integers(len(noise_bank)))

    def __getitem__(self, rows: slice) -> np.ndarray:
        index = np.arange(*rows.indices(self.shape[0]))
        noise = self.noise_bank[(index + self.offset) % len(self.noise_bank)]
        latent = self.latent_bank[index % len(self.latent_bank)]
        return noise + (latent @ self.loadings).astype(np.float32)


def measure_stream(n: int, layers: int, width: int, chunk_rows: int, budget: int) -> dict:
    """Stream linear CKA over generated layers; time, CKA range and peak memory of this process."""
    rng = np.random.default_rng(0)
    noise_bank = rng.standard_normal((4099, width), dtype=np.float32)
    latent_bank = rng.standard_normal((4093, 8))
    vision = [GeneratedLayer(n, noise_bank, latent_bank, seed=i) for i in range(layers)]
    text = [GeneratedLayer(n, noise_bank, latent_bank, seed=1000 + i) for i in range(layers)]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tracemalloc.start()
    start = time.perf_counter()
    scores = linear_cka_matrix(centred_moments(vision, text, chunk_rows, budget, progress=True))
    seconds = time.perf_counter() - start
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    return {
        "seconds": seconds,
        "range": (scores.min(), scores.max()),
        "traced": traced_peak,
        "rss": rss_growth,
    }


def bench_stream(sizes: list[int], layers: int, width: int, chunk_rows: int, budget: int) -> None:
    """Each size runs in a fresh process, so its peak RSS growth is its own."""
    multiply_adds_per_row = (layers * width) ** 2 + layers * width**2  # cross + both syrks
    print(
        f"\n[2] streaming linear CKA, {layers} layers x {width} per side, chunk_rows={chunk_rows}, "
        f"accumulator budget {budget / 2**30:.2f} GiB; generated chunk by chunk.\n"
        "  memory: tracemalloc = peak traced NumPy/Python allocations; "
        "RSS = growth of getrusage ru_maxrss (includes BLAS buffers)"
    )
    spawn = multiprocessing.get_context("spawn")
    results = {}
    for n in sizes:
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:
            results[n] = pool.submit(measure_stream, n, layers, width, chunk_rows, budget).result()
        r = results[n]
        held = n * layers * width * 4 * 2
        low, high = r["range"]
        print(
            f"  n={n:>9,}: {r['seconds']:8.1f} s ({1e3 * r['seconds'] / n:.2f} s per 1000 rows), "
            f"tracemalloc {r['traced'] / 2**30:.2f} GiB, RSS {r['rss'] / 2**30:.2f} GiB, "
            f"data as float32 {held / 2**30:.2f} GiB, CKA in [{low:.3f}, {high:.3f}]"
        )
    peaks = [r["rss"] for r in results.values()]
    print(f"  largest / smallest RSS growth across sizes: {max(peaks) / min(peaks):.2f}")
    largest = max(sizes)
    print(
        f"  {2 * multiply_adds_per_row / 1e6:.0f} MFLOP per row; measured "
        f"{2 * multiply_adds_per_row * largest / results[largest]['seconds'] / 1e9:.1f} GFLOP/s "
        f"at n={largest:,}"
    )


# ---- part 3: the cost of the permutation null and the bootstrap ----


def write_store(path: Path, layers: list[np.ndarray]) -> Path:
    writer = FeatureWriter.create_or_resume(
        path,
        fingerprint="bench",
        sample_ids=[f"s{i}" for i in range(len(layers[0]))],
        layer_names=[f"layer{i}" for i in range(len(layers))],
        dims=[layer.shape[1] for layer in layers],
        attrs={},
    )
    for block, start, stop in writer.pending_blocks():
        writer.write_block(block, [layer[start:stop] for layer in layers])
    writer.finalize()
    return path


def bench_calibration(n: int, permutations: int, bootstrap: int, repeats: int) -> None:
    latent = np.random.default_rng(0).standard_normal((n, 16))
    vision = layered_features(n, [96] * 12, seed=1, latent=latent)
    text = layered_features(n, [384] * 7, seed=2, latent=latent)
    order = np.random.default_rng(3).permutation(n)
    pairs = Pairs(order, order)
    metrics = ["linear_cka", "unbiased_cka", "mutual_knn"]
    print(
        f"\n[3] compute_similarity, n={n} pairs, 12 x 96 (vision) by 7 x 384 (text), {metrics},"
        f" best of {repeats}"
    )
    runs = {
        "as before (full pool, no calibration)": ((FULL,), CalibrationSettings()),
        f"null ({permutations}) + bootstrap ({bootstrap}), full pool": (
            (FULL,),
            CalibrationSettings(permutations, bootstrap),
        ),
        f"defaults: null + bootstrap, pools 250, 1000, {FULL}": (
            (250, 1000, FULL),
            CalibrationSettings(permutations, bootstrap),
        ),
    }
    with tempfile.TemporaryDirectory() as folder:
        stores = (
            write_store(Path(folder) / "v.zarr", vision),
            write_store(Path(folder) / "t.zarr", text),
        )
        times = {}
        for name, (sizes, settings) in runs.items():
            best = np.inf
            for _ in range(repeats):
                start = time.perf_counter()
                compute_similarity(
                    *stores,
                    pairs,
                    metrics,
                    "rice",
                    "v",
                    "t",
                    0,
                    progress=False,
                    pool_sizes=sizes,
                    calibration=settings,
                )
                best = min(best, time.perf_counter() - start)
            times[name] = best
    base = next(iter(times.values()))
    for name, seconds in times.items():
        print(f"  {name}: {seconds:.2f} s, {seconds / base:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--n", type=int, help="samples for part 1 (default 5000, quick 1000)")
    parser.add_argument(
        "--baseline-pairs", type=int, help="time the per-pair loop on this many pairs only"
    )
    parser.add_argument(
        "--explicit-h-pairs",
        type=int,
        default=1,
        help="pairs timed with the explicit n x n centring matrix baseline (0: skip)",
    )
    parser.add_argument(
        "--stream-n", help="comma-separated row counts for part 2 (200000; quick 2000,10000)"
    )
    parser.add_argument("--stream-layers", type=int, help="layers per side (25, quick 8)")
    parser.add_argument("--stream-width", type=int, help="layer width (1024, quick 512)")
    parser.add_argument("--chunk-rows", type=int, default=1024)
    parser.add_argument("--budget-gib", type=float, default=1.0)
    parser.add_argument("--permutations", type=int, default=20, help="part 3's null size")
    parser.add_argument("--bootstrap", type=int, default=20, help="part 3's resamples")
    parser.add_argument("--calibration-n", type=int, default=1500, help="part 3's pool size")
    parser.add_argument("--repeats", type=int, default=1, help="part 3 keeps the best of these")
    parser.add_argument(
        "--parts", default="stream,matrix,calibration", help="which parts, comma-separated"
    )
    args = parser.parse_args()
    parts = args.parts.split(",")
    if "stream" in parts:
        sizes = args.stream_n or ("2000,10000" if args.quick else "200000")
        bench_stream(
            [int(size) for size in sizes.split(",")],
            args.stream_layers or (8 if args.quick else 25),
            args.stream_width or (512 if args.quick else 1024),
            args.chunk_rows,
            int(args.budget_gib * 2**30),
        )
    if "matrix" in parts:
        n = args.n or (1000 if args.quick else 5000)
        bench_matrix(n, args.baseline_pairs, args.explicit_h_pairs)
    if "calibration" in parts:
        bench_calibration(args.calibration_n, args.permutations, args.bootstrap, args.repeats)


if __name__ == "__main__":
    main()
