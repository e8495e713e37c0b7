"""The extract_tokens stage: the token features of the chosen layers only (docs/formats.md).

One job per (dataset, split, encoder). The layers come from the ``layers.json`` of every
encoder pair the encoder is in, read when the job runs: the union over the configured layer
choices (and over the grid's runs when layers are chosen per run) of this encoder's side. So
a layer chosen by two choices, two pairs or two methods is extracted once, and every layer of
the job comes out of one forward pass over the split (which stops after the deepest chosen
block where the encoder allows). Each layer goes to its own token store (``pipeline.tokens``),
keyed by layer; the job's declared output is the token set's marker listing them.

Fresh or resumed: while it works the job marks the set's folder ``.in_progress``. A job that
finds the mark follows a killed one: finished layer stores with the expected fingerprint are
kept and unfinished ones resume block by block. A job that finds no mark was asked to run
again (forced, or its config slice or a ``layers.json`` changed) and extracts every layer from
scratch, as a forced pooled extraction does. Stores of layers no longer chosen are removed.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from pipeline import atomic, layout, store, tokens
from pipeline.encoders import Encoder, build_encoder
from pipeline.extract import (
    PRECISIONS,
    Rows,
    dataset_info,
    provenance_attrs,
    resolve_device,
    split_items,
)
from pipeline.jobs import Job
from pipeline.similarity.selection import read_layer_choice

log = logging.getLogger(__name__)
IN_PROGRESS = ".in_progress"


def chosen_layers(
    layer_files: Sequence[str | Path], side: str, choices: Sequence[str]
) -> list[int]:
    """The ``side`` ("vision" or "text") layers that ``choices`` pick in any of the
    ``layers.json`` files, top level and per run (``scope: run``), ascending."""
    found = set()
    for path in layer_files:
        layers = read_layer_choice(path)
        sources = [layers, *layers.get("runs", {}).values()]
        for choice in choices:
            for source in sources:
                if choice not in source["choices"]:
                    raise ValueError(
                        f"{path}: layer choice {choice!r} is not in it (has "
                        f"{sorted(source['choices'])}); run compare_layers again"
                    )
                found.add(int(source["choices"][choice][f"{side}_layer"]))
    return sorted(found)


def extract_tokens(
    *,
    encoder_name: str,
    encoder_spec: dict[str, Any],
    dataset_dir: Path,
    split: str,
    layers: Sequence[int],
    out_dir: Path,
    runtime: dict[str, Any],
    dtype: str = "float16",
    shard_mb: float = tokens.DEFAULT_SHARD_MB,
    fresh: bool = False,
    shard: tuple[int, int] | None = None,
) -> dict[int, Path]:
    """Extract the tokens of ``layers`` of ``encoder_name`` over ``split`` into one token store
    per layer under ``out_dir``; returns the store of each layer. Finished stores with the
    expected fingerprint are kept and unfinished ones resumed, unless ``fresh``.

    ``shard=(k, n)``: fill only the k-th of n contiguous runs of each store's blocks
    (``store.shard_blocks``), as one of n jobs sharing the stores; ``finish_token_shards``
    completes them. The shard's finished blocks are kept unless ``fresh``."""
    dataset_dir, out_dir = Path(dataset_dir), Path(out_dir)
    dataset = dataset_info(dataset_dir)
    encoder = build_encoder(encoder_name, encoder_spec)
    for layer in layers:
        if not 0 <= layer < len(encoder.layer_names):
            raise ValueError(
                f"encoder {encoder_name!r} has {len(encoder.layer_names)} layers, not {layer}"
            )
    provenance = encoder.provenance()
    precision = runtime.get("precision", "float32")
    sample_ids, load_item = split_items(dataset_dir, split, encoder.modality)
    fixed = encoder.tokens_per_sample
    if fixed is not None:
        counts = np.full(len(sample_ids), fixed, dtype=np.int64)
    else:
        counts = np.asarray(
            encoder.token_counts([load_item(i) for i in range(len(sample_ids))]), np.int64
        )
    request = tokens.request_hash(
        encoder_name, encoder_spec, dataset["name"], split, precision, dtype
    )
    itemsize = np.dtype(dtype).itemsize
    writers: dict[int, tokens.TokenStoreWriter] = {}
    paths: dict[int, Path] = {}
    blocks: dict[int, range] = {}
    for layer in layers:
        path = Path(layout.token_store(str(out_dir), layer))
        paths[layer] = path
        key = tokens.fingerprint(provenance, dataset, split, precision, layer, dtype)
        if not fresh and shard is None:
            try:
                tokens.open_token_store(path, key)
            except (OSError, RuntimeError, ValueError, KeyError):
                pass
            else:
                log.info("%s: finished before this job was killed, kept", path)
                continue
        plan = tokens.plan_blocks(
            counts, encoder.dims[layer], itemsize, int(shard_mb * 2**20), fixed is not None
        )
        open_writer = partial(
            tokens.TokenStoreWriter.create_or_resume,
            path,
            fingerprint=key,
            sample_ids=sample_ids,
            plan=plan,
            dim=encoder.dims[layer],
            dtype=dtype,
            on_stale=runtime.get("on_stale", "recompute"),
            attrs={
                **provenance_attrs(encoder_name, encoder, provenance, dataset, split),
                "layer": int(layer),
                "layer_name": encoder.layer_names[layer],
                "precision": precision,
                "request": request,
                "layout": encoder.token_layout(),
            },
        )
        if shard is None:
            writers[layer] = open_writer(fresh=fresh)
            blocks[layer] = range(writers[layer].n_blocks)
            continue
        writers[layer], blocks[layer] = store.open_shard(open_writer, path, shard, fresh)
    label = f"{encoder_name} {split}" + (
        "" if shard is None else f" (shard {shard[0]} of {shard[1]})"
    )
    _fill(encoder, writers, blocks, load_item, runtime, label)
    for layer, writer in writers.items():
        if shard is None:
            writer.finalize({"encoder": encoder_name, "split": split})
        else:
            writer.verify_blocks(blocks[layer])  # the completion job trusts each shard's check
    return paths


