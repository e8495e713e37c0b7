"""The feature store: one Zarr v3 store per (encoder, dataset, split). This module owns its format.

Layout of ``<name>.zarr``::

    layers/<i>        float32 (n_samples, dim_i), chunked along samples only,
                      dimension names ("sample", "dim"); ("sample", "dim_<i>") when
                      layer widths differ, so xarray opens the group as one Dataset
    layers/sample     str (n_samples,): the sample ids again, the Dataset's "sample" coordinate
    sample_id         str (n_samples,), the dataset's stable ids in row order
    block_complete    bool (n_blocks,), one chunk each; True once all layers of a block are written
    zarr.json         attributes: encoder and dataset provenance, fingerprint, layer names,
                      ``complete`` (True once a run has finished the store), ...

and beside it the completion marker ``<name>.zarr.done`` (JSON), written last. The marker is
what Snakemake declares as the job's output: Snakemake deletes declared outputs before a job
runs, so declaring the store itself would throw away the blocks a killed run had finished.

Rows are written in blocks of one chunk. Zarr writes each chunk file atomically, and a
block's flag is set only after all its layers are written, so after a SIGKILL at any
moment the store holds whole blocks only and extraction resumes from the first missing one.
A store whose fingerprint differs from the expected one is never reused.

Integrity (format 2). Every chunk ends with a CRC-32C of its stored bytes (the Zarr v3
``crc32c`` codec, last in the codec chain), so Zarr itself, and therefore xarray and dask
too, refuses a corrupt or truncated chunk. A missing chunk would read as the fill value, so
the readers here (``FeatureStore.layer`` / ``read``) check that every chunk they touch
exists, wrap any decoding error, and check that the values they return are finite; each
failure is a ``StoreIntegrityError`` naming the store, the layer and the rows. The writer
refuses NaN or infinite values, and ``finalize`` reads the whole store back before it writes
the marker, so a marker never stands beside a damaged store.

Sharded. With ``runtime.extract_shards`` > 1 several jobs write disjoint runs of blocks of one
store (``shard_blocks``), taking turns at creating it under a lock (``lock_path``), and a last
job finishes it (``pipeline.extract.finish_shards``; docs/formats.md, "Sharded extraction").

Killed or forced. A killed run leaves ``complete: false``; the next run resumes it (after
un-flagging any finished block whose chunks no longer verify). A store with ``complete:
true`` whose marker is gone was finished before and is being made again on purpose (Snakemake
deletes the marker of a forced job): it is recomputed from scratch, as with ``fresh=True``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from pipeline import atomic
from pipeline.fingerprint import spec_hash

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: crc32c on every chunk, finite values only, 'complete' marks a finish
MIN_CHUNK_BYTES = 1 << 20  # docs/formats.md: chunks of at least 1 MB
SHOWN_ROWS = 5  # offending rows named in an error message


class StaleStoreError(RuntimeError):
    """A store on disk was made from a different configuration than the one asked for."""


class IncompleteStoreError(RuntimeError):
    """A store is missing its completion marker (extraction never finished)."""


class StoreIntegrityError(RuntimeError):
    """A store's contents are damaged or implausible; the message names store, array and rows."""

    def __init__(
        self, message: str, *, path: Path, array: str | None = None, rows: range | None = None
    ) -> None:
        super().__init__(message)
        self.path, self.array, self.rows = Path(path), array, rows


class MissingChunkError(StoreIntegrityError):
    """A chunk file of the store does not exist (Zarr would read the fill value)."""


class CorruptChunkError(StoreIntegrityError):
    """A chunk file exists but does not decode (checksum mismatch, truncation, ...)."""


class NonFiniteValuesError(StoreIntegrityError):
    """Features hold NaN or infinite values (read from a store, or about to be written)."""


