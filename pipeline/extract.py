"""The extract stage: run one frozen encoder over one dataset split, pool every layer, store it.

Vision encoders run over the split's distinct images, text encoders over its captions (or,
for the pseudo-split ``prompts``, over the dataset's zero-shot prompts). Work proceeds in
blocks of one Zarr chunk; a killed run resumes from the first unfinished block and ends with
a store identical to an uninterrupted run, since every block is computed the same way. The
blocks of a large split can be shared out among several shard jobs and the store completed by
one more (``runtime.extract_shards``; ``run_extract_shard``, ``finish_shards``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pipeline import atomic, layout, store
from pipeline.data import load_prompts, load_split, read_manifest
from pipeline.encoders import Encoder, build_encoder
from pipeline.fingerprint import spec_hash
from pipeline.jobs import PROMPTS_SPLIT, Job
from pipeline.versions import library_versions

log = logging.getLogger(__name__)

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Rows(Dataset):
    """Map-style dataset over chosen row indices, loading each item on demand."""

    def __init__(self, rows: Sequence[int], load: Callable[[int], Any]) -> None:
        self.rows, self.load = list(rows), load

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Any:
        return self.load(self.rows[i])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"runtime.device is {name!r} but CUDA is not available here")
    return device


def split_items(
    dataset_dir: Path, split: str, modality: str
) -> tuple[list[str], Callable[[int], Any]]:
    """Sample ids of the rows an encoder of ``modality`` runs over, and a loader for row i."""
    if split == PROMPTS_SPLIT:
        if modality != "text":
            raise ValueError(f"the '{PROMPTS_SPLIT}' pseudo-split is text only")
        prompts = load_prompts(dataset_dir)
        texts = prompts["text"].to_list()
        return prompts["prompt_id"].to_list(), texts.__getitem__
    data = load_split(dataset_dir, split)
    if modality == "vision":
        return data.images["image_id"].to_list(), data.open_image
    texts = data.captions["text"].to_list()
    return data.captions["caption_id"].to_list(), texts.__getitem__


def fingerprint(
    provenance: dict[str, Any], dataset: dict[str, Any], split: str, precision: str
) -> str:
    """Everything that determines the stored values (library versions are recorded, not keyed)."""
    provenance = {k: v for k, v in provenance.items() if k != "versions"}
    return spec_hash(
        {
            "format_version": store.FORMAT_VERSION,
            "encoder": provenance,
            "dataset": dataset["name"],
            "content_hash": dataset["content_hash"],
            "split": split,
            "precision": precision,
        }
    )


def dataset_info(dataset_dir: Path) -> dict[str, Any]:
    """The dataset's manifest, with its name."""
    manifest = read_manifest(dataset_dir)
    return {"name": manifest.get("name", Path(dataset_dir).name), **manifest}


def provenance_attrs(
    encoder_name: str,
    encoder: Encoder,
    provenance: dict[str, Any],
    dataset: dict[str, Any],
    split: str,
) -> dict[str, Any]:
    """What a feature or token store records of where its values came from: the encoder
    (config name, architecture under ``model``), the dataset split and library versions."""
    return {
        "encoder": {
            **provenance,
            "name": encoder_name,  # the config's name; the architecture is under "model"
            "model": provenance["name"],
            "modality": encoder.modality,
        },
        "dataset": {
            "name": dataset["name"],
            "split": split,
            "content_hash": dataset["content_hash"],
            "spec": dataset.get("spec"),
        },
        "versions": library_versions(),
    }


def expected_fingerprint(
    *,
    encoder_name: str,
    encoder_spec: dict[str, Any],
    dataset_dir: Path,
    split: str,
    runtime: dict[str, Any],
) -> str:
    """The fingerprint ``extract`` gives the store of these inputs (same arguments, no ``out``),
    for ``store.open_store(path, fingerprint=...)`` downstream. It builds the encoder (loads
    and hashes its weights) but runs nothing."""
    provenance = build_encoder(encoder_name, encoder_spec).provenance()
    precision = runtime.get("precision", "float32")
    return fingerprint(provenance, dataset_info(Path(dataset_dir)), split, precision)