def _fill(
    encoder: Encoder,
    writers: dict[int, tokens.TokenStoreWriter],
    blocks: dict[int, range],
    load_item: Callable[[int], Any],
    runtime: dict[str, Any],
    label: str,
) -> None:
    """One forward pass over every row some writer still needs (of its ``blocks``), feeding
    each writer its rows."""
    pending = {layer: writer.pending_rows(blocks[layer]) for layer, writer in writers.items()}
    needs = {layer: set(rows.tolist()) for layer, rows in pending.items()}
    rows = np.unique(np.concatenate([np.zeros(0, np.int64), *pending.values()]))
    if not len(rows):
        return
    device = resolve_device(runtime.get("device", "auto"))
    encoder.to(device)
    dtype = PRECISIONS[runtime.get("precision", "float32")]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    batch_size = runtime.get("batch_size", 128)
    loader = DataLoader(
        Rows(rows.tolist(), load_item),
        batch_size=batch_size,
        num_workers=runtime.get("num_workers", 0),
        collate_fn=encoder.collate,
    )
    active = sorted(writers)
    log.info("%s: layers %s, %d rows to encode on %s", label, active, len(rows), device)
    with torch.inference_mode(), autocast, tqdm(total=len(rows), unit="sample", desc=label) as bar:
        for start, batch in zip(range(0, len(rows), batch_size), loader, strict=True):
            batch_rows = rows[start : start + batch_size].tolist()
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            outputs = encoder.token_layers(batch, active)
            write_batch(writers, needs, dict(zip(active, outputs, strict=True)), batch_rows)
            bar.update(len(batch_rows))


def write_batch(
    writers: dict[int, tokens.TokenStoreWriter],
    needs: dict[int, set[int]],
    outputs: dict[int, tuple[torch.Tensor, torch.Tensor]],
    rows: list[int],
) -> None:
    """Hand each writer the real tokens of the batch rows it still needs (``outputs``: layer ->
    (tokens (B, T, D), mask (B, T)) of the batch whose rows are ``rows``)."""
    for layer, (values, mask) in outputs.items():
        values, mask = values.float().cpu().numpy(), mask.cpu().numpy()
        for b, row in enumerate(rows):
            if row in needs[layer]:
                writers[layer].add(row, values[b][mask[b]])


def run_extract_tokens(job: Job) -> None:
    """The ``extract_tokens`` stage (``pipeline.jobs.extract_tokens``): the whole token set, or
    with ``runtime.extract_shards`` > 1 only its completion, after the shard jobs."""
    spec = job.spec
    marker = Path(job.output("tokens"))
    out_dir = Path(layout.tokens_dir_of_marker(str(marker)))
    if spec.get("shards", 1) > 1:
        finish_token_shards(out_dir, marker, job.input_list("shards"), spec)
        return
    layers = chosen_layers(job.input_list("layers"), spec["side"], spec["layer_choices"])
    in_progress = out_dir / IN_PROGRESS
    fresh = not in_progress.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_text(in_progress, "")
    log.info("%s layers %s", "extracting" if fresh else "resuming", layers)
    paths = _extract_job(job, layers, out_dir, fresh)
    _write_set_marker(out_dir, marker, spec, paths)
    in_progress.unlink()