def marker_path(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + ".done")


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
    return what the Zarr array would, after checking that every chunk they touch exists
    (Zarr reads a missing chunk as the fill value), turning a decoding error into a
    ``CorruptChunkError`` and refusing NaN or infinite values; errors name the store, the
    layer and the rows. Other attributes (``shape``, ``dtype``, ``chunks``, ...) are the
    array's; ``.array`` is the bare Zarr array.
    """

    def __init__(self, store_path: Path, index: int, name: str, array: zarr.Array) -> None:
        self.array = array
        self.store_path = Path(store_path)
        self.index, self.name = index, name
        self.rows_per_chunk = int(array.chunks[0])
        self.n_chunks = math.ceil(array.shape[0] / self.rows_per_chunk) if array.shape[0] else 0
        self._column_chunks = range(math.ceil(array.shape[1] / array.chunks[1]))
        self._present: set[int] = set()  # row chunks whose files were seen to exist
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

    def chunk_keys(self, chunk: int) -> list[str]:
        """Store keys of the chunk files holding row chunk ``chunk``, e.g. ``layers/0/c/3/0``."""
        encode = self.array.metadata.encode_chunk_key
        return [f"{self.array.path}/{encode((chunk, column))}" for column in self._column_chunks]

    def checked_read(self, selection: Any, fetch: Callable[[Any], Any]) -> Any:
        """``fetch(selection)``, verified: chunks present, decodable, values finite."""
        chunks = self._chunks_of(selection)
        self._require_present(chunks)
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
        """Raise a ``StoreIntegrityError`` unless row chunk ``chunk`` exists, decodes, is finite."""
        rows = self.chunk_rows(chunk)
        self._present.discard(chunk)
        self._require_present([chunk])
        try:
            values = self.array[rows.start : rows.stop]
        except Exception as error:
            raise CorruptChunkError(
                f"{self.where}, {_rows_text(rows)}: chunk {self.chunk_keys(chunk)[0]} cannot be "
                f"decoded ({type(error).__name__}: {error}); {_damaged(self.store_path)}",
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

    def _require_present(self, chunks: Iterable[int]) -> None:
        for chunk in chunks:
            chunk = int(chunk)
            if chunk in self._present:
                continue
            for key in self.chunk_keys(chunk):
                if not (self.store_path / key).is_file():
                    rows = self.chunk_rows(chunk)
                    raise MissingChunkError(
                        f"{self.where}, {_rows_text(rows)}: chunk {key} is missing (Zarr would "
                        f"read it as the fill value); {_damaged(self.store_path)}",
                        path=self.store_path,
                        array=self.name,
                        rows=rows,
                    )
            self._present.add(chunk)

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


@dataclass(frozen=True)
class FeatureStore:
    """Read access to a complete feature store; every read is verified (see ``CheckedLayer``)."""

    path: Path

    @cached_property
    def group(self) -> zarr.Group:
        return open_group_checked(self.path, "feature store")

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def fingerprint(self) -> str:
        return self.attrs["fingerprint"]

    @property
    def layer_names(self) -> list[str]:
        return list(self.attrs["layer_names"])

    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    @property
    def dims(self) -> list[int]:
        return list(self.attrs["dims"])

    @property
    def n_samples(self) -> int:
        return int(self.attrs["n_samples"])

    @cached_property
    def _layers(self) -> dict[int, CheckedLayer]:
        return {}

    def raw_layer(self, index: int) -> zarr.Array:
        """The bare Zarr array of a layer: no presence or finiteness checks (crc32c still)."""
        if not -self.num_layers <= index < self.num_layers:
            raise IndexError(
                f"{self.path}: layer {index} does not exist (the store has {self.num_layers})"
            )
        return self.group[f"layers/{index % self.num_layers}"]

    def layer(self, index: int) -> CheckedLayer:
        """A layer, read like a ``zarr.Array``, every read verified."""
        array = self.raw_layer(index)
        index %= self.num_layers
        if index not in self._layers:
            self._layers[index] = CheckedLayer(self.path, index, self.layer_names[index], array)
        return self._layers[index]

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

    def require_fingerprint(self, expected: str | None) -> None:
        """Raise ``StaleStoreError`` unless the store was made with the ``expected`` fingerprint."""
        if expected is not None and self.fingerprint != expected:
            raise StaleStoreError(
                f"feature store {self.path} has fingerprint {self.fingerprint[:12]}, the config "
                f"expects {expected[:12]}: it is stale, rerun the extract stage"
            )

    def integrity_problems(self) -> list[StoreIntegrityError]:
        """Everything wrong with the store's contents: attributes, flags, ids, every chunk."""

        def problem(text: str, array: str | None = None) -> StoreIntegrityError:
            return StoreIntegrityError(
                f"feature store {self.path}: {text}", path=self.path, array=array
            )

        try:
            attrs = self.attrs
        except StoreIntegrityError as error:
            return [error]
        missing = [k for k in ("fingerprint", "layer_names", "dims", "n_samples") if k not in attrs]
        if missing:
            return [problem(f"attributes {missing} are missing")]
        found = []
        if attrs.get("format_version") != FORMAT_VERSION:
            found.append(
                problem(
                    f"format version {attrs.get('format_version')} (this code writes "
                    f"{FORMAT_VERSION}): its chunks carry no checksums, extract it again"
                )
            )
        try:
            flags = self.group["block_complete"][:]
            if not flags.all():
                found.append(problem(f"{int((~flags).sum())} blocks are not written"))
        except Exception as error:
            found.append(problem(f"block_complete cannot be read ({error})", "block_complete"))
        try:
            if len(self.sample_ids()) != self.n_samples:
                found.append(problem(f"sample_id does not hold {self.n_samples} ids", "sample_id"))
        except StoreIntegrityError as error:
            found.append(error)
        for index in range(self.num_layers):
            try:
                layer = self.layer(index)
            except Exception as error:
                found.append(problem(f"layer {index} cannot be opened ({error})", str(index)))
                continue
            expected = (self.n_samples, self.dims[index])
            if layer.shape != expected:
                found.append(problem(f"layer {index} has shape {layer.shape}, not {expected}"))
                continue
            found += layer.problems()
        return found


