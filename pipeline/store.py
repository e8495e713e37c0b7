"""The feature store: one Zarr v3 store per (encoder, dataset, split). This module owns its format.

Layout of ``<name>.zarr``::

    layers/<i>        float32 (n_samples, dim_i), chunked along samples only,
                      dimension names ("sample", "dim"); ("sample", "dim_<i>") when
                      layer widths differ, so xarray opens the group as one Dataset
    sample_id         str (n_samples,), the dataset's stable ids in row order
    block_complete    bool (n_blocks,), one chunk each; True once all layers of a block are written
    zarr.json         attributes: encoder and dataset provenance, fingerprint, layer names, ...

and beside it the completion marker ``<name>.zarr.done`` (JSON), written last. The marker is
what Snakemake declares as the job's output: Snakemake deletes declared outputs before a job
runs, so declaring the store itself would throw away the blocks a killed run had finished.

Rows are written in blocks of one chunk. Zarr writes each chunk file atomically, and a
block's flag is set only after all its layers are written, so after a SIGKILL at any
moment the store holds whole blocks only and extraction resumes from the first missing one.
A store whose fingerprint differs from the expected one is never reused.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline import atomic

FORMAT_VERSION = 1
MIN_CHUNK_BYTES = 1 << 20  # docs/formats.md: chunks of at least 1 MB


class StaleStoreError(RuntimeError):
    """A store on disk was made from a different configuration than the one asked for."""


class IncompleteStoreError(RuntimeError):
    """A store is missing its completion marker (extraction never finished)."""


def marker_path(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + ".done")


def rows_per_chunk(n_samples: int, dims: Sequence[int], chunk_bytes: int = MIN_CHUNK_BYTES) -> int:
    """Rows per chunk so that the narrowest layer's chunk holds >= ``chunk_bytes`` of float32."""
    rows = math.ceil(chunk_bytes / (4 * min(dims)))
    return max(1, min(rows, n_samples))


@dataclass(frozen=True)
class FeatureStore:
    """Read access to a complete feature store."""

    path: Path

    @cached_property
    def group(self) -> zarr.Group:
        return zarr.open_group(self.path, mode="r")

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

    def layer(self, index: int) -> zarr.Array:
        if not -self.num_layers <= index < self.num_layers:
            raise IndexError(
                f"{self.path}: layer {index} does not exist (the store has {self.num_layers})"
            )
        return self.group[f"layers/{index % self.num_layers}"]

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
        return np.asarray(self.group["sample_id"][:].tolist(), dtype=str)


def open_store(path: str | Path, fingerprint: str | None = None) -> FeatureStore:
    """Open a complete store; refuse one that is unfinished or was made from another config."""
    path = Path(path)
    marker = marker_path(path)
    if not marker.exists():
        raise IncompleteStoreError(
            f"feature store {path} is incomplete (no {marker.name}): run the extract stage"
        )
    store = FeatureStore(path)
    if fingerprint is not None and store.fingerprint != fingerprint:
        raise StaleStoreError(
            f"feature store {path} has fingerprint {store.fingerprint[:12]}, the config "
            f"expects {fingerprint[:12]}: it is stale, rerun the extract stage"
        )
    return store


class StoreWriter:
    """Creates a store, or resumes one with the same fingerprint, and writes it block by block."""

    def __init__(self, path: Path, group: zarr.Group) -> None:
        self.path = path
        self.group = group
        self.layers = [group[f"layers/{i}"] for i in range(len(group.attrs["layer_names"]))]
        self.flags = group["block_complete"]
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
    ) -> StoreWriter:
        """Open ``path`` for writing. An existing store with another fingerprint is removed
        (``on_stale="recompute"``) or refused (``"error"``); one with the same is resumed."""
        path = Path(path)
        marker_path(path).unlink(missing_ok=True)
        if path.exists():
            existing = _read_fingerprint(path)
            if existing == fingerprint:
                return cls(path, zarr.open_group(path, mode="r+"))
            if on_stale == "error":
                raise StaleStoreError(
                    f"feature store {path} was made from another configuration "
                    f"(fingerprint {str(existing)[:12]} != {fingerprint[:12]}); remove it "
                    "or set runtime.on_stale: recompute"
                )
            shutil.rmtree(path)
        rows = rows_per_chunk(len(sample_ids), dims, chunk_bytes)
        return cls(path, _create(path, fingerprint, sample_ids, layer_names, dims, rows, attrs))

    @property
    def n_samples(self) -> int:
        return int(self.layers[0].shape[0])

    def pending_blocks(self) -> list[tuple[int, int, int]]:
        """(block, first row, end row) of every block not yet written."""
        done = self.flags[:]
        return [
            (b, b * self.block_rows, min((b + 1) * self.block_rows, self.n_samples))
            for b in range(len(done))
            if not done[b]
        ]

    def write_block(self, block: int, per_layer: Sequence[np.ndarray]) -> None:
        start = block * self.block_rows
        for array, values in zip(self.layers, per_layer, strict=True):
            array[start : start + len(values)] = values
        self.flags[block] = True

    def finalize(self, summary: dict[str, Any] | None = None) -> None:
        """Check every block is written, then write the completion marker (last)."""
        if pending := self.pending_blocks():
            raise IncompleteStoreError(f"{self.path}: {len(pending)} blocks are still missing")
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
                **(summary or {}),
            },
        )


def _read_fingerprint(path: Path) -> str | None:
    try:
        return json.loads((path / "zarr.json").read_text())["attributes"].get("fingerprint")
    except (OSError, KeyError, ValueError):
        return None  # not a readable store: treat as stale


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
        )
    ids = group.create_array(
        "sample_id", shape=(n,), chunks=(max(n, 1),), dtype=str, dimension_names=("sample",)
    )
    ids[:] = np.asarray(sample_ids, dtype=str)
    group.create_array(
        "block_complete",
        shape=(math.ceil(n / rows),),
        chunks=(1,),
        dtype=bool,
        fill_value=False,
        dimension_names=("block",),
        config=dense,
    )
    group.attrs.update(
        {
            **attrs,
            "fingerprint": fingerprint,
            "format_version": FORMAT_VERSION,
            "layer_names": list(layer_names),
            "dims": [int(d) for d in dims],
            "n_samples": n,
            "complete": False,
        }
    )
    return group
