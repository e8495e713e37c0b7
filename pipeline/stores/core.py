"""What both store layouts share: blocks, checked chunks, markers, shards, run marks, readers.

A store is one Zarr v3 group written in *blocks* (a run of whole samples): the unit of
writing, of resume and of sharding. A block's flag in ``block_complete`` (bool, one chunk
each) is set only after all its chunks are written, and Zarr writes each chunk file
atomically, so after a SIGKILL at any moment the store holds whole blocks only and the next
run resumes from the first missing one. Every chunk ends with a CRC-32C of its stored bytes
(the ``crc32c`` codec, last in the chain), so Zarr itself refuses a corrupt or truncated
chunk; the readers also check that the chunks they touch exist and hold finite values.

Zarr reads an absent chunk or shard file, and an empty shard file, as the fill value, so a
block's files (one chunk or shard file in each of the layout's ``block_arrays``) are recorded
with their byte sizes when the block is written (``block_bytes``, before its flag), and no
reader reads a block before ``os.stat`` finds each of its files with that size
(``BlockFiles.check``): a deleted, emptied or truncated file is an error naming it.

The store's attributes carry its ``fingerprint`` (``keys.fingerprint``), ``request``
(``keys.request_hash``), provenance and ``complete`` (True once a run has finished it), and
beside it the completion marker ``<store>.done`` (JSON) is written last: Snakemake declares
the marker, not the store, as the job's output, since it deletes declared outputs before a
job runs and would throw away the blocks a killed run had finished. A store whose
fingerprint differs from the expected one is never reused; one with ``complete: true`` whose
marker is gone was finished before and is being made again on purpose (forced): it is
recomputed from scratch.

Sharded (``runtime.extract_shards`` > 1): several jobs write disjoint runs of blocks of the
same stores (``shard_blocks``), taking turns at opening them under a lock, and a last job
checks every shard's work and finishes them (``finish_shards``; docs/formats.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Self

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from pipeline import atomic, layout
from pipeline.fingerprint import content_sha256
from pipeline.stores.keys import Format

log = logging.getLogger(__name__)

SHOWN_ROWS = 5  # offending rows named in an error message
DENSE = {"write_empty_chunks": True}  # runtime config: not stored, so set on every open


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
    """Values hold NaN or infinities (read from a store, or about to be written)."""


def marker_path(store_path: str | Path) -> Path:
    return Path(layout.store_marker(str(store_path)))


def lock_path(store_path: str | Path) -> Path:
    """The lock file shard jobs of one store take turns on (``pipeline.atomic.locked``)."""
    return Path(layout.store_lock(str(store_path)))


def marked_fingerprint(store_path: Path) -> str | None:
    """The fingerprint the store's completion marker records."""
    marker = marker_path(store_path)
    try:
        return json.loads(marker.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError) as error:
        raise StoreIntegrityError(f"{marker} cannot be read ({error})", path=store_path) from error


def read_attrs(path: Path) -> dict[str, Any]:
    """A store's attributes from its ``zarr.json``; {} when there is no readable store."""
    try:
        attrs = json.loads((Path(path) / "zarr.json").read_text())["attributes"]
    except (OSError, KeyError, ValueError):
        return {}  # not a readable store: treat as stale
    return attrs if isinstance(attrs, dict) else {}


def open_group_checked(path: Path, kind: str) -> zarr.Group:
    """The store's root group, read-only; a store that does not open is a named error."""
    try:
        return zarr.open_group(path, mode="r")
    except Exception as error:
        raise StoreIntegrityError(
            f"{kind} {path} cannot be opened ({type(error).__name__}: {error})", path=path
        ) from error


BLOCK_BYTES = "block_bytes"  # (n_blocks, len(block_arrays)) int64: each block file's size


def chunk_codecs() -> dict[str, Any]:
    """Compression, then a CRC-32C of the stored bytes (last, so it covers what is on disk)."""
    return {"compressors": [ZstdCodec(level=0), Crc32cCodec()]}


def small_array(group: zarr.Group, name: str, values: np.ndarray, dimension: str) -> None:
    """A 1-D array of one chunk (sample ids, offsets), written at once."""
    array = group.create_array(
        name,
        shape=values.shape,
        chunks=(max(len(values), 1),),
        dtype=str if values.dtype.kind == "U" else values.dtype,
        dimension_names=(dimension,),
        config=DENSE,
        **chunk_codecs(),
    )
    array[:] = values