def _chunk_keys(array: zarr.Array) -> list[str]:
    """Keys (relative to the array) of every chunk of an array."""
    grid = [range(math.ceil(s / c)) for s, c in zip(array.shape, array.chunks, strict=True)]
    return [
        array.metadata.encode_chunk_key(tuple(coords)) for coords in np.ndindex(*map(len, grid))
    ]


def request_hash(
    encoder_name: str, encoder_spec: dict[str, Any], dataset: str, split: str, precision: str
) -> str:
    """What a store is asked to hold, as the config says it: the expectation a reading stage
    checks without loading any model (the store's ``fingerprint`` adds what only extraction
    knows: weights checksums, preprocessing, the dataset's content hash)."""
    return spec_hash(
        {
            "format_version": FORMAT_VERSION,
            "encoder_name": encoder_name,
            "encoder": encoder_spec,
            "dataset": dataset,
            "split": split,
            "precision": precision,
        }
    )


def open_requested(path: str | Path, request: str, content_hash: str) -> FeatureStore:
    """Open a complete store for a reading stage that expects it to hold ``request``
    (``request_hash``) of the prepared dataset whose content hash is ``content_hash``."""
    store = open_store(path)
    attrs = store.attrs
    if attrs.get("request") != request:
        raise StaleStoreError(
            f"feature store {path} was extracted for another encoder spec, dataset, split or "
            "precision than this job's config asks for: run its extract_features job again "
            f"(snakemake --force {marker_path(Path(path))})"
        )
    if attrs["dataset"]["content_hash"] != content_hash:
        raise StaleStoreError(
            f"feature store {path} holds dataset content {attrs['dataset']['content_hash'][:12]},"
            f" the prepared dataset is now {content_hash[:12]}: run its extract_features job "
            f"again (snakemake --force {marker_path(Path(path))})"
        )
    return store


def open_store(path: str | Path, fingerprint: str | None = None) -> FeatureStore:
    """Open a complete store; refuse one that is unfinished, inconsistent with its marker, or
    (given the expected ``fingerprint``) made from another config."""
    path = Path(path)
    marker = marker_path(path)
    if not marker.exists():
        raise IncompleteStoreError(
            f"feature store {path} is incomplete (no {marker.name}): run the extract stage"
        )
    store = FeatureStore(path)
    try:
        marked = json.loads(marker.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError) as error:
        raise StoreIntegrityError(f"{marker} cannot be read ({error})", path=path) from error
    if marked != store.attrs.get("fingerprint"):
        raise StoreIntegrityError(
            f"feature store {path}: its marker {marker.name} and the store disagree on the "
            "fingerprint (the store was replaced after it was finished); extract it again",
            path=path,
        )
    store.require_fingerprint(fingerprint)
    return store


