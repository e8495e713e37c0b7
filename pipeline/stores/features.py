"""The feature store: one Zarr v3 store per (encoder, dataset, split), every layer pooled.

Layout of ``<name>.zarr`` (docs/formats.md, "Feature store"; blocks, checksums, markers and
shards: ``pipeline.stores.core``)::

    layers/<i>        float32 (n_samples, dim_i), chunked along samples only (one chunk per
                      block), dimension names ("sample", "dim"); ("sample", "dim_<i>") when
                      layer widths differ, so xarray opens the group as one Dataset
    layers/sample     str (n_samples,): the sample ids again, the Dataset's "sample" coordinate
    sample_id         str (n_samples,), the dataset's stable ids in row order
    block_complete    bool (n_blocks,), one chunk each; True once all layers of a block are written
    zarr.json         attributes: encoder and dataset provenance, fingerprint, request, layer
                      names, dims, ``complete``, ...

A missing chunk would read as the fill value (NaN: what xarray or dask read for one), so
the readers here (``FeatureStore.layer`` / ``read``) check that every chunk they touch exists
with the size recorded when it was written (``core.BlockFiles``), wrap any decoding error,
and check that the values they return are finite; each failure is a ``StoreIntegrityError``
naming the store, the layer, the rows and the chunk file. The writer refuses NaN or infinite
values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.stores.core import (
    DENSE,
    SHOWN_ROWS,
    BlockFiles,
    BlockStoreWriter,
    CorruptChunkError,
    NonFiniteValuesError,
    StoreIntegrityError,
    StoreReader,
    chunk_codecs,
    create_group,
    marker_path,
    small_array,
)
from pipeline.stores.keys import FEATURES

MIN_CHUNK_BYTES = 1 << 20  # docs/formats.md: chunks of at least 1 MB


def rows_per_chunk(n_samples: int, dims: Sequence[int], chunk_bytes: int = MIN_CHUNK_BYTES) -> int:
    """Rows per chunk so that the narrowest layer's chunk holds >= ``chunk_bytes`` of float32."""
    rows = math.ceil(chunk_bytes / (4 * min(dims)))
    return max(1, min(rows, n_samples))


def _damaged(path: Path) -> str:
    """The repair hint of a damaged store."""
    return (
        "the store is damaged: extract it again from scratch "
        f"(snakemake --force {marker_path(Path(path))})"
    )


def _rows_text(rows: Sequence[int] | range) -> str:
    if isinstance(rows, range):
        return f"rows {rows.start}-{rows.stop - 1}" if len(rows) else "no rows"
    shown = ", ".join(str(int(r)) for r in rows[:SHOWN_ROWS])
    return f"rows {shown}" + (
        f" and {len(rows) - SHOWN_ROWS} more" if len(rows) > SHOWN_ROWS else ""
    )


def _nonfinite_rows(values: np.ndarray) -> np.ndarray:
    """Indices of the rows of a 2-D array that hold a NaN or an infinity."""
    return np.flatnonzero(~np.isfinite(values).all(axis=1))


