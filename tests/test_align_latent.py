"""Every method on a synthetic world where the answer is known: two modalities of one latent.

z (16-d, clustered) is seen through two different random nonlinear maps, tanh(z A) + noise into
64 and 96 dimensions. Retrieval of the paired item on a held-out test set measures how well a
method recovered the shared latent; the oracle is the best closed-form linear alignment fitted on
20k pairs. Run with ``-s`` to see the table of top-1 / recall@5 per method and n.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.align.grid import compute_threads
from pipeline.align.kinds import build_aligner

SIZES = (100, 400, 2000)
N_TEST = 500
HEAD = {"dim": 128, "batch_size": 1024, "lr": 5e-3, "max_epochs": 60, "patience": 8}
STRUCTURE = {"lambda": 10, "warmup_steps": 10}
METHODS = {
    "linear": ("linear", HEAD),
    "linear+STRUCTURE": ("linear", {**HEAD, "structure": STRUCTURE}),
    "mlp": ("mlp", {**HEAD, "hidden": 256}),
    "mlp+STRUCTURE": ("mlp", {**HEAD, "hidden": 256, "structure": STRUCTURE}),
    "csa": ("csa", {"sim_dim": 16}),
    "asif": ("asif", {}),
    "procrustes": ("procrustes", {}),
    "ridge": ("ridge", {"alpha": 10.0}),
}


def latent_world(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n pairs (x, y): the maps and cluster centres are fixed, the samples depend on seed."""
    world = np.random.default_rng(1000)
    a_img, a_txt = (world.normal(size=(16, d)) * 1.5 / 4 for d in (64, 96))
    centres = world.normal(size=(20, 16))
    rng = np.random.default_rng(seed)
    z = centres[rng.integers(20, size=n)] + 0.5 * rng.normal(size=(n, 16))
    x = np.tanh(z @ a_img) + 0.3 * rng.normal(size=(n, 64))
    y = np.tanh(z @ a_txt) + 0.3 * rng.normal(size=(n, 96))
    return x.astype(np.float32), y.astype(np.float32)


def retrieval(scores: np.ndarray) -> tuple[float, float]:
    """Image-to-text top-1 and recall@5 when item i's pair is text i."""
    rank = (scores > scores[np.arange(len(scores)), np.arange(len(scores))][:, None]).sum(axis=1)
    return float((rank == 0).mean()), float((rank < 5).mean())


def evaluate(method: str, params: dict, x, y, xv, yv, xt, yt) -> tuple[float, float]:
    aligner = build_aligner(method, params)
    aligner.fit(x, y, xv, yv, seed=0)
    return retrieval(aligner.similarity(aligner.embed_image(xt), aligner.embed_text(yt)))


@pytest.fixture(scope="module")
def table() -> dict:
    x, y = latent_world(20_000, seed=1)
    xv, yv = latent_world(250, seed=2)
    xt, yt = latent_world(N_TEST, seed=3)
    results = {}
    with compute_threads(1):
        for name, (method, params) in METHODS.items():
            for n in SIZES:
                results[name, n] = evaluate(method, params, x[:n], y[:n], xv, yv, xt, yt)
        oracle = max(
            evaluate(m, p, x, y, None, None, xt, yt)
            for m, p in (METHODS["csa"], METHODS["ridge"], ("ridge", {"alpha": 1.0}))
        )
    lines = [f"{'method':18s}" + "".join(f"{f'n={n}':>16s}" for n in SIZES)]
    for name in METHODS:
        cells = "".join(f"{r[0]:8.3f} /{r[1]:6.3f}" for r in (results[name, n] for n in SIZES))
        lines.append(f"{name:18s}{cells}")
    lines.append(f"{'oracle (20k)':18s}{oracle[0]:8.3f} /{oracle[1]:6.3f}   chance {1 / N_TEST}")
    print("\nimage->text top-1 / recall@5 on", N_TEST, "test pairs\n" + "\n".join(lines))
    return {"results": results, "oracle": oracle}


def test_every_method_beats_chance(table: dict) -> None:
    for (name, n), (top1, recall5) in table["results"].items():
        assert top1 > 10 / N_TEST and recall5 > 50 / N_TEST, (name, n)


@pytest.mark.parametrize("head", ["linear", "mlp", "linear+STRUCTURE", "mlp+STRUCTURE"])
def test_trained_heads_approach_the_oracle(table: dict, head: str) -> None:
    oracle_top1 = table["oracle"][0]
    gaps = [oracle_top1 - table["results"][head, n][0] for n in SIZES]
    assert gaps[0] > gaps[1] > gaps[2], gaps
    assert gaps[-1] < 0.1


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_structure_helps_at_the_smallest_n(table: dict, head: str) -> None:
    plain = table["results"][head, SIZES[0]]
    regularised = table["results"][f"{head}+STRUCTURE", SIZES[0]]
    assert regularised[0] > plain[0] and regularised[1] > plain[1]