def run_extract_tokens_shard(job: Job) -> None:
    """The ``extract_tokens_shard`` stage (``pipeline.jobs.extract_tokens_shard``): one run of
    blocks of every chosen layer's store. A shard whose last run was killed (its ``.running``
    file is still there) resumes its blocks; any other run of it recomputes them."""
    spec = job.spec
    marker = Path(job.output("shard"))
    out_dir = Path(layout.tokens_dir_of_shard_marker(str(marker)))
    layers = chosen_layers(job.input_list("layers"), spec["side"], spec["layer_choices"])
    out_dir.mkdir(parents=True, exist_ok=True)
    with store.shard_run(marker) as fresh:
        paths = _extract_job(job, layers, out_dir, fresh, shard=(spec["shard"], spec["shards"]))
        fingerprints = {
            str(layer): store.read_attrs(p)["fingerprint"] for layer, p in paths.items()
        }
        atomic.write_json(
            marker,
            {
                "layers": fingerprints,
                "shard": spec["shard"],
                "shards": spec["shards"],
                "completed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )


def finish_token_shards(
    out_dir: Path, marker: Path, shard_markers: Sequence[str | Path], spec: dict[str, Any]
) -> None:
    """Complete the token stores the shard jobs of ``shard_markers`` wrote: every shard wrote
    the same layers with the same fingerprints and all its blocks; then each store's marker,
    the removal of stores of layers no longer chosen, and the set's marker. A shard that fails
    loses its marker (so Snakemake runs it again) and the error names it."""
    shards = {Path(m): json.loads(Path(m).read_text()) for m in shard_markers}
    layers = next(iter(shards.values()))["layers"]
    if any(record["layers"] != layers for record in shards.values()):
        # layers.json or the config changed while the shards ran
        why = "the shards wrote different layers or fingerprints"
        store.refuse_shards(f"token set {out_dir}", dict.fromkeys(shards, why))
    writers = {
        int(layer): tokens.TokenStoreWriter.open_existing(layout.token_store(str(out_dir), layer))
        for layer in layers
    }
    lacking = {}
    for path, record in shards.items():
        missing = []
        for layer, writer in writers.items():
            own = store.shard_blocks(writer.n_blocks, record["shard"], record["shards"])
            if writer.group.attrs["fingerprint"] != layers[str(layer)]:
                missing.append(f"layer {layer} (its store was made again since)")
            elif pending := writer.pending_blocks(own):
                missing.append(f"layer {layer} blocks {pending}")
        if missing:
            lacking[path] = "missing " + ", ".join(missing)
    if lacking:
        store.refuse_shards(f"token set {out_dir}", lacking)
    summary = {"encoder": spec["encoder_name"], "split": spec["split"], "shards": len(shards)}
    for writer in writers.values():
        writer.finalize(summary, verify=False)  # each shard verified its own blocks
    paths = {layer: writer.path for layer, writer in writers.items()}
    _write_set_marker(out_dir, marker, spec, paths)


def _extract_job(
    job: Job, layers: list[int], out_dir: Path, fresh: bool, shard: tuple[int, int] | None = None
) -> dict[int, Path]:
    spec = job.spec
    return extract_tokens(
        encoder_name=spec["encoder_name"],
        encoder_spec=spec["encoder"],
        dataset_dir=Path(layout.dataset_of_manifest(job.input("dataset"))),
        split=spec["split"],
        layers=layers,
        out_dir=out_dir,
        runtime={**spec["runtime"], "num_workers": max(0, (job.threads or 1) - 1)},
        dtype=spec["tokens"]["dtype"],
        shard_mb=spec["tokens"]["shard_mb"],
        fresh=fresh,
        shard=shard,
    )


def _write_set_marker(
    out_dir: Path, marker: Path, spec: dict[str, Any], paths: dict[int, Path]
) -> None:
    """Remove the stores (and lock files) of layers no longer chosen, then write the token
    set's marker listing its layers' fingerprints."""
    keep = {path.name for path in paths.values()}
    for stale in out_dir.glob("layer_*.zarr*"):
        if stale.name.removesuffix(".done") not in keep:
            (shutil.rmtree if stale.is_dir() else Path.unlink)(stale)
    atomic.write_json(
        marker,
        {
            "encoder": spec["encoder_name"],
            "split": spec["split"],
            "layers": {
                str(layer): tokens.open_token_store(path).fingerprint
                for layer, path in paths.items()
            },
            "completed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
