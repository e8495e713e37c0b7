"""The token cache: one Zarr v3 store per (encoder, dataset, split, layer). This module owns its
format (docs/formats.md, "Token store").

A token store holds every token of one layer for every sample of a split: CLS, registers and
patches of a ViT block (before the final norm, as the pooled stores read them), or every real
token of a text hidden state (no padding). Layout of ``layer_<i>.zarr``::

    tokens          float16 (n_slots, dim), dims ("token", "dim"), fill NaN: the tokens of all
                    samples, flat: sample i owns slots token_start[i] .. + token_count[i]
    token_start     int64 (n,), dims ("sample",)
    token_count     int32 (n,), dims ("sample",)
    sample          str (n,), dims ("sample",): the dataset's sample ids, the coordinate
    block_rows      int64 (n_blocks + 1,): block b holds rows block_rows[b] .. block_rows[b + 1]
    block_complete  bool (n_blocks,)
    block_bytes     int64 (n_blocks, 1): the byte size of each block's shard as written

Ragged, not padded: a caption takes as many slots as it has tokens, so a split's text costs
its mean length, not its longest (PAL's reference layout pads every caption to the dataset's
longest). Flat tokens + offsets beat per-chunk padding on both counts: no byte is spent on
padding at all, and a batch of rows is one gather, padded only to the batch's own longest
(``TokenStore.read``). Images all have the same token count, so a vision store is the same
layout with ``token_count`` constant (``tokens.reshape(n, T, dim)`` is the (sample, token, dim)
cube).

Sharded: ``tokens`` has one shard file per *block* (a run of whole samples; the unit of
writing and of resume) holding inner chunks of about 64 KiB (whole images for vision), each
compressed losslessly (bit-shuffled LZ4) and ending with a CRC-32C. A block starts at slot
``b * slots_per_block``; the few slots after its last sample are fill (NaN), never stored
(empty inner chunks are not written). Zarr writes a shard file atomically, and a block's
size record and flag are set after its shard, so a killed extraction leaves whole blocks
only and resumes from the first missing one: blocks, flags, size records, markers,
fingerprints, stale detection and shards are ``pipeline.stores.core``'s, as for the pooled
feature stores. Zarr reads a deleted or emptied shard as the fill value: NaN, never
plausible zeros, for a direct (xarray, dask, zarr) reader; ``TokenStore`` refuses it by
name before reading (``core.BlockFiles``).

Opening with xarray / dask::

    ds = xarray.open_zarr("layer_3.zarr")          # sample ids are the "sample" coordinate
    n = ds.token_count.sel(sample="shapes-test-000007").item()
    s = ds.token_start.sel(sample="shapes-test-000007").item()
    one = ds.tokens.isel(token=slice(s, s + n))    # (n tokens, dim) of that sample
    cube = dask.array.from_zarr(path, component="tokens").reshape(n_samples, T, dim)  # vision
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from pipeline import layout
from pipeline.stores.core import (
    SHOWN_ROWS,
    BlockStoreWriter,
    CorruptChunkError,
    NonFiniteValuesError,
    StoreIntegrityError,
    StoreReader,
    create_group,
    small_array,
)
from pipeline.stores.keys import TOKENS

DTYPES = ("float16", "float32")
INNER_CHUNK_BYTES = 64 << 10  # target size of an inner chunk (one read unit inside a shard)
CACHE_BYTES = 512 << 20  # decoded blocks a reader keeps (per store)
DENSE_READ = 4  # a read touching >= 1/DENSE_READ of a block's rows decodes (and caches) it all


# ---- block plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Where every sample's tokens go: ``token_start`` / ``token_count`` per row, the rows of
    each block (``block_rows``, n_blocks + 1 boundaries), slots per block (= one shard) and per
    inner chunk."""

    token_start: np.ndarray
    token_count: np.ndarray
    block_rows: np.ndarray
    slots_per_block: int
    chunk_slots: int

    @property
    def n_blocks(self) -> int:
        return len(self.block_rows) - 1

    @property
    def n_slots(self) -> int:
        return self.n_blocks * self.slots_per_block