class BlockStoreWriter:
    """What a feature-store and a token-store writer share: per-block completion flags
    (``block_complete``), resume after a kill, and the checked finish that writes the marker.

    A subclass sets ``path``, ``group``, ``flags`` and ``kind`` and defines ``n_samples``,
    ``n_blocks``, ``pending_blocks(blocks)`` and ``damaged_blocks(blocks)`` (finished blocks,
    or the given ones, that do not verify)."""

    kind: str  # "feature store", "token store": for messages
    path: Path
    group: zarr.Group
    flags: zarr.Array

    @classmethod
    def open_existing(cls, path: str | Path) -> Any:
        """The store at ``path`` as its shard jobs left it, to finish it."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise IncompleteStoreError(f"{cls.kind} {path} does not exist: no shard wrote it")
        return cls(path, zarr.open_group(path, mode="r+"))

    @property
    def n_samples(self) -> int:
        raise NotImplementedError

    @property
    def n_blocks(self) -> int:
        raise NotImplementedError

    def damaged_blocks(self, blocks: Iterable[int] | None = None) -> dict[int, StoreIntegrityError]:
        raise NotImplementedError

    def unflag_damaged_blocks(self, blocks: Iterable[int] | None = None) -> list[int]:
        """Clear the flag of every finished block (of ``blocks``) that no longer verifies;
        returns them."""
        damaged = self.damaged_blocks(blocks)
        for block, error in sorted(damaged.items()):
            log.warning("%s: block %d will be written again: %s", self.path, block, error)
            self.flags[block] = False
        return sorted(damaged)

    def verify_blocks(self, blocks: Iterable[int] | None = None) -> None:
        """Raise unless every block (of ``blocks``) reads back intact; those that do not are
        un-flagged first, so the next run rewrites them."""
        if damaged := self.unflag_damaged_blocks(blocks):
            raise StoreIntegrityError(
                f"{self.path}: blocks {damaged} did not read back intact after writing (disk "
                "or file-system trouble?); run again to rewrite them",
                path=self.path,
            )

    def claim_shard(self, shard: tuple[int, int], fresh: bool) -> range:
        """The blocks shard ``shard`` = (k, n) writes (``shard_blocks``), its finished ones
        un-flagged when ``fresh`` (a shard run again) or when they no longer verify (a killed
        shard resuming). Other shards' blocks are not touched."""
        blocks = shard_blocks(self.n_blocks, *shard)
        flags = self.flags[:]
        written = [b for b in blocks if flags[b]]
        for block in written if fresh else self.damaged_blocks(written):
            self.flags[block] = False
        return blocks

    def _unfinished(self) -> str | None:
        """Why the store cannot be finished yet (None: every block is written)."""
        pending = self.pending_blocks()
        return f"{len(pending)} blocks are still missing" if pending else None

    def pending_blocks(self, blocks: Iterable[int] | None = None) -> list[Any]:
        raise NotImplementedError

    def finalize(self, summary: dict[str, Any] | None = None, verify: bool = True) -> None:
        """Check every block is written and (``verify``) reads back intact, then write the
        completion marker (last). Blocks that do not verify are un-flagged before the error,
        so the next run rewrites them."""
        if problem := self._unfinished():
            raise IncompleteStoreError(f"{self.path}: {problem}")
        if verify:
            self.verify_blocks()
        finished = datetime.now(UTC).isoformat(timespec="seconds")
        self.group.attrs.update({"complete": True, "completed_at": finished})
        with warnings.catch_warnings():  # consolidated metadata is a zarr-python v3 extension
            warnings.simplefilter("ignore", zarr.errors.ZarrUserWarning)
            zarr.consolidate_metadata(self.path)  # xarray.open_zarr reads it in one go
        atomic.write_json(
            marker_path(self.path),
            {
                "fingerprint": self.group.attrs["fingerprint"],
                "completed_at": finished,
                "n_samples": self.n_samples,
                **self._marker_fields(),
                **(summary or {}),
            },
        )

    def _marker_fields(self) -> dict[str, Any]:
        return {}


def resume_or_clear(
    path: Path,
    writer: Callable[[Path, zarr.Group], BlockStoreWriter],
    kind: str,
    fingerprint: str,
    same_shape: Callable[[dict[str, Any]], bool],
    *,
    on_stale: str,
    fresh: bool,
    check: Callable[[Any], None] | None = None,
    shared: bool = False,
) -> Any:
    """The writer of a killed run of this very store, resumed; or None after removing
    whatever stands at ``path`` (its marker always goes first).

    - another fingerprint: removed (``on_stale="recompute"``) or refused (``"error"``); one
      without any (its creation was killed) is removed;
    - same fingerprint, unfinished, ``same_shape(attrs)``: resumed (``check(writer)`` may
      refuse it), finished blocks that no longer verify un-flagged;
    - same fingerprint, finished before (``complete``: its job runs again, e.g. forced) or
      ``fresh``: removed, to start from scratch.

    ``shared``: one of several shard jobs writing disjoint blocks of the store opens it (under
    ``store_lock``): a finished store is reopened as unfinished rather than removed, and
    each shard checks and redoes its own blocks (``pipeline.extract``), not the others'.
    """
    marker_path(path).unlink(missing_ok=True)
    if not path.exists():
        return None
    existing = read_attrs(path)
    if existing.get("fingerprint") == fingerprint:
        finished = existing.get("complete") and not shared
        if fresh or finished or not same_shape(existing):
            log.info("%s: recomputing from scratch (fresh, or finished before)", path)
        else:
            try:
                resumed = writer(path, zarr.open_group(path, mode="r+"))
                if check is not None:
                    check(resumed)
                if shared:
                    resumed.group.attrs["complete"] = False
                else:
                    resumed.unflag_damaged_blocks()
            except Exception as error:  # flags or metadata unreadable: start over
                log.warning("%s cannot be resumed (%s): starting over", path, error)
            else:
                log.info("%s: resuming%s", path, " (shared by shard jobs)" if shared else "")
                return resumed
    elif on_stale == "error" and existing.get("fingerprint") is not None:
        raise StaleStoreError(
            f"{kind} {path} was made from another configuration "
            f"(fingerprint {str(existing.get('fingerprint'))[:12]} != "
            f"{fingerprint[:12]}); remove it or set runtime.on_stale: recompute"
        )
    shutil.rmtree(path)
    return None