def create_group(
    path: Path,
    fmt: Format,
    fingerprint: str,
    n_blocks: int,
    arrays: Callable[[zarr.Group], None],
    block_arrays: Sequence[str],
    attrs: dict[str, Any],
    layout_attrs: dict[str, Any],
) -> zarr.Group:
    """A new, empty store: the layout's ``arrays(group)``, the ``block_complete`` flags and the
    ``block_bytes`` records of the ``block_arrays`` (those of ``arrays`` holding one chunk or
    shard file per block, ``BlockFiles``), then the attributes (last: a store whose creation
    was killed has no fingerprint, so it is never resumed): the caller's ``attrs``, the
    format's, the layout's, ``block_arrays`` and ``complete: false``."""
    group = zarr.open_group(path, mode="w")
    arrays(group)
    group.create_array(
        "block_complete",
        shape=(n_blocks,),
        chunks=(1,),
        dtype=bool,
        fill_value=False,
        dimension_names=("block",),
        config=DENSE,
        **chunk_codecs(),
    )
    group.create_array(
        BLOCK_BYTES,
        shape=(n_blocks, len(block_arrays)),
        chunks=(1, len(block_arrays)),  # one file per block, as the flags: shards never share
        dtype="int64",
        fill_value=0,
        dimension_names=("block", "block_array"),
        config=DENSE,
        **chunk_codecs(),
    )
    group.attrs.update(
        {
            **attrs,
            "fingerprint": fingerprint,
            **fmt.tag,
            "format_version": fmt.version,
            **layout_attrs,
            "block_arrays": list(block_arrays),
            "complete": False,
        }
    )
    return group


def what_changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """How a store's recorded attributes differ from a new extraction's ``new`` (for the
    message refusing to overwrite it): the encoder's local weights by file and SHA-256, then
    the other encoder facts by key; each ends in "; "."""
    name = (new.get("encoder") or {}).get("name")
    facts, skip = [], {"versions"}
    before, now = old.get("weights") or {}, new.get("weights") or {}
    if now and before.get("sha256") != now["sha256"]:
        facts.append(
            f"encoder {name!r}: its weights {now['path']} have SHA-256 {now['sha256'][:12]}, "
            f"the store's were {str(before.get('sha256'))[:12]}"
        )
        skip.add("weights_sha256")
    was, is_now = old.get("encoder") or {}, new.get("encoder") or {}
    keys = sorted(k for k in (set(was) | set(is_now)) - skip if was.get(k) != is_now.get(k))
    if keys:
        facts.append(f"encoder {name!r} differs in {', '.join(keys)}")
    return "".join(f"{fact}; " for fact in facts)


def weights_changed(attrs: Mapping[str, Any], root: Path | None = None) -> str | None:
    """How the local weights a store was extracted from (its ``weights`` attribute; a relative
    path from the workflow root ``root``) differ now, None when they do not (or are gone)."""
    weights = attrs.get("weights") or {}
    path = Path(root or ".") / weights.get("path", "")
    if not weights or not path.exists() or (now := content_sha256(path)) == weights["sha256"]:
        return None
    return (
        f"encoder {(attrs.get('encoder') or {}).get('name')!r}: its weights {weights['path']} "
        f"have SHA-256 {now[:12]} now, {weights['sha256'][:12]} when the store was extracted"
    )