def extract(
    *,
    encoder_name: str,
    encoder_spec: dict[str, Any],
    dataset_dir: Path,
    split: str,
    out: Path,
    runtime: dict[str, Any],
    fresh: bool = False,
    shard: tuple[int, int] | None = None,
) -> Path:
    """Extract every layer of ``encoder_name`` over ``split`` into the store at ``out``.

    A killed run's store is resumed; ``fresh=True``, or a store finished before (its job was
    forced to run again), is recomputed from scratch (see ``store.StoreWriter``).

    ``shard=(k, n)``: write only the k-th of n contiguous runs of the store's blocks, as one of
    n jobs sharing it (``store.shard_blocks``); ``finish_shards`` completes the store once all
    have run. The shard's finished blocks are kept (a killed shard resuming), unless
    ``fresh``; it never touches another shard's blocks."""
    dataset_dir, out = Path(dataset_dir), Path(out)
    dataset = dataset_info(dataset_dir)
    encoder = build_encoder(encoder_name, encoder_spec)
    provenance = encoder.provenance()
    sample_ids, load_item = split_items(dataset_dir, split, encoder.modality)
    precision = runtime.get("precision", "float32")
    key = fingerprint(provenance, dataset, split, precision)
    open_writer = partial(
        store.StoreWriter.create_or_resume,
        out,
        fingerprint=key,
        sample_ids=sample_ids,
        layer_names=encoder.layer_names,
        dims=encoder.dims,
        on_stale=runtime.get("on_stale", "recompute"),
        chunk_bytes=int(runtime.get("chunk_mb", 1) * 2**20),
        attrs={
            **provenance_attrs(encoder_name, encoder, provenance, dataset, split),
            "precision": precision,
            "request": store.request_hash(
                encoder_name, encoder_spec, dataset["name"], split, precision
            ),
        },
    )
    if shard is None:
        writer = open_writer(fresh=fresh)
        blocks = range(writer.n_blocks)
    else:
        writer, blocks = store.open_shard(open_writer, out, shard, fresh)
    pending = writer.pending_blocks(blocks)
    device = resolve_device(runtime.get("device", "auto"))
    encoder.to(device)
    what = "" if shard is None else f" (shard {shard[0]} of {shard[1]})"
    log.info(
        "%s on %s/%s%s: %d samples, %d layers, %d of %d blocks to do, on %s",
        encoder_name,
        dataset["name"],
        split,
        what,
        len(sample_ids),
        len(encoder.layer_names),
        len(pending),
        len(blocks),
        device,
    )
    first, end = (min(b * writer.block_rows, writer.n_samples) for b in (blocks.start, blocks.stop))
    done_rows = end - first - sum(stop - start for _, start, stop in pending)
    with tqdm(
        total=end - first, initial=done_rows, unit="sample", desc=f"{encoder_name} {split}{what}"
    ) as bar:
        for block, start, stop in pending:
            pooled = _encode_rows(
                encoder, range(start, stop), load_item, device, precision, runtime, bar.update
            )
            writer.write_block(block, pooled)
    if shard is None:
        writer.finalize(
            {"encoder": encoder_name, "split": split, "layers": len(encoder.layer_names)}
        )
    else:
        writer.verify_blocks(blocks)  # the completion job trusts each shard's own check
    return out


def finish_shards(out: Path, shard_markers: Sequence[str | Path]) -> None:
    """Complete the store that the shard jobs of ``shard_markers`` wrote: check that they wrote
    it for the same fingerprint and wrote every block, then write its completion marker.
    A shard whose blocks are missing loses its marker (so Snakemake runs it again) and the
    error names it."""
    out = Path(out)
    shards = {Path(m): json.loads(Path(m).read_text()) for m in shard_markers}
    writer = store.StoreWriter.open_existing(out)
    stored = writer.group.attrs["fingerprint"]
    lacking = {}
    for marker, record in shards.items():
        blocks = store.shard_blocks(writer.n_blocks, record["shard"], record["shards"])
        if record["fingerprint"] != stored:
            lacking[marker] = f"written for fingerprint {record['fingerprint'][:12]}"
        elif missing := [b for b, _, _ in writer.pending_blocks(blocks)]:
            lacking[marker] = f"blocks {missing} missing"
    if lacking:
        store.refuse_shards(f"feature store {out} (fingerprint {stored[:12]})", lacking)
    attrs = writer.group.attrs
    summary = {"encoder": attrs["encoder"]["name"], "split": attrs["dataset"]["split"]}
    writer.finalize(
        {**summary, "layers": len(attrs["layer_names"]), "shards": len(shards)}, verify=False
    )
    store.lock_path(out).unlink(missing_ok=True)


def _encode_rows(
    encoder: Encoder,
    rows: range,
    load_item: Callable[[int], Any],
    device: torch.device,
    precision: str,
    runtime: dict[str, Any],
    progress: Callable[[int], Any],
) -> list[np.ndarray]:
    """Pooled features of every layer for ``rows``, as float32 arrays (one per layer)."""
    loader = DataLoader(
        Rows(rows, load_item),
        batch_size=runtime.get("batch_size", 128),
        num_workers=runtime.get("num_workers", 0),
        collate_fn=encoder.collate,
    )
    dtype = PRECISIONS[precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    per_layer: list[list[np.ndarray]] = [[] for _ in encoder.layer_names]
    with torch.inference_mode(), autocast:
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            for values, layer in zip(per_layer, encoder.pooled_layers(batch), strict=True):
                values.append(layer.float().cpu().numpy())
            progress(len(next(iter(batch.values()))))
    return [np.concatenate(values) for values in per_layer]


def run_extract(job: Job) -> None:
    """The ``extract_features`` stage (``pipeline.jobs.extract_features``): the whole store, or
    with ``runtime.extract_shards`` > 1 only its completion, after the shard jobs."""
    spec = job.spec
    out = Path(layout.store_of_marker(job.output("marker")))
    if spec.get("shards", 1) > 1:
        finish_shards(out, job.input_list("shards"))
        return
    _extract_job(job, out)


def run_extract_shard(job: Job) -> None:
    """The ``extract_features_shard`` stage (``pipeline.jobs.extract_features_shard``): one
    run of a store's blocks. A shard whose last run was killed (its ``.running`` file is still
    there) resumes its blocks; any other run of it recomputes them."""
    spec = job.spec
    marker = Path(job.output("shard"))
    out = Path(layout.store_of_shard_marker(str(marker)))
    with store.shard_run(marker) as fresh:
        _extract_job(job, out, fresh=fresh, shard=(spec["shard"], spec["shards"]))
        atomic.write_json(
            marker,
            {
                "fingerprint": store.read_attrs(out)["fingerprint"],
                "shard": spec["shard"],
                "shards": spec["shards"],
                "completed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )


def _extract_job(job: Job, out: Path, **options: Any) -> Path:
    """``extract`` with the job's spec, dataset and threads (``threads - 1`` image loaders)."""
    spec = job.spec
    return extract(
        encoder_name=spec["encoder_name"],
        encoder_spec=spec["encoder"],
        dataset_dir=Path(layout.dataset_of_manifest(job.input("dataset"))),
        split=spec["split"],
        out=out,
        runtime={**spec["runtime"], "num_workers": max(0, (job.threads or 1) - 1)},
        **options,
    )