class StoreWriter(BlockStoreWriter):
    """Creates a store, or resumes one with the same fingerprint, and writes it block by block."""

    kind = "feature store"

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = path
        self.group = group
        dense = {"write_empty_chunks": True}  # runtime config: not stored, so set on every open
        self.layers = [
            group[f"layers/{i}"].with_config(dense) for i in range(len(group.attrs["layer_names"]))
        ]
        self.flags = group["block_complete"].with_config(dense)
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
    ) -> StoreWriter:
        """Open ``path`` for writing (its marker is removed first); ``shared``: for one of
        several shard jobs, which hold ``store_lock(path)`` meanwhile (``resume_or_clear``).

        - no store: create it;
        - another fingerprint: remove it (``on_stale="recompute"``) or refuse (``"error"``);
          one without any (its creation was killed) is removed;
        - same fingerprint, unfinished (a killed run): resume it, rewriting any finished block
          whose chunks no longer verify;
        - same fingerprint, finished before (``complete``: its job runs again, e.g. forced) or
          ``fresh=True``: remove it and start from scratch.
        """
        path = Path(path)

        rows = rows_per_chunk(len(sample_ids), dims, chunk_bytes)

        def same_shape(existing: dict[str, Any]) -> bool:
            """Same rows, widths and blocks (``runtime.chunk_mb``) as the store to write."""
            return (
                existing.get("n_samples"),
                existing.get("dims"),
                existing.get("block_rows"),
            ) == (
                len(sample_ids),
                [int(d) for d in dims],
                rows,
            )

        resumed = resume_or_clear(
            path,
            cls,
            "feature store",
            fingerprint,
            same_shape,
            on_stale=on_stale,
            fresh=fresh,
            shared=shared,
        )
        if resumed is not None:
            return resumed
        return cls(path, _create(path, fingerprint, sample_ids, layer_names, dims, rows, attrs))

    @property
    def n_samples(self) -> int:
        return int(self.layers[0].shape[0])

    @property
    def n_blocks(self) -> int:
        return int(self.flags.shape[0])

    def pending_blocks(self, blocks: Iterable[int] | None = None) -> list[tuple[int, int, int]]:
        """(block, first row, end row) of every block (of ``blocks``) not yet written."""
        done = self.flags[:]
        return [
            (b, b * self.block_rows, min((b + 1) * self.block_rows, self.n_samples))
            for b in (range(len(done)) if blocks is None else blocks)
            if not done[b]
        ]

    def write_block(self, block: int, per_layer: Sequence[np.ndarray]) -> None:
        """Write one block of every layer, then its flag; NaN or infinite values are refused."""
        start = block * self.block_rows
        stop = min(start + self.block_rows, self.n_samples)
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
        self.flags[block] = True

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
        damaged: dict[int, StoreIntegrityError] = {}
        for index, array in enumerate(self.layers):
            layer = CheckedLayer(self.path, index, names[index], array)
            for block in blocks:
                if block in damaged:
                    continue
                try:
                    layer.check_chunk(int(block))
                except StoreIntegrityError as error:
                    damaged[int(block)] = error
        return damaged


def lock_path(store_path: Path) -> Path:
    """The lock file shard jobs of one store take turns on (``pipeline.atomic.locked``)."""
    return store_path.with_name(store_path.name + ".lock")