class BlockFiles:
    """The files block ``b`` of a store is written to, one in each of its ``block_arrays``
    (the chunk or shard file ``(b, 0, ...)``: those arrays are chunked, or sharded, one block
    along their first axis and whole along the others), and the byte sizes recorded for them
    when the block was written (``block_bytes``)."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = Path(path)
        self.group = group
        self.names: list[str] = list(group.attrs["block_arrays"])
        self._arrays = [group[name] for name in self.names]
        self._recorded: dict[int, np.ndarray] = {}

    def keys(self, block: int) -> list[str]:
        """Store keys of the block's files, e.g. ``layers/0/c/3/0`` or ``tokens/c/3/0``."""
        return [
            f"{name}/{array.metadata.encode_chunk_key((block,) + (0,) * (array.ndim - 1))}"
            for name, array in zip(self.names, self._arrays, strict=True)
        ]

    def sizes(self, block: int) -> list[int]:
        """The byte sizes of the block's files on disk now (-1: absent)."""
        return [_size(self.path / key) for key in self.keys(block)]

    def record(self, block: int) -> None:
        """Record the sizes of a block just written (before its flag is set)."""
        self._records[block] = self.sizes(block)

    @cached_property
    def _records(self) -> zarr.Array:
        return self.group[BLOCK_BYTES].with_config(DENSE)

    def recorded(self, block: int, where: str, rows: range, repair: str) -> np.ndarray:
        """The sizes recorded for the block's files (0: none), read when the block is first
        checked (one small chunk: a reader pays only for the blocks it reads)."""
        if block not in self._recorded:
            try:
                self._recorded[block] = self._records[block]
            except Exception as error:
                raise CorruptChunkError(
                    f"{where}, {_span(rows)}: the size record {BLOCK_BYTES}/c/{block}/0 cannot be "
                    f"read ({type(error).__name__}: {error}); {repair}",
                    path=self.path,
                    array=BLOCK_BYTES,
                    rows=rows,
                ) from error
        return self._recorded[block]

    def check(
        self,
        block: int,
        where: str,
        rows: range,
        repair: str,
        arrays: Sequence[int] | None = None,
    ) -> None:
        """Raise unless each file of block ``block`` (of the ``arrays``-th block arrays; all by
        default) exists with its recorded size: ``MissingChunkError`` for an absent file,
        ``CorruptChunkError`` for another size (emptied, truncated, replaced) or no record.
        ``where`` and ``repair`` start and end the message; the file is named by its path."""
        recorded, keys = self.recorded(block, where, rows, repair), self.keys(block)
        for index in range(len(keys)) if arrays is None else arrays:
            file, expected = self.path / keys[index], int(recorded[index])
            size = _size(file)
            if size == expected > 0:
                continue
            noun = "chunk" if self._arrays[index].shards is None else "shard"
            if size < 0:
                error: type[StoreIntegrityError] = MissingChunkError
                what = f"{noun} {file} is missing (Zarr would read it as the fill value)"
            elif expected > 0:
                error = CorruptChunkError
                what = f"{noun} {file} is {size} bytes, {expected} as written"
                what += " (emptied or truncated)" if size < expected else " (replaced)"
            else:
                error = CorruptChunkError
                what = f"{noun} {file} has no recorded size ({BLOCK_BYTES}/c/{block}/0 is missing)"
            raise error(
                f"{where}, {_span(rows)}: {what}; {repair}",
                path=self.path,
                array=self.names[index],
                rows=rows,
            )


def _span(rows: range) -> str:
    return f"rows {rows.start}-{rows.stop - 1}" if len(rows) else "no rows"


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return -1


# ---- reading ------------------------------------------------------------------------------------


