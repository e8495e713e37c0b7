"""Similarity of every vision-layer x text-layer pair, from statistics computed once per layer.

A layer is a *row source*: anything with ``shape == (n_samples, dim)`` that returns rows as
an array for a slice or a sorted int array (a NumPy array, a Zarr array, ``StoreRows``).
Row i of every source belongs to the same pair.

- Linear and unbiased CKA come from one set of centred moments (``centred_moments``),
  streamed over row chunks in two passes (exact column means first, then the moments of
  the centred chunks), all sums in float64. Memory depends on the layer widths and the
  chunk size, never on the number of samples.
- The unbiased HSIC of Song et al. needs no n x n Gram matrix for linear kernels. HSIC_1 is
  invariant to translating the features, so with centred X (n x d1), Y (n x d2),
  K = XX^T, L = YY^T, q = diag K, r = diag L: 1'K~1 = -sum(q), K~1 = -q and
  tr(K~L~) = ||X^T Y||_F^2 - q.r, which gives
  ``HSIC_1 = [||X^T Y||_F^2 - n/(n-2) q.r + sum(q) sum(r)/((n-1)(n-2))] / (n(n-3))``.
  The same cross-products ||X_a^T Y_b||_F^2 therefore serve both CKA variants.
- Mutual kNN combines per-layer neighbour sets, found once per layer, through one sparse
  product of neighbour-indicator matrices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Protocol

import numpy as np
from scipy import sparse
from scipy.linalg import blas
from tqdm.auto import tqdm

from pipeline.similarity.metrics import (
    ROUNDING_SLACK,
    cka_ratio,
    knn_indices,
    minibatch_indices,
    resolve_k,
)

DEFAULT_CHUNK_ROWS = 2048
DEFAULT_ACCUMULATOR_BYTES = 1 << 30


class RowSource(Protocol):
    """Rows of one layer's features: ``source[rows]`` for a slice or sorted int array."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class CentredMoments:
    """Sums over the n samples of column-centred vision layers X_a and text layers Y_b.

    With q_a(i) = ||x_a,i||^2, the squared norm of centred row i (the diagonal of X_a X_a^T).
    """

    n: int
    cross: np.ndarray  # (La, Lb): ||X_a^T Y_b||_F^2
    vision_self: np.ndarray  # (La,): ||X_a^T X_a||_F^2
    text_self: np.ndarray  # (Lb,): ||Y_b^T Y_b||_F^2
    diag_cross: np.ndarray  # (La, Lb): sum_i q_a(i) q_b(i)
    vision_diag_sq: np.ndarray  # (La,): sum_i q_a(i)^2
    text_diag_sq: np.ndarray  # (Lb,)
    vision_trace: np.ndarray  # (La,): sum_i q_a(i) = ||X_a||_F^2
    text_trace: np.ndarray  # (Lb,)


def sample_count(vision: Sequence[RowSource], text: Sequence[RowSource]) -> int:
    """The common number of rows of all layers; raises naming the first layer that differs."""
    if not vision or not text:
        raise ValueError("need at least one vision layer and one text layer")
    n = vision[0].shape[0]
    for side, layers in (("vision", vision), ("text", text)):
        for index, layer in enumerate(layers):
            if len(layer.shape) != 2:
                raise ValueError(f"{side} layer {index} has shape {layer.shape}, expected 2-D")
            if layer.shape[0] != n:
                raise ValueError(f"{side} layer {index} has {layer.shape[0]} rows, expected {n}")
    return n


def plan_vision_blocks(
    vision_dims: Sequence[int], text_dims: Sequence[int], max_accumulator_bytes: int
) -> list[list[int]]:
    """Split vision layers into consecutive blocks whose float64 accumulators fit the budget.

    A block of vision layers holds its cross-products with every text layer and its own
    d x d products; the first block also holds the text layers' d x d products. Each block
    costs one pass over the data; a block always holds at least one layer.
    """
    text_width = sum(text_dims)
    blocks: list[list[int]] = [[]]
    used = 8 * sum(d * d for d in text_dims)
    for layer, dim in enumerate(vision_dims):
        need = 8 * dim * (text_width + dim)
        if blocks[-1] and used + need > max_accumulator_bytes:
            blocks.append([])
            used = 0
        blocks[-1].append(layer)
        used += need
    return blocks