class CheckedLayer:
    """One layer of a store that reads like a ``zarr.Array`` and verifies what it reads.

    ``layer[...]``, ``layer.oindex[...]``, ``layer.vindex[...]`` and ``np.asarray(layer)``
    return what the Zarr array would, after checking that every chunk they touch exists with
    its recorded size (``files``: Zarr reads a missing chunk as the fill value), turning a
    decoding error into a ``CorruptChunkError`` and refusing NaN or infinite values; errors
    name the store, the layer, the rows and the chunk file. Other attributes (``shape``,
    ``dtype``, ``chunks``, ...) are the array's; ``.array`` is the bare Zarr array.
    """

    def __init__(
        self, store_path: Path, index: int, name: str, array: zarr.Array, files: BlockFiles
    ) -> None:
        self.array = array
        self.store_path = Path(store_path)
        self.index, self.name = index, name
        self.files = files  # row chunk b of layer i is block b's i-th file
        self.rows_per_chunk = int(array.chunks[0])
        self.n_chunks = math.ceil(array.shape[0] / self.rows_per_chunk) if array.shape[0] else 0
        self.oindex = _CheckedIndexer(self, lambda selection: array.oindex[selection])
        self.vindex = _CheckedIndexer(self, lambda selection: array.vindex[selection])

    def __getattr__(self, attribute: str) -> Any:
        if attribute == "array":  # not yet set (copy, unpickling): no recursion
            raise AttributeError(attribute)
        return getattr(self.array, attribute)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def ndim(self) -> int:
        return self.array.ndim

    def __len__(self) -> int:
        return self.array.shape[0]

    def __repr__(self) -> str:
        return f"<CheckedLayer {self.where} shape={self.shape}>"

    def __getitem__(self, selection: Any) -> np.ndarray:
        return self.checked_read(selection, self.array.__getitem__)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        values = self[...]
        return values if dtype is None else values.astype(dtype, copy=False)

    @property
    def where(self) -> str:
        return f"feature store {self.store_path}, layer {self.index} ({self.name})"

    def chunk_rows(self, chunk: int) -> range:
        start = chunk * self.rows_per_chunk
        return range(start, min(start + self.rows_per_chunk, self.array.shape[0]))

    def checked_read(self, selection: Any, fetch: Callable[[Any], Any]) -> Any:
        """``fetch(selection)``, verified: chunks present with their sizes, decodable, values
        finite."""
        chunks = self._chunks_of(selection)
        self._require_files(chunks)
        try:
            values = fetch(selection)
        except (IndexError, TypeError):  # a bad selection, not a bad chunk
            raise
        except Exception:
            self.check_chunks(chunks)  # raises the chunk's own error, if a chunk is the cause
            raise
        if not np.isfinite(values).all():
            self.check_chunks(chunks)
            raise NonFiniteValuesError(
                f"{self.where}: NaN or infinite values read; {_damaged(self.store_path)}",
                path=self.store_path,
                array=self.name,
            )
        return values

    def check_chunks(self, chunks: Iterable[int]) -> None:
        """Read row chunks one by one and raise the first problem found."""
        for chunk in chunks:
            self.check_chunk(int(chunk))

    def check_chunk(self, chunk: int) -> None:
        """Raise a ``StoreIntegrityError`` unless row chunk ``chunk`` exists with its recorded
        size, decodes and is finite."""
        rows = self.chunk_rows(chunk)
        self._require_files([chunk])
        try:
            values = self.array[rows.start : rows.stop]
        except Exception as error:
            file = self.store_path / self.files.keys(chunk)[self.index]
            raise CorruptChunkError(
                f"{self.where}, {_rows_text(rows)}: chunk {file} cannot be decoded "
                f"({type(error).__name__}: {error}); {_damaged(self.store_path)}",
                path=self.store_path,
                array=self.name,
                rows=rows,
            ) from error
        bad = _nonfinite_rows(values)
        if len(bad):
            rows_bad = rows.start + bad
            raise NonFiniteValuesError(
                f"{self.where}: NaN or infinite values in {_rows_text(rows_bad)}"
                f"{_sample_ids_text(self.store_path, rows_bad)}; {_damaged(self.store_path)}",
                path=self.store_path,
                array=self.name,
                rows=range(int(rows_bad[0]), int(rows_bad[-1]) + 1),
            )

    def problems(self) -> list[StoreIntegrityError]:
        """Every damaged row chunk of the layer (missing, undecodable, not finite)."""
        found = []
        for chunk in range(self.n_chunks):
            try:
                self.check_chunk(chunk)
            except StoreIntegrityError as error:
                found.append(error)
        return found

    def _require_files(self, chunks: Iterable[int]) -> None:
        """Each chunk's file exists with the size recorded when it was written."""
        for chunk in chunks:
            rows = self.chunk_rows(int(chunk))
            self.files.check(int(chunk), self.where, rows, _damaged(self.store_path), [self.index])

    def _chunks_of(self, selection: Any) -> np.ndarray | range:
        """Row chunks a selection touches (every chunk when the selection is unusual)."""
        n, per = self.array.shape[0], self.rows_per_chunk
        first = selection[0] if isinstance(selection, tuple) and selection else selection
        if isinstance(selection, tuple) and not selection:
            first = slice(None)
        if first is Ellipsis:
            first = slice(None)
        if isinstance(first, int | np.integer):
            row = int(first)
            return range(row % n // per, row % n // per + 1) if -n <= row < n else range(0)
        if isinstance(first, slice):
            start, stop, step = first.indices(n)
            if step == 1:
                return range(start // per, (stop - 1) // per + 1) if stop > start else range(0)
            return np.unique(np.arange(start, stop, step) // per)
        rows = np.asarray(first)
        if rows.dtype == bool:
            rows = np.flatnonzero(
                rows.any(axis=tuple(range(1, rows.ndim))) if rows.ndim > 1 else rows
            )
        elif rows.dtype.kind in "iu":
            rows = rows.ravel()
            rows = rows[(rows >= -n) & (rows < n)] % n  # out-of-range rows: Zarr's IndexError
        else:
            return range(self.n_chunks)
        return np.unique(rows // per)


class _CheckedIndexer:
    """``layer.oindex`` / ``layer.vindex`` of a ``CheckedLayer``."""

    def __init__(self, layer: CheckedLayer, fetch: Callable[[Any], Any]) -> None:
        self.layer, self.fetch = layer, fetch

    def __getitem__(self, selection: Any) -> np.ndarray:
        return self.layer.checked_read(selection, self.fetch)


def _sample_ids_text(path: Path, rows: np.ndarray) -> str:
    """`` (sample ids a, b)`` for error messages; empty when the ids cannot be read."""
    try:
        ids = zarr.open_array(path / "sample_id", mode="r").oindex[np.asarray(rows[:SHOWN_ROWS])]
    except Exception:
        return ""
    return " (sample ids " + ", ".join(str(i) for i in ids.tolist()) + ")"


class FeatureStore(StoreReader):
    """Read access to a feature store; every read is verified (see ``CheckedLayer``)."""

    fmt = FEATURES
    required = ("layer_names", "dims", "n_samples")
    ids = "sample_id"

    @property
    def layer_names(self) -> list[str]:
        return list(self.attrs["layer_names"])

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def dims(self) -> list[int]:
        return list(self.attrs["dims"])

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._checked_layer = cache(self._open_layer)

    def raw_layer(self, index: int) -> zarr.Array:
        """The bare Zarr array of a layer: no presence or finiteness checks (crc32c still)."""
        if not -self.num_layers <= index < self.num_layers:
            raise IndexError(
                f"{self.path}: layer {index} does not exist (the store has {self.num_layers})"
            )
        return self.group[f"layers/{index % self.num_layers}"]

    def layer(self, index: int) -> CheckedLayer:
        """A layer, read like a ``zarr.Array``, every read verified (opened once)."""
        self.raw_layer(index)  # the index is checked
        return self._checked_layer(index % self.num_layers)

    def _open_layer(self, index: int) -> CheckedLayer:
        name, array = self.layer_names[index], self.raw_layer(index)
        return CheckedLayer(self.path, index, name, array, self.files)

    def read(self, index: int, rows: np.ndarray | None = None) -> np.ndarray:
        """One layer as float32, all rows or the given rows (in the given order)."""
        array = self.layer(index)
        if rows is None:
            return array[:]
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        values = np.empty((len(rows), array.shape[1]), dtype=np.float32)
        values[order] = array.oindex[rows[order], :]
        return values

    def sample_ids(self) -> np.ndarray:
        try:
            ids = self.group["sample_id"]
            if not all((self.path / "sample_id" / key).is_file() for key in _chunk_keys(ids)):
                raise FileNotFoundError("a chunk of sample_id is missing")
            values = np.asarray(ids[:].tolist(), dtype=str)
        except Exception as error:
            raise CorruptChunkError(
                f"feature store {self.path}: sample_id cannot be read "
                f"({type(error).__name__}: {error})",
                path=self.path,
                array="sample_id",
            ) from error
        return values

    def block_problems(self) -> list[StoreIntegrityError]:
        found = []
        for index in range(self.num_layers):
            try:
                layer = self.layer(index)
            except Exception as error:
                found.append(self.problem(f"layer {index} cannot be opened ({error})", str(index)))
                continue
            expected = (self.n_samples, self.dims[index])
            if layer.shape != expected:
                found.append(self.problem(f"layer {index} has shape {layer.shape}, not {expected}"))
                continue
            found += layer.problems()
        return found


def _chunk_keys(array: zarr.Array) -> list[str]:
    """Keys (relative to the array) of every chunk of an array."""
    grid = [range(math.ceil(s / c)) for s, c in zip(array.shape, array.chunks, strict=True)]
    return [
        array.metadata.encode_chunk_key(tuple(coords)) for coords in np.ndindex(*map(len, grid))
    ]


class FeatureWriter(BlockStoreWriter):
    """Creates a feature store, or resumes one with the same fingerprint, and writes it block
    by block (``write_block``, or row by row with ``add``)."""

    fmt = FEATURES

    def __init__(self, path: Path, group: zarr.Group) -> None:
        super().__init__(path, group)
        self.layers = [
            group[f"layers/{i}"].with_config(DENSE) for i in range(len(group.attrs["layer_names"]))
        ]
        self.block_rows = int(self.layers[0].chunks[0])

    @classmethod
    def create_or_resume(
        cls,
        path: str | Path,
        *,
        fingerprint: str,
        sample_ids: Sequence[str],
        layer_names: Sequence[str],
        dims: Sequence[int],
        attrs: dict[str, Any],
        on_stale: str = "recompute",
        chunk_bytes: int = MIN_CHUNK_BYTES,
        fresh: bool = False,
        shared: bool = False,
    ) -> FeatureWriter:
        """Open ``path`` for writing (``BlockStoreWriter.open_writer``); a store is resumed
        only with the same rows, widths and blocks (``runtime.chunk_mb``)."""
        path = Path(path)
        rows = rows_per_chunk(len(sample_ids), dims, chunk_bytes)
        shape = (len(sample_ids), [int(d) for d in dims], rows)

        def same_shape(existing: dict[str, Any]) -> bool:
            return (
                existing.get("n_samples"),
                existing.get("dims"),
                existing.get("block_rows"),
            ) == shape

        def create() -> zarr.Group:
            return _create(path, fingerprint, sample_ids, layer_names, dims, rows, attrs)

        return cls.open_writer(
            path,
            fingerprint,
            create,
            same_shape,
            on_stale=on_stale,
            fresh=fresh,
            shared=shared,
            attrs=attrs,
        )

    def rows_of(self, block: int) -> range:
        return range(block * self.block_rows, min((block + 1) * self.block_rows, self.n_samples))

    def block_of(self, row: int) -> int:
        return row // self.block_rows

    def pending_blocks(self, blocks: Iterable[int] | None = None) -> list[tuple[int, int, int]]:
        """(block, first row, end row) of every block (of ``blocks``) not yet written."""
        return [
            (b, rows.start, rows.stop)
            for b in self.missing_blocks(blocks)
            for rows in [self.rows_of(b)]
        ]

    def block_values(self, rows: list[list[np.ndarray]]) -> list[np.ndarray]:
        """Per layer, the rows ``add`` collected, stacked."""
        return [np.stack(layer) for layer in zip(*rows, strict=True)]

    def write_block(self, block: int, per_layer: Sequence[np.ndarray]) -> None:
        """Write one block of every layer, then its flag; NaN or infinite values are refused."""
        start, stop = self.rows_of(block).start, self.rows_of(block).stop
        if len(per_layer) != len(self.layers):
            raise ValueError(
                f"{self.path}: {len(per_layer)} layers given, the store has {len(self.layers)}"
            )
        for index, (array, values) in enumerate(zip(self.layers, per_layer, strict=True)):
            if values.shape != (stop - start, array.shape[1]):
                raise ValueError(
                    f"{self.path}: block {block} of layer {index} has shape {values.shape}, "
                    f"expected {(stop - start, array.shape[1])}"
                )
            if len(bad := _nonfinite_rows(values)):
                self._refuse_nonfinite(index, start + bad)
        for array, values in zip(self.layers, per_layer, strict=True):
            array[start:stop] = values
        self.mark_written(block)

    def _refuse_nonfinite(self, index: int, rows: np.ndarray) -> None:
        encoder = self.group.attrs.get("encoder", {})
        name = encoder.get("name", "?") if isinstance(encoder, dict) else "?"
        ids = np.asarray(self.group["sample_id"].oindex[rows[:SHOWN_ROWS]]).tolist()
        raise NonFiniteValuesError(
            f"encoder {name!r}, layer {index} ({self.group.attrs['layer_names'][index]}): NaN or "
            f"infinite values for {len(rows)} samples, sample ids {', '.join(map(str, ids))}"
            f"{' ...' if len(rows) > SHOWN_ROWS else ''} ({_rows_text(rows)}); refusing to "
            f"write them to {self.path}",
            path=self.path,
            array=self.group.attrs["layer_names"][index],
            rows=range(int(rows[0]), int(rows[-1]) + 1),
        )

    def damaged_blocks(self, blocks: Iterable[int] | None = None) -> dict[int, StoreIntegrityError]:
        """Flagged blocks (or the given ones) whose chunks are missing, corrupt or not finite."""
        blocks = np.flatnonzero(self.flags[:]) if blocks is None else blocks
        names = self.group.attrs["layer_names"]
        files = BlockFiles(self.path, self.group)  # the sizes as recorded now
        damaged: dict[int, StoreIntegrityError] = {}
        for index, array in enumerate(self.layers):
            layer = CheckedLayer(self.path, index, names[index], array, files)
            for block in blocks:
                if block in damaged:
                    continue
                try:
                    layer.check_chunk(int(block))
                except StoreIntegrityError as error:
                    damaged[int(block)] = error
        return damaged


def _create(
    path: Path,
    fingerprint: str,
    sample_ids: Sequence[str],
    layer_names: Sequence[str],
    dims: Sequence[int],
    rows: int,
    attrs: dict[str, Any],
) -> zarr.Group:
    n = len(sample_ids)
    if len(layer_names) != len(dims):
        raise ValueError(f"{path}: {len(layer_names)} layer names but {len(dims)} dims")
    layer_attrs = {
        "layer_names": list(layer_names),
        "dims": [int(d) for d in dims],
        "n_samples": n,
        "block_rows": rows,
    }
    same_width = len(set(dims)) == 1
    ids = np.asarray(sample_ids, dtype=str)

    def arrays(group: zarr.Group) -> None:
        for i, dim in enumerate(dims):
            group.create_array(
                f"layers/{i}",
                shape=(n, dim),
                chunks=(rows, dim),
                dtype="float32",
                dimension_names=("sample", "dim" if same_width else f"dim_{i}"),
                fill_value=np.nan,
                config=DENSE,
                **chunk_codecs(),
            )
        small_array(group, "sample_id", ids, "sample")
        # The same ids beside the layers, named after their dimension: xarray opens the
        # "layers" group with the sample ids as the "sample" coordinate.
        small_array(group, "layers/sample", ids, "sample")

    n_blocks = math.ceil(n / rows)
    block_arrays = [f"layers/{i}" for i in range(len(dims))]
    return create_group(
        path, FEATURES, fingerprint, n_blocks, arrays, block_arrays, attrs, layer_attrs
    )