class StoreReader:
    """Read access to a store of one layout (``fmt``): its group, attributes and the checks
    made on opening it complete (``open``) or for a reading job (``open_requested``)."""

    fmt: ClassVar[Format]
    required: ClassVar[tuple[str, ...]]  # attributes the layout cannot be read without
    ids: ClassVar[str]  # the array of sample ids

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def where(self) -> str:
        return f"{self.fmt.kind} {self.path}"

    @cached_property
    def group(self) -> zarr.Group:
        return open_group_checked(self.path, self.fmt.kind)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def fingerprint(self) -> str:
        return self.attrs["fingerprint"]

    @property
    def n_samples(self) -> int:
        return int(self.attrs["n_samples"])

    @cached_property
    def files(self) -> BlockFiles:
        """Each block's files and their recorded sizes (checked before a block is read)."""
        return BlockFiles(self.path, self.group)

    def sample_ids(self) -> np.ndarray:
        raise NotImplementedError

    def block_problems(self) -> list[StoreIntegrityError]:
        """Every damaged block of the layout's arrays (files missing or not of their recorded
        size, undecodable, not finite)."""
        raise NotImplementedError

    def problem(self, text: str, array: str | None = None) -> StoreIntegrityError:
        return StoreIntegrityError(f"{self.where}: {text}", path=self.path, array=array)

    def integrity_problems(self) -> list[StoreIntegrityError]:
        """Everything wrong with the store's contents: attributes, flags, ids, every block."""
        try:
            attrs = self.attrs
        except StoreIntegrityError as error:
            return [error]
        if (version := attrs.get("format_version")) != self.fmt.version:
            return [  # another layout: nothing more to check against this one
                self.problem(
                    f"format version {version} (this code writes {self.fmt.version}): extract "
                    "it again"
                )
            ]
        required = ("fingerprint", "block_arrays", *self.required)
        if missing := [k for k in required if k not in attrs]:
            return [self.problem(f"attributes {missing} are missing")]
        found = []
        try:
            flags = self.group["block_complete"][:]
            if not flags.all():
                found.append(self.problem(f"{int((~flags).sum())} blocks are not written"))
        except Exception as error:
            found.append(self.problem(f"block_complete cannot be read ({error})", "block_complete"))
        try:
            if len(self.sample_ids()) != self.n_samples:
                found.append(
                    self.problem(f"{self.ids} does not hold {self.n_samples} ids", self.ids)
                )
        except StoreIntegrityError as error:
            found.append(error)
        return found + self.block_problems()

    @property
    def job_marker(self) -> Path:
        """The output of the job that makes the store (its own completion marker)."""
        return marker_path(self.path)

    @property
    def rerun(self) -> str:
        """How to make the store again (for error messages)."""
        return f"run its {self.fmt.stage} job again (snakemake --force {self.job_marker})"

    @classmethod
    def open(cls, path: str | Path, fingerprint: str | None = None) -> Self:
        """A complete store; refuse one unfinished, inconsistent with its marker, or (given the
        expected ``fingerprint``) made from another config."""
        reader = cls(path)
        path, kind = reader.path, cls.fmt.kind
        if not marker_path(path).exists():
            raise IncompleteStoreError(
                f"{kind} {path} is incomplete (no {marker_path(path).name}): "
                f"run its {cls.fmt.stage} job"
            )
        if marked_fingerprint(path) != reader.attrs.get("fingerprint"):
            raise StoreIntegrityError(
                f"{kind} {path}: its marker {marker_path(path).name} and the store disagree on "
                "the fingerprint (the store was replaced after it was finished); extract it again",
                path=path,
            )
        if fingerprint is not None and reader.fingerprint != fingerprint:
            raise StaleStoreError(
                f"{kind} {path} has fingerprint {reader.fingerprint[:12]}, the config expects "
                f"{fingerprint[:12]}: it is stale, {reader.rerun}"
            )
        return reader

    @classmethod
    def open_requested(cls, path: str | Path, request: str, content_hash: str) -> Self:
        """A complete store for a reading job that expects it to hold ``request``
        (``keys.request_hash``) of the prepared dataset whose content hash is ``content_hash``."""
        reader = cls.open(path)
        attrs, kind = reader.attrs, cls.fmt.kind
        if attrs.get("request") != request:
            changed = weights_changed(attrs)
            raise StaleStoreError(
                f"{kind} {path} was extracted for another encoder spec, dataset, split, "
                "precision or dtype than this job's config asks for"
                f"{f' ({changed})' if changed else ''}: {reader.rerun}"
            )
        if attrs["dataset"]["content_hash"] != content_hash:
            raise StaleStoreError(
                f"{kind} {path} holds dataset content {attrs['dataset']['content_hash'][:12]}, "
                f"the prepared dataset is now {content_hash[:12]}: {reader.rerun}"
            )
        return reader


# ---- writing ------------------------------------------------------------------------------------