def shard_blocks(n_blocks: int, shard: int, shards: int) -> range:
    """The blocks shard ``shard`` (1 .. ``shards``) of a store writes: a contiguous run, the
    runs of all shards disjoint and covering every block."""
    if not 1 <= shard <= shards:
        raise ValueError(f"shard {shard} of {shards} does not exist")
    return range((shard - 1) * n_blocks // shards, shard * n_blocks // shards)


def open_shard(
    open_writer: Callable[..., BlockStoreWriter], path: Path, shard: tuple[int, int], fresh: bool
) -> tuple[Any, range]:
    """A shard job's writer of the store at ``path`` and the blocks it writes: the first shard
    creates the store, the others open it, one at a time under ``lock_path(path)``
    (``open_writer(shared=True)``: a ``create_or_resume`` with the store's settings); then
    ``claim_shard``."""
    with atomic.locked(lock_path(path)):
        writer = open_writer(shared=True)
    return writer, writer.claim_shard(shard, fresh)


@contextmanager
def shard_run(marker: Path) -> Iterator[bool]:
    """A shard job's run, marked by ``<marker without .done>.running`` while it works; yields
    ``fresh``: False when the mark is already there (the last run was killed: resume), True
    for any other run (redo the shard's blocks)."""
    running = marker.with_suffix(".running")
    fresh = not running.exists()
    atomic.write_text(running, "")
    yield fresh
    running.unlink()


def refuse_shards(what: str, lacking: dict[Path, str]) -> None:
    """Remove the markers of the shard jobs in ``lacking`` (marker -> what is wrong), so the
    next run of the workflow runs them again, and raise an error naming each."""
    for marker in lacking:
        marker.unlink(missing_ok=True)
    raise IncompleteStoreError(
        f"{what} cannot be finished: "
        + "; ".join(f"{marker.name}: {why}" for marker, why in lacking.items())
        + ". Their shard markers are removed: run the workflow again to extract them again"
    )


def open_group_checked(path: Path, kind: str) -> zarr.Group:
    """The store's root group, read-only; a store that does not open is a named error."""
    try:
        return zarr.open_group(path, mode="r")
    except Exception as error:
        raise StoreIntegrityError(
            f"{kind} {path} cannot be opened ({type(error).__name__}: {error})", path=path
        ) from error


def read_attrs(path: Path) -> dict[str, Any]:
    """A store's attributes from its ``zarr.json``; {} when there is no readable store."""
    try:
        attrs = json.loads((path / "zarr.json").read_text())["attributes"]
    except (OSError, KeyError, ValueError):
        return {}  # not a readable store: treat as stale
    return attrs if isinstance(attrs, dict) else {}


def chunk_codecs() -> dict[str, Any]:
    """Compression, then a CRC-32C of the stored bytes (last, so it covers what is on disk)."""
    return {"compressors": [ZstdCodec(level=0), Crc32cCodec()]}


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
    group = zarr.open_group(path, mode="w")
    dense = {"write_empty_chunks": True}
    same_width = len(set(dims)) == 1
    for i, dim in enumerate(dims):
        group.create_array(
            f"layers/{i}",
            shape=(n, dim),
            chunks=(rows, dim),
            dtype="float32",
            dimension_names=("sample", "dim" if same_width else f"dim_{i}"),
            fill_value=np.nan,
            config=dense,
            **chunk_codecs(),
        )
    ids = group.create_array(
        "sample_id",
        shape=(n,),
        chunks=(max(n, 1),),
        dtype=str,
        dimension_names=("sample",),
        config=dense,
        **chunk_codecs(),
    )
    ids[:] = np.asarray(sample_ids, dtype=str)
    # The same ids beside the layers, named after their dimension: xarray opens the "layers"
    # group with the sample ids as the "sample" coordinate.
    coordinate = group.create_array(
        "layers/sample",
        shape=(n,),
        chunks=(max(n, 1),),
        dtype=str,
        dimension_names=("sample",),
        config=dense,
        **chunk_codecs(),
    )
    coordinate[:] = np.asarray(sample_ids, dtype=str)
    group.create_array(
        "block_complete",
        shape=(math.ceil(n / rows),),
        chunks=(1,),
        dtype=bool,
        fill_value=False,
        dimension_names=("block",),
        config=dense,
        **chunk_codecs(),
    )
    group.attrs.update(
        {
            **attrs,
            "fingerprint": fingerprint,
            "format_version": FORMAT_VERSION,
            "layer_names": list(layer_names),
            "dims": [int(d) for d in dims],
            "n_samples": n,
            "block_rows": rows,
            "complete": False,
        }
    )
    return group