def plan_blocks(
    counts: Sequence[int], dim: int, itemsize: int, shard_bytes: int, fixed: bool
) -> Plan:
    """Cut rows with ``counts`` tokens each into blocks of about ``shard_bytes``.

    Inner chunks are about ``INNER_CHUNK_BYTES`` (at most ``shard_bytes``). With ``fixed``
    (every sample has the same count T, e.g. images) they hold whole samples and blocks hold
    a whole number of them, so no slot is wasted. A block is at least one inner chunk and never
    smaller than the longest sample; rows are packed greedily in order, and the slots a block
    cannot fill with whole samples stay empty (fewer than the longest sample's count)."""
    counts = np.asarray(counts, dtype=np.int64)
    if len(counts) and counts.min() < 1:
        raise ValueError("every sample needs at least one token")
    longest = int(counts.max()) if len(counts) else 1
    token_bytes = dim * itemsize
    chunk_bytes = min(INNER_CHUNK_BYTES, shard_bytes)
    if fixed:
        if len(counts) and counts.min() != longest:
            raise ValueError(f"fixed token counts expected, got {counts.min()}..{longest}")
        chunk = longest * max(1, chunk_bytes // (longest * token_bytes))
    else:
        chunk = max(1, chunk_bytes // token_bytes)
    per_block = max(shard_bytes // token_bytes // chunk, math.ceil(longest / chunk), 1) * chunk
    starts = np.empty(len(counts), dtype=np.int64)
    boundaries = [0]
    used = 0
    for row, count in enumerate(counts.tolist()):
        if used + count > per_block:
            boundaries.append(row)
            used = 0
        starts[row] = (len(boundaries) - 1) * per_block + used
        used += count
    if len(counts):
        boundaries.append(len(counts))
    return Plan(starts, counts.astype(np.int32), np.asarray(boundaries, np.int64), per_block, chunk)


# ---- writing ------------------------------------------------------------------------------------


def _token_codecs(dtype: str) -> dict[str, Any]:
    """Bit-shuffled LZ4 (Blosc), then a CRC-32C: lossless, ~0.87 of float16 activations
    (a float's sign, exponent and mantissa bits compress apart), and fast enough (about 1 GB/s
    each way) not to slow a GPU extraction, where zstd alone gives ~0.92 at a third of it."""
    typesize = np.dtype(dtype).itemsize
    blosc = BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=typesize)
    return {"compressors": [blosc, Crc32cCodec()]}


class TokenWriter(BlockStoreWriter):
    """Creates a token store, or resumes one with the same fingerprint, and fills it block by
    block: ``add(row, tokens)`` in ascending row order writes each block once it is whole."""

    fmt = TOKENS

    def __init__(self, path: Path, group: zarr.Group) -> None:
        super().__init__(path, group)
        self.tokens = group["tokens"]
        self.block_rows = group["block_rows"][:]
        self.token_start = group["token_start"][:]
        self.token_count = group["token_count"][:].astype(np.int64)
        self.slots_per_block = int(group.attrs["slots_per_block"])
        self.dtype = np.dtype(group.attrs["dtype"])
        self.dim = int(group.attrs["dim"])

    @classmethod
    def create_or_resume(
        cls,
        path: str | Path,
        *,
        fingerprint: str,
        sample_ids: Sequence[str],
        plan: Plan,
        dim: int,
        dtype: str,
        attrs: dict[str, Any],
        on_stale: str = "recompute",
        fresh: bool = False,
        shared: bool = False,
    ) -> TokenWriter:
        """Open ``path`` for writing (``BlockStoreWriter.open_writer``); a store is resumed only
        with the same rows, token count and block plan."""
        path = Path(path)
        if dtype not in DTYPES:
            raise ValueError(f"token dtype {dtype!r} is not one of {DTYPES}")
        shape = (len(sample_ids), int(plan.token_count.sum()))

        def same_shape(existing: dict[str, Any]) -> bool:
            return (existing.get("n_samples"), existing.get("n_tokens")) == shape

        def same_plan(writer: TokenWriter) -> None:
            if not np.array_equal(writer.token_start, plan.token_start):
                raise ValueError("another block plan")

        def create() -> zarr.Group:
            return _create(path, fingerprint, sample_ids, plan, dim, dtype, attrs)

        return cls.open_writer(
            path,
            fingerprint,
            create,
            same_shape,
            on_stale=on_stale,
            fresh=fresh,
            shared=shared,
            check=same_plan,
            attrs=attrs,
        )

    def rows_of(self, block: int) -> range:
        return range(int(self.block_rows[block]), int(self.block_rows[block + 1]))

    def block_of(self, row: int) -> int:
        return int(np.searchsorted(self.block_rows, row, side="right") - 1)

    def add(self, row: int, tokens: np.ndarray) -> None:
        """The tokens (count, dim) of one row of a pending block (``BlockStoreWriter.add``)."""
        expected = (int(self.token_count[row]), self.dim)
        if tokens.shape != expected:
            raise ValueError(
                f"{self.path}: row {row} has tokens {tokens.shape}, the plan says {expected} "
                "(the tokenizer counted another length?)"
            )
        super().add(row, tokens)

    def write_block(self, block: int, rows: Sequence[np.ndarray]) -> None:
        """Write one block (the tokens of each of its rows, in order), then its flag. Values that
        are not finite once stored in the store's dtype (float16 overflows above 65504) are
        refused, naming the layer and the sample ids."""
        first, end = int(self.block_rows[block]), int(self.block_rows[block + 1])
        if len(rows) != end - first:
            raise ValueError(f"{self.path}: block {block} has {end - first} rows, got {len(rows)}")
        values = np.full((self.slots_per_block, self.dim), np.nan, dtype=self.dtype)  # tail: fill
        offset = block * self.slots_per_block
        with np.errstate(over="ignore", invalid="ignore"):  # checked just below
            for row, tokens in zip(range(first, end), rows, strict=True):
                start = int(self.token_start[row]) - offset
                values[start : start + len(tokens)] = tokens
        used = int(self.token_start[end - 1] + self.token_count[end - 1]) - offset
        if not np.isfinite(values[:used]).all():
            bad = [
                row
                for row in range(first, end)
                if not np.isfinite(
                    values[_slots([self.token_start[row] - offset], [self.token_count[row]])]
                ).all()
            ]
            self._refuse_nonfinite(np.asarray(bad))
        self.tokens[offset : offset + self.slots_per_block] = values
        self.mark_written(block)

    def _refuse_nonfinite(self, rows: np.ndarray) -> None:
        ids = np.asarray(self.group["sample"].oindex[rows[:SHOWN_ROWS]]).tolist()
        layer = self.group.attrs.get("layer_name", self.group.attrs.get("layer"))
        raise NonFiniteValuesError(
            f"encoder {self.group.attrs['encoder'].get('name', '?')!r}, layer {layer}: NaN or "
            f"infinite tokens as {self.dtype} for {len(rows)} samples, sample ids "
            f"{', '.join(map(str, ids))}{' ...' if len(rows) > SHOWN_ROWS else ''}; refusing to "
            f"write them to {self.path}"
            + (
                " (float16 holds at most 65504: set tokens.dtype: float32)"
                if self.dtype == np.float16
                else ""
            ),
            path=self.path,
            array="tokens",
            rows=range(int(rows[0]), int(rows[-1]) + 1),
        )

    def damaged_blocks(self, blocks: Iterable[int] | None = None) -> dict[int, StoreIntegrityError]:
        """Flagged blocks (or the given ones) whose shard is missing or not of its recorded size,
        does not decode, or holds non-finite values."""
        reader = TokenStore(self.path)
        found = {}
        for block in np.flatnonzero(self.flags[:]) if blocks is None else blocks:
            try:
                reader.check_block(int(block))
            except StoreIntegrityError as error:
                found[int(block)] = error
        return found

    def marker_fields(self) -> dict[str, Any]:
        return {"layer": self.group.attrs["layer"]}


def _create(
    path: Path,
    fingerprint: str,
    sample_ids: Sequence[str],
    plan: Plan,
    dim: int,
    dtype: str,
    attrs: dict[str, Any],
) -> zarr.Group:
    n = len(sample_ids)
    if len(plan.token_count) != n:
        raise ValueError(f"{path}: {n} sample ids but a plan of {len(plan.token_count)} rows")

    def arrays(group: zarr.Group) -> None:
        group.create_array(
            "tokens",
            shape=(plan.n_slots, dim),
            chunks=(plan.chunk_slots, dim),
            shards=(plan.slots_per_block, dim),
            dtype=dtype,
            fill_value=np.nan,  # a missing shard reads as NaN, not as plausible zeros
            dimension_names=("token", "dim"),
            config={"write_empty_chunks": False},  # a block's unused tail is not stored
            **_token_codecs(dtype),
        )
        small_array(group, "token_start", plan.token_start, "sample")
        small_array(group, "token_count", plan.token_count, "sample")
        small_array(group, "block_rows", plan.block_rows, "block_edge")
        small_array(group, "sample", np.asarray(sample_ids, dtype=str), "sample")

    layout_attrs = {
        "dim": int(dim),
        "dtype": dtype,
        "n_samples": n,
        "n_tokens": int(plan.token_count.sum()),
        "slots_per_block": plan.slots_per_block,
    }
    return create_group(
        path, TOKENS, fingerprint, plan.n_blocks, arrays, ["tokens"], attrs, layout_attrs
    )


# ---- reading ------------------------------------------------------------------------------------


class TokenStore(StoreReader):
    """Read access to a token store; every read is verified (shards present with their recorded
    sizes, decodable, finite).

    ``read(rows)`` gives ``(tokens, mask)``: float32 (len(rows), T, dim) padded to the longest of
    those rows, and bool (len(rows), T). Blocks are decoded whole and kept (up to
    ``CACHE_BYTES``, least recently used dropped first) when the whole store fits that budget
    or a read touches a block densely; other reads fetch just their inner chunks. Memory
    stays bounded whatever the store's size."""

    fmt = TOKENS
    required = ("layer", "dim", "n_samples")
    ids = "sample"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cached_bytes = 0

    @cached_property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def layer(self) -> int:
        return int(self.attrs["layer"])

    @property
    def dim(self) -> int:
        return int(self.attrs["dim"])

    def __len__(self) -> int:
        return self.n_samples

    @property
    def where(self) -> str:
        return f"token store {self.path} (layer {self.attrs.get('layer')})"

    @property
    def job_marker(self) -> Path:
        """The store is made by its token set's job, whose output is the set's marker."""
        return Path(layout.store_marker(str(self.path.parent)))

    @cached_property
    def tokens(self) -> zarr.Array:
        return self.group["tokens"]

    @cached_property
    def token_start(self) -> np.ndarray:
        return self._small("token_start").astype(np.int64)

    @cached_property
    def token_count(self) -> np.ndarray:
        return self._small("token_count").astype(np.int64)

    @cached_property
    def block_rows(self) -> np.ndarray:
        return self._small("block_rows").astype(np.int64)

    @property
    def slots_per_block(self) -> int:
        return int(self.attrs["slots_per_block"])

    @property
    def n_blocks(self) -> int:
        return len(self.block_rows) - 1

    @cached_property
    def fits_cache(self) -> bool:
        """Whether every block fits the cache at once: then any read decodes whole blocks,
        each once (a small store is read from memory after its first pass)."""
        return int(self.attrs["n_tokens"]) * self.dim * self.tokens.dtype.itemsize <= CACHE_BYTES

    def sample_ids(self) -> np.ndarray:
        return np.asarray(self._small("sample").tolist(), dtype=str)

    def _small(self, name: str) -> np.ndarray:
        try:
            array = self.group[name]
            key = array.metadata.encode_chunk_key((0,))
            if array.shape[0] and not (self.path / name / key).is_file():
                raise FileNotFoundError(f"chunk {name}/{key} is missing")
            return array[:]
        except Exception as error:
            raise CorruptChunkError(
                f"{self.where}: {name} cannot be read ({type(error).__name__}: {error}); "
                f"extract it again (snakemake --force on its extract_tokens job)",
                path=self.path,
                array=name,
            ) from error

    # -- blocks --

    def block_of(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.block_rows, rows, side="right") - 1

    def _fetch(self, block: int, selection: Any) -> np.ndarray:
        """Read from ``tokens`` inside ``block``, verified: its shard present with its recorded
        size (``core.BlockFiles``), decodable, finite."""
        rows = range(int(self.block_rows[block]), int(self.block_rows[block + 1]))
        if len(rows):
            self.files.check(block, self.where, rows, self.rerun)
        try:
            values = selection()
        except Exception as error:
            [shard] = self.files.keys(block)
            raise CorruptChunkError(
                f"{self.where}, rows {rows.start}-{rows.stop - 1}: shard {self.path / shard} "
                f"cannot be decoded ({type(error).__name__}: {error}); {self.rerun}",
                path=self.path,
                array="tokens",
                rows=rows,
            ) from error
        if not np.isfinite(values).all():
            raise NonFiniteValuesError(
                f"{self.where}, rows {rows.start}-{rows.stop - 1}: NaN or infinite tokens",
                path=self.path,
                array="tokens",
                rows=rows,
            )
        return values

    def _used_slots(self, block: int) -> range:
        """The slots of ``block`` its samples fill (the rest is fill, NaN)."""
        start = block * self.slots_per_block
        first, end = self.block_rows[block], self.block_rows[block + 1]
        if end == first:
            return range(start, start)
        return range(start, int(self.token_start[end - 1] + self.token_count[end - 1]))

    def _block_values(self, block: int) -> np.ndarray:
        """The used slots of one block, decoded (cached, least recently used dropped first)."""
        if block in self._cache:
            self._cache.move_to_end(block)
            return self._cache[block]
        used = self._used_slots(block)
        values = self._fetch(block, lambda: self.tokens[used.start : used.stop])
        self._cache[block] = values
        self._cached_bytes += values.nbytes
        while self._cached_bytes > CACHE_BYTES and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._cached_bytes -= dropped.nbytes
        return values

    def check_block(self, block: int) -> None:
        """Raise a ``StoreIntegrityError`` unless block ``block``'s shard is present with its
        recorded size, decodes and its used slots are finite."""
        used = self._used_slots(block)
        self._fetch(block, lambda: self.tokens[used.start : used.stop])

    # -- rows --

    def flat(self, rows: np.ndarray) -> np.ndarray:
        """The tokens of ``rows`` (any order, repeats allowed) one after the other, (sum, dim),
        in the store's dtype."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n_samples):
            raise IndexError(f"{self.where}: rows outside 0..{self.n_samples - 1}")
        unique, inverse = np.unique(rows, return_inverse=True)
        counts = self.token_count[unique]
        parts: list[np.ndarray] = []
        blocks = self.block_of(unique)
        for block in np.unique(blocks):
            block = int(block)
            in_block = unique[blocks == block]
            n_rows = self.block_rows[block + 1] - self.block_rows[block]
            if block in self._cache or self.fits_cache or len(in_block) * DENSE_READ >= n_rows:
                values = self._block_values(block)
                offset = block * self.slots_per_block
                parts.append(
                    values[_slots(self.token_start[in_block] - offset, self.token_count[in_block])]
                )
            else:
                index = _slots(self.token_start[in_block], self.token_count[in_block])
                parts.append(self._fetch(block, lambda index=index: self.tokens.oindex[index, :]))
        tokens = np.concatenate(parts) if parts else np.zeros((0, self.dim), self.tokens.dtype)
        if np.array_equal(unique, rows):
            return tokens
        ends = np.cumsum(counts)
        return tokens[_slots(ends[inverse] - counts[inverse], counts[inverse])]

    def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tokens float32 (len(rows), T, dim) zero-padded, mask bool (len(rows), T)), T the
        longest of ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        counts = self.token_count[rows] if len(rows) else np.zeros(0, np.int64)
        longest = int(counts.max()) if len(counts) else 0
        mask = np.arange(longest)[None, :] < counts[:, None]
        flat = self.flat(rows)
        if len(counts) and counts.min() == longest:  # images: no padding at all
            return flat.reshape(len(rows), longest, self.dim).astype(np.float32), mask
        tokens = np.zeros((len(rows) * longest, self.dim), dtype=np.float32)
        tokens[_slots(np.arange(len(rows)) * longest, counts)] = flat
        return tokens.reshape(len(rows), longest, self.dim), mask

    def block_problems(self) -> list[StoreIntegrityError]:
        try:
            for name in ("token_start", "token_count", "block_rows"):
                getattr(self, name)
        except StoreIntegrityError as error:
            return [error]
        found = []
        for block in range(self.n_blocks):
            try:
                self.check_block(block)
            except StoreIntegrityError as error:
                found.append(error)
        return found


def _slots(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The concatenated ranges starts[i] .. starts[i] + counts[i] (vectorised)."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(np.asarray(starts, np.int64) - np.cumsum(counts) + counts, counts)
    return offsets + np.arange(total, dtype=np.int64)


# ---- token sources (pipeline.align.pal.TokenSource) ----------------------------------------------


class StoreTokens:
    """A ``TokenSource`` over a token store: source row i is store row ``rows[i]`` (all rows when
    ``rows`` is None). Pairs index images by row, so one image row may appear many times."""

    def __init__(self, store: TokenStore, rows: np.ndarray | None = None) -> None:
        self.store = store
        self.rows = None if rows is None else np.asarray(rows, dtype=np.int64)

    def __len__(self) -> int:
        return self.store.n_samples if self.rows is None else len(self.rows)

    def __getitem__(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = np.asarray(index, dtype=np.int64)
        return self.store.read(index if self.rows is None else self.rows[index])

    def subset(self, index: np.ndarray) -> StoreTokens:
        """The source of rows ``index`` of this one (sharing the store and its cache)."""
        index = np.asarray(index, dtype=np.int64)
        return StoreTokens(self.store, index if self.rows is None else self.rows[index])