class BlockStoreWriter:
    """Writes a store of one layout block by block: creates it or resumes a killed run of it
    (``open_writer``), per-block flags, the checked finish that writes the marker, and a
    shard job's claim on its blocks.

    A layout sets ``fmt`` and defines ``__init__(path, group)``, ``n_blocks``,
    ``block_of(row)``, ``write_block(block, rows)`` (ending with ``mark_written``) and
    ``damaged_blocks(blocks)``."""

    fmt: ClassVar[Format]
    path: Path
    group: zarr.Group
    flags: zarr.Array

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path, self.group = path, group
        self.flags = group["block_complete"].with_config(DENSE)
        self.files = BlockFiles(path, group)
        self._block: int | None = None  # the block ``add`` is filling
        self._rows: dict[int, Any] = {}

    @classmethod
    def open_writer(
        cls,
        path: Path,
        fingerprint: str,
        create: Callable[[], zarr.Group],
        same_shape: Callable[[dict[str, Any]], bool],
        *,
        on_stale: str,
        fresh: bool,
        shared: bool,
        check: Callable[[Any], None] | None = None,
        attrs: Mapping[str, Any] | None = None,
    ) -> Self:
        """Open ``path`` for writing, its marker removed first:

        - no store: ``create()`` it;
        - another fingerprint: remove it (``on_stale="recompute"``) or refuse (``"error"``,
          saying how it differs from the ``attrs`` a new one gets: ``what_changed``); one
          without any (its creation was killed) is removed;
        - same fingerprint, unfinished, ``same_shape(attrs)``: resume it (``check(writer)`` may
          refuse), un-flagging finished blocks that no longer verify;
        - same fingerprint, finished before (``complete``: its job runs again, e.g. forced) or
          ``fresh``: remove it and start from scratch.

        ``shared``: one of several shard jobs opens it (under ``lock_path``): a finished store is
        reopened as unfinished rather than removed, and each shard checks and redoes its own
        blocks (``claim_shard``), not the others'."""
        marker_path(path).unlink(missing_ok=True)
        if path.exists():
            existing = read_attrs(path)
            if existing.get("fingerprint") == fingerprint:
                finished = existing.get("complete") and not shared
                if fresh or finished or not same_shape(existing):
                    log.info("%s: recomputing from scratch (fresh, or finished before)", path)
                else:
                    try:
                        resumed = cls(path, zarr.open_group(path, mode="r+"))
                        if check is not None:
                            check(resumed)
                        if shared:
                            resumed.group.attrs["complete"] = False
                        else:
                            resumed.unflag_damaged_blocks()
                    except Exception as error:  # flags or metadata unreadable: start over
                        log.warning("%s cannot be resumed (%s): starting over", path, error)
                    else:
                        log.info("%s: resuming%s", path, " (shared by shard jobs)" * shared)
                        return resumed
            elif on_stale == "error" and existing.get("fingerprint") is not None:
                raise StaleStoreError(
                    f"{cls.fmt.kind} {path} was made from another configuration "
                    f"({what_changed(existing, attrs or {})}fingerprint "
                    f"{str(existing.get('fingerprint'))[:12]} != {fingerprint[:12]}); remove it "
                    "or set runtime.on_stale: recompute"
                )
            shutil.rmtree(path)
        return cls(path, create())

    @classmethod
    def open_existing(cls, path: str | Path) -> Self:
        """The store at ``path`` as its shard jobs left it, to finish it."""
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise IncompleteStoreError(f"{cls.fmt.kind} {path} does not exist: no shard wrote it")
        return cls(path, zarr.open_group(path, mode="r+"))

    @property
    def n_samples(self) -> int:
        return int(self.group.attrs["n_samples"])

    @property
    def n_blocks(self) -> int:
        return int(self.flags.shape[0])

    def block_of(self, row: int) -> int:
        raise NotImplementedError

    def rows_of(self, block: int) -> range:
        raise NotImplementedError

    def write_block(self, block: int, rows: Sequence[Any]) -> None:
        raise NotImplementedError

    def damaged_blocks(self, blocks: Iterable[int] | None = None) -> dict[int, StoreIntegrityError]:
        raise NotImplementedError

    def missing_blocks(self, blocks: Iterable[int] | None = None) -> list[int]:
        """Every block (of ``blocks``) not yet written."""
        done = self.flags[:]
        return [int(b) for b in (range(len(done)) if blocks is None else blocks) if not done[b]]

    def pending_rows(self, blocks: Iterable[int] | None = None) -> np.ndarray:
        """Rows of every block (of ``blocks``) not yet written, ascending."""
        ranges = [
            np.arange(r.start, r.stop) for r in map(self.rows_of, self.missing_blocks(blocks))
        ]
        return np.concatenate([np.zeros(0, np.int64), *ranges])

    def add(self, row: int, values: Any) -> None:
        """The values of one row of a pending block; rows must come in ascending order. The
        block is written (then flagged) when its last row arrives."""
        block = self.block_of(row)
        if self._block is not None and block != self._block:
            raise RuntimeError(f"{self.path}: block {self._block} left unfinished at row {row}")
        self._block = block
        self._rows[row] = values
        if len(self._rows) == len(self.rows_of(block)):
            self.write_block(block, self.block_values([self._rows[r] for r in sorted(self._rows)]))
            self._block, self._rows = None, {}

    def mark_written(self, block: int) -> None:
        """A block's files are written: record their sizes, then set its flag."""
        self.files.record(block)
        self.flags[block] = True

    def block_values(self, rows: list[Any]) -> Any:
        """What ``write_block`` takes, from the values ``add`` collected for a block's rows."""
        return rows

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

    def finalize(self, summary: dict[str, Any] | None = None, verify: bool = True) -> None:
        """Check every block is written and (``verify``) reads back intact, then write the
        completion marker (last). Blocks that do not verify are un-flagged before the error,
        so the next run rewrites them."""
        if self._block is not None:
            raise IncompleteStoreError(f"{self.path}: block {self._block} is half filled")
        if missing := self.missing_blocks():
            raise IncompleteStoreError(f"{self.path}: {len(missing)} blocks are still missing")
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
                **self.marker_fields(),
                **(summary or {}),
            },
        )

    def marker_fields(self) -> dict[str, Any]:
        """What the layout adds to the completion marker."""
        return {}