def column_means(source: RowSource, chunk_rows: int) -> np.ndarray:
    """Float64 column means of a layer, read chunk by chunk."""
    n = source.shape[0]
    total = np.zeros(source.shape[1])
    for start in range(0, n, chunk_rows):
        total += np.sum(source[start : start + chunk_rows], axis=0, dtype=np.float64)
    return total / n


def _centred_chunk(
    layers: Sequence[RowSource],
    means: Sequence[np.ndarray],
    start: int,
    stop: int,
    buffer: np.ndarray,
) -> np.ndarray:
    """Rows start:stop of several layers, centred, side by side in the first rows of ``buffer``."""
    chunk = buffer[: stop - start]
    offset = 0
    for layer, mean in zip(layers, means, strict=True):
        block = chunk[:, offset : offset + len(mean)]
        block[...] = layer[start:stop]
        block -= mean
        offset += len(mean)
    return chunk


def _offsets(dims: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(dims)]).astype(np.int64)


def _layer_blocks(chunk: np.ndarray, offsets: np.ndarray) -> list[np.ndarray]:
    return [chunk[:, lo:hi] for lo, hi in pairwise(offsets)]


def _squared_row_norms(chunk: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(rows, layers): squared norm of each row within each layer's column block."""
    blocks = _layer_blocks(chunk, offsets)
    return np.stack([np.einsum("ij,ij->i", block, block) for block in blocks], axis=1)


def _add_gram(upper: np.ndarray, block: np.ndarray) -> np.ndarray:
    """Add block^T block into the upper triangle of a Fortran-order accumulator (BLAS syrk)."""
    return blas.dsyrk(1.0, block.T, beta=1.0, c=upper, overwrite_c=True)


def _upper_gram_squared_norm(upper: np.ndarray) -> float:
    """||G||_F^2 of a symmetric G stored as its upper triangle (zeros below the diagonal)."""
    return float(2.0 * np.sum(upper**2) - np.sum(np.diag(upper) ** 2))


def _block_squared_norms(
    matrix: np.ndarray, row_offsets: np.ndarray, col_offsets: np.ndarray
) -> np.ndarray:
    """Squared Frobenius norm of every (row block, column block); squares ``matrix`` in place."""
    np.square(matrix, out=matrix)
    per_row_block = np.add.reduceat(matrix, row_offsets[:-1], axis=0)
    return np.add.reduceat(per_row_block, col_offsets[:-1], axis=1)


def _block_moments(
    vision: Sequence[RowSource],
    vision_means: Sequence[np.ndarray],
    text: Sequence[RowSource],
    text_means: Sequence[np.ndarray],
    chunk_rows: int,
    with_text: bool,
    description: str,
    progress: bool,
) -> CentredMoments:
    """One pass over the rows for some vision layers against all text layers.

    The text layers' own terms are computed only ``with_text`` (else left at zero).
    """
    n = vision[0].shape[0]
    vision_offsets = _offsets([len(mean) for mean in vision_means])
    text_offsets = _offsets([len(mean) for mean in text_means])
    # Fortran order lets BLAS add each chunk's X^T Y into it in place (no temporary).
    cross = np.zeros((vision_offsets[-1], text_offsets[-1]), order="F")
    vision_grams = [np.zeros((len(mean), len(mean)), order="F") for mean in vision_means]
    text_grams = [np.zeros((len(m), len(m)), order="F") for m in text_means] if with_text else []
    diag_cross = np.zeros((len(vision), len(text)))
    vision_diag = np.zeros((2, len(vision)))  # sums of q and q^2
    text_diag = np.zeros((2, len(text)))
    # Chunks are read into the same two buffers, so memory stays flat however many chunks.
    x_buffer = np.empty((min(chunk_rows, n), vision_offsets[-1]))
    y_buffer = np.empty((min(chunk_rows, n), text_offsets[-1]))
    for start in tqdm(range(0, n, chunk_rows), desc=description, disable=not progress, leave=False):
        stop = min(start + chunk_rows, n)
        x = _centred_chunk(vision, vision_means, start, stop, x_buffer)
        y = _centred_chunk(text, text_means, start, stop, y_buffer)
        cross = blas.dgemm(1.0, x.T, y.T, beta=1.0, c=cross, trans_b=True, overwrite_c=True)
        qx, qy = _squared_row_norms(x, vision_offsets), _squared_row_norms(y, text_offsets)
        diag_cross += qx.T @ qy
        vision_diag += (qx.sum(axis=0), (qx**2).sum(axis=0))
        blocks = _layer_blocks(x, vision_offsets)
        vision_grams = [_add_gram(g, b) for g, b in zip(vision_grams, blocks, strict=True)]
        if with_text:
            text_diag += (qy.sum(axis=0), (qy**2).sum(axis=0))
            blocks = _layer_blocks(y, text_offsets)
            text_grams = [_add_gram(g, b) for g, b in zip(text_grams, blocks, strict=True)]
    return CentredMoments(
        n=n,
        cross=_block_squared_norms(cross, vision_offsets, text_offsets),
        vision_self=np.array([_upper_gram_squared_norm(g) for g in vision_grams]),
        text_self=np.array(
            [_upper_gram_squared_norm(g) for g in text_grams] or np.zeros(len(text))
        ),
        diag_cross=diag_cross,
        vision_diag_sq=vision_diag[1],
        text_diag_sq=text_diag[1],
        vision_trace=vision_diag[0],
        text_trace=text_diag[0],
    )


def centred_moments(
    vision: Sequence[RowSource],
    text: Sequence[RowSource],
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    max_accumulator_bytes: int = DEFAULT_ACCUMULATOR_BYTES,
    progress: bool = True,
) -> CentredMoments:
    """Stream the centred moments of every layer pair over row chunks (float64 throughout).

    Pass 1 computes exact column means; each following pass (one per block of vision
    layers, see ``plan_vision_blocks``) adds every chunk's centred X^T Y for the block into
    one accumulator with a single matmul, plus per-layer X^T X and row-norm sums.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    sample_count(vision, text)
    layers = tqdm([*vision, *text], desc="CKA column means", disable=not progress, leave=False)
    means = [column_means(layer, chunk_rows) for layer in layers]
    vision_means, text_means = means[: len(vision)], means[len(vision) :]
    blocks = plan_vision_blocks(
        [len(m) for m in vision_means], [len(m) for m in text_means], max_accumulator_bytes
    )
    parts = [
        _block_moments(
            [vision[a] for a in block],
            [vision_means[a] for a in block],
            text,
            text_means,
            chunk_rows,
            with_text=index == 0,
            description=f"CKA moments, pass {index + 1}/{len(blocks)}",
            progress=progress,
        )
        for index, block in enumerate(blocks)
    ]
    first = parts[0]
    return CentredMoments(
        n=first.n,
        cross=np.concatenate([part.cross for part in parts]),
        vision_self=np.concatenate([part.vision_self for part in parts]),
        text_self=first.text_self,
        diag_cross=np.concatenate([part.diag_cross for part in parts]),
        vision_diag_sq=np.concatenate([part.vision_diag_sq for part in parts]),
        text_diag_sq=first.text_diag_sq,
        vision_trace=np.concatenate([part.vision_trace for part in parts]),
        text_trace=first.text_trace,
    )


def linear_cka_matrix(moments: CentredMoments) -> np.ndarray:
    """(La, Lb) linear CKA: ||X_a^T Y_b||_F^2 / (||X_a^T X_a||_F ||Y_b^T Y_b||_F)."""
    return cka_ratio(moments.cross, moments.vision_self[:, None], moments.text_self[None, :])


def unbiased_hsic_centred(
    cross: np.ndarray, diag_dot: np.ndarray, trace_x: np.ndarray, trace_y: np.ndarray, n: int
) -> np.ndarray:
    """Song et al.'s HSIC_1 from centred-feature sums (module docstring), elementwise; an
    estimate within its terms' rounding error is 0, as in ``metrics.hsic_unbiased``."""
    if n < 4:
        raise ValueError(f"unbiased HSIC needs at least 4 samples, got {n}")
    terms = np.broadcast_arrays(
        cross, -n / (n - 2) * diag_dot, trace_x * trace_y / ((n - 1) * (n - 2))
    )
    total = sum(terms)
    scale = np.max(np.abs(terms), axis=0)
    noise = np.abs(total) <= ROUNDING_SLACK * n * np.finfo(np.float64).eps * scale
    return np.where(noise, 0.0, total) / (n * (n - 3))


def unbiased_hsic_terms(moments: CentredMoments) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HSIC_1 of every pair (La, Lb) and of each vision (La,) and text (Lb,) layer with itself."""
    m = moments
    pairs = unbiased_hsic_centred(
        m.cross, m.diag_cross, m.vision_trace[:, None], m.text_trace[None, :], m.n
    )
    vision = unbiased_hsic_centred(
        m.vision_self, m.vision_diag_sq, m.vision_trace, m.vision_trace, m.n
    )
    text = unbiased_hsic_centred(m.text_self, m.text_diag_sq, m.text_trace, m.text_trace, m.n)
    return pairs, vision, text


def unbiased_cka_matrix(moments: CentredMoments) -> np.ndarray:
    """(La, Lb) debiased linear CKA; 0 where a self estimate is <= 0 (see ``cka_ratio``)."""
    pairs, vision, text = unbiased_hsic_terms(moments)
    return cka_ratio(pairs, vision[:, None], text[None, :])


def minibatch_cka_matrix(
    vision: Sequence[RowSource],
    text: Sequence[RowSource],
    batch_size: int,
    seed: int,
    max_accumulator_bytes: int = DEFAULT_ACCUMULATOR_BYTES,
    progress: bool = True,
) -> np.ndarray:
    """(La, Lb) minibatch CKA: HSIC_1 terms averaged over the batches of ``minibatch_indices``.

    Each batch's rows are read once for all layers; the ratio is taken of the averages.
    """
    batches = minibatch_indices(sample_count(vision, text), batch_size, seed)
    totals = [np.zeros((len(vision), len(text))), np.zeros(len(vision)), np.zeros(len(text))]
    for batch in tqdm(batches, desc="minibatch CKA", disable=not progress, leave=False):
        rows = np.sort(batch)
        moments = centred_moments(
            [np.asarray(layer[rows]) for layer in vision],
            [np.asarray(layer[rows]) for layer in text],
            chunk_rows=batch_size,
            max_accumulator_bytes=max_accumulator_bytes,
            progress=False,
        )
        for total, term in zip(totals, unbiased_hsic_terms(moments), strict=True):
            total += term
    pairs, vision_self, text_self = (total / len(batches) for total in totals)
    return cka_ratio(pairs, vision_self[:, None], text_self[None, :])


def _neighbour_indicators(neighbour_sets: Sequence[np.ndarray]) -> sparse.csr_array:
    """(layers, n*n) 0/1 matrix: entry (l, i*n + j) is 1 when j is a neighbour of i in layer l."""
    n, k = neighbour_sets[0].shape
    codes = [(np.arange(n)[:, None] * n + sets).ravel() for sets in neighbour_sets]
    indptr = np.arange(len(codes) + 1, dtype=np.int64) * (n * k)
    data = np.ones(len(codes) * n * k, dtype=np.int64)
    return sparse.csr_array((data, np.concatenate(codes), indptr), shape=(len(codes), n * n))


def layer_neighbours(
    layers: Sequence[RowSource], k: int, side: str, progress: bool = True
) -> list[np.ndarray]:
    """Each layer's (n, k) neighbour sets, one layer in memory at a time."""
    description = f"kNN sets, {side} layers"
    return [
        knn_indices(np.asarray(layer[0 : layer.shape[0]]), k)
        for layer in tqdm(layers, desc=description, disable=not progress, leave=False)
    ]


def mutual_knn_matrix(
    vision: Sequence[RowSource], text: Sequence[RowSource], k: int | str, progress: bool = True
) -> np.ndarray:
    """(La, Lb) mutual kNN: mean over samples of |N_a(i) ∩ N_b(i)| / k, for every pair."""
    k = resolve_k(k, sample_count(vision, text))
    return mutual_knn_of_sets(
        layer_neighbours(vision, k, "vision", progress), layer_neighbours(text, k, "text", progress)
    )


def mutual_knn_of_sets(
    vision_sets: Sequence[np.ndarray], text_sets: Sequence[np.ndarray]
) -> np.ndarray:
    """(La, Lb) mutual kNN from every layer's (n, k) neighbour sets."""
    n, k = vision_sets[0].shape
    shared = _neighbour_indicators(vision_sets) @ _neighbour_indicators(text_sets).T
    return shared.toarray() / (n * k)