# ---- run marks and shards -----------------------------------------------------------------------


class RunMark:
    """A job's run, marked by a file while it works: ``with RunMark(path) as fresh`` (or
    ``fresh = mark.begin()`` ... ``mark.end()``). ``fresh`` is False when the mark is already
    there (the last run was killed: resume what it finished) and True for any other run (asked
    to run again: redo everything). The mark stays when the run fails."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def begin(self) -> bool:
        fresh = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(self.path, "")
        return fresh

    def end(self) -> None:
        self.path.unlink()

    def __enter__(self) -> bool:
        return self.begin()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is None:
            self.end()


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
    (``open_writer(shared=True)``); then ``claim_shard``."""
    with atomic.locked(lock_path(path)):
        writer = open_writer(shared=True)
    return writer, writer.claim_shard(shard, fresh)


def finish_shards(
    what: str,
    target: Path,
    writers: Sequence[BlockStoreWriter],
    shards: Mapping[Path, tuple[Mapping[Path, str], int, int]],
    summary: dict[str, Any],
) -> None:
    """Finish the stores of ``writers`` that shard jobs wrote at ``target`` (a store, or a
    folder of them): ``shards`` holds each shard marker's record (store -> the fingerprint it
    wrote it for, k, n). Every shard must have written every store, for the fingerprint the
    store has, and all its blocks; then each store's marker is written. A shard that fails
    loses its marker (so Snakemake runs it again) and the error names it."""
    lacking = {}
    for marker, (prints, number, of) in shards.items():
        wrong = []
        for writer in writers:
            name = "" if writer.path == target else f"{writer.path.name} "
            stored, written = writer.group.attrs["fingerprint"], prints.get(writer.path)
            if written != stored:
                wrong.append(
                    f"{name}written for fingerprint {str(written)[:12]}, not {stored[:12]}"
                )
            elif missing := writer.missing_blocks(shard_blocks(writer.n_blocks, number, of)):
                wrong.append(f"{name}blocks {missing} missing")
        if extra := sorted(path.name for path in set(prints) - {w.path for w in writers}):
            wrong.append(f"also wrote {extra}")
        if wrong:
            lacking[marker] = "; ".join(wrong)
    if lacking:
        for marker in lacking:
            marker.unlink(missing_ok=True)
        raise IncompleteStoreError(
            f"{what} cannot be finished: "
            + "; ".join(f"{marker.name}: {why}" for marker, why in lacking.items())
            + ". Their shard markers are removed: run the workflow again to extract them again"
        )
    for writer in writers:
        writer.finalize({**summary, "shards": len(shards)}, verify=False)  # shards verified
        lock_path(writer.path).unlink(missing_ok=True)
