"""Extraction: run one frozen encoder over one dataset split into block stores.

Two kinds share one path (``Kind``): pooled features, every layer of the encoder in one
feature store (``pipeline.stores.features``), and token features, one token store per chosen
layer (``pipeline.stores.tokens``). Vision encoders run over the split's distinct images,
text encoders over its captions (or, for the pseudo-split ``prompts``, over the dataset's
zero-shot prompts). ``extract`` opens (creates or resumes) every store of the job, runs the
encoder once over every row some store still needs and writes each block as soon as it is
whole; a killed run resumes from the blocks it finished and ends with the stores an
uninterrupted run makes, since every block is computed the same way.

Sharded (``runtime.extract_shards`` > 1): a shard job (``run_shard``) writes one contiguous
run of every store's blocks, marked by a run mark while it works (a shard whose mark is
still there was killed and resumes; any other run of it redoes its blocks); the job of the
whole set then only finishes the stores (``finish``).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pipeline import atomic, layout
from pipeline.data import load_prompts, load_split, read_manifest
from pipeline.encoders import Encoder, build_encoder
from pipeline.encoders.registry import encoder_weights
from pipeline.jobs import PROMPTS_SPLIT, Job
from pipeline.similarity.selection import read_layer_choice
from pipeline.stores import keys
from pipeline.stores.core import (
    BlockStoreWriter,
    RunMark,
    StoreReader,
    finish_shards,
    open_shard,
    read_attrs,
)
from pipeline.stores.features import FeatureStore, FeatureWriter
from pipeline.stores.tokens import TokenStore, TokenWriter, plan_blocks
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


@dataclass
class Source:
    """One encoder over one dataset split: what every store of an extraction job is made of.
    ``runtime``: the job's runtime settings (``pipeline.jobs.EXTRACT_RUNTIME``,
    ``TOKEN_RUNTIME``) and ``num_workers``."""

    encoder_name: str
    encoder_spec: dict[str, Any]
    dataset_dir: Path
    split: str
    runtime: dict[str, Any]

    @classmethod
    def of_job(cls, job: Job) -> Source:
        """The job's source; ``threads - 1`` image loaders."""
        spec = job.spec
        return cls(
            spec["encoder_name"],
            spec["encoder"],
            Path(layout.dataset_of_manifest(job.input("dataset"))),
            spec["split"],
            {**spec["runtime"], "num_workers": max(0, (job.threads or 1) - 1)},
        )

    @cached_property
    def encoder(self) -> Encoder:
        return build_encoder(self.encoder_name, self.encoder_spec)

    @cached_property
    def provenance(self) -> dict[str, Any]:
        return self.encoder.provenance()

    @cached_property
    def dataset(self) -> dict[str, Any]:
        """The dataset's manifest, with its name."""
        manifest = read_manifest(Path(self.dataset_dir))
        return {"name": manifest.get("name", Path(self.dataset_dir).name), **manifest}

    @cached_property
    def items(self) -> tuple[list[str], Callable[[int], Any]]:
        """The sample ids of the rows and a loader for row i."""
        return split_items(Path(self.dataset_dir), self.split, self.encoder.modality)

    def fingerprint(self, fmt: keys.Format, **extra: Any) -> str:
        precision = self.runtime["precision"]
        return keys.fingerprint(fmt, self.provenance, self.dataset, self.split, precision, **extra)

    def attrs(self, fmt: keys.Format, **extra: Any) -> dict[str, Any]:
        """What a store records of where its values came from: the encoder (config name,
        architecture under ``model``), its local weights and the SHA-256 they were checked
        against (``encoder_weights``), the dataset split, library versions, the precision and
        the request (``extra``: what the layout adds to it)."""
        name, precision = self.dataset["name"], self.runtime["precision"]
        weights = encoder_weights(self.encoder_name, self.encoder_spec)
        return {
            "encoder": {
                **self.provenance,
                "name": self.encoder_name,  # the config's name; the architecture is under "model"
                "model": self.provenance["name"],
                "modality": self.encoder.modality,
            },
            "weights": weights and {"path": str(weights.path), "sha256": weights.sha256},
            "dataset": {
                "name": name,
                "split": self.split,
                "content_hash": self.dataset["content_hash"],
                "spec": self.dataset.get("spec"),
            },
            "versions": library_versions(),
            "precision": precision,
            "request": keys.request_hash(
                fmt, self.encoder_name, self.encoder_spec, name, self.split, precision, **extra
            ),
        }


class Kind:
    """One kind of extraction: the stores a job writes (``stores``), what the encoder gives
    each of them per batch (``forward``, ``row``), in which passes over the rows (``passes``),
    and what its markers say (``summary``, ``shard_record``, ``shard_prints``)."""

    fmt: keys.Format
    reader: type[StoreReader]
    writer: type[BlockStoreWriter]

    def target(self, marker: str) -> Path:
        """The store or folder of the job whose output or shard marker is ``marker``."""
        raise NotImplementedError

    def stores(
        self, source: Source, target: Path, layers: Sequence[int] | None
    ) -> dict[Path, tuple[str, Callable[..., BlockStoreWriter]]]:
        """store -> (its fingerprint, ``open_writer(fresh=, shared=)``)."""
        raise NotImplementedError

    def forward(self, encoder: Encoder, batch: dict[str, torch.Tensor]) -> list[Any]:
        """What a batch gives each store, in the order of ``stores``."""
        raise NotImplementedError

    def row(self, output: Any, b: int) -> Any:
        """What batch row ``b`` of one store's ``output`` adds to it (``BlockStoreWriter.add``)."""
        raise NotImplementedError

    def passes(self, writers: Sequence[BlockStoreWriter], blocks: Sequence[range]) -> list[Any]:
        """The rows to encode, pass by pass: every row some store still needs, in one pass."""
        rows = [writer.pending_rows(own) for writer, own in zip(writers, blocks, strict=True)]
        return [np.unique(np.concatenate([np.zeros(0, np.int64), *rows]))]

    def summary(self, writer: BlockStoreWriter) -> dict[str, Any]:
        """What a store's completion marker says of the job."""
        attrs = writer.group.attrs
        return {"encoder": attrs["encoder"]["name"], "split": attrs["dataset"]["split"]}

    def shard_record(self, target: Path, prints: dict[Path, str]) -> dict[str, Any]:
        """What a shard marker records of the fingerprints of the stores it wrote."""
        raise NotImplementedError

    def shard_prints(self, target: Path, record: dict[str, Any]) -> dict[Path, str]:
        raise NotImplementedError


def extract(
    kind: Kind,
    source: Source,
    target: Path,
    layers: Sequence[int] | None = None,
    *,
    fresh: bool = False,
    shard: tuple[int, int] | None = None,
) -> list[Path]:
    """Extract the stores of ``kind`` (of ``layers``, for tokens) of ``source`` at ``target``;
    returns them. Unless ``fresh``, a store finished with the expected fingerprint is kept and
    a killed run's resumed; ``fresh``, or a store finished before whose marker is gone (its job
    was forced), is recomputed from scratch (``BlockStoreWriter.open_writer``).

    ``shard=(k, n)``: write only the k-th of n contiguous runs of each store's blocks, as one
    of n jobs sharing them (``core.shard_blocks``); ``finish`` completes them. The shard's
    finished blocks are kept (a killed shard resuming), unless ``fresh``; it never touches
    another shard's blocks."""
    stores = kind.stores(source, Path(target), layers)
    writers, blocks = [], []
    for path, (key, open_writer) in stores.items():
        if not fresh and shard is None:
            try:
                kind.reader.open(path, key)
            except (OSError, RuntimeError, ValueError, KeyError):
                pass
            else:
                log.info("%s: finished before, kept", path)
                continue
        if shard is None:
            writer, own = open_writer(fresh=fresh, shared=False), None
        else:
            writer, own = open_shard(open_writer, path, shard, fresh)
        writers.append(writer)
        blocks.append(range(writer.n_blocks) if own is None else own)
    what = f"{source.encoder_name} {source.split}" + (
        "" if shard is None else f" (shard {shard[0]} of {shard[1]})"
    )
    _fill(kind, source, writers, blocks, what)
    for writer, own in zip(writers, blocks, strict=True):
        if shard is None:
            writer.finalize(kind.summary(writer))
        else:
            writer.verify_blocks(own)  # the completion job trusts each shard's own check
    return list(stores)


def _fill(
    kind: Kind,
    source: Source,
    writers: list[BlockStoreWriter],
    blocks: list[range],
    what: str,
) -> None:
    """Encode every row some writer still needs (of its ``blocks``), feeding each writer."""
    passes = kind.passes(writers, blocks)
    total = sum(map(len, passes))
    if not total:
        return
    needs = [set(w.pending_rows(own).tolist()) for w, own in zip(writers, blocks, strict=True)]
    runtime, encoder = source.runtime, source.encoder
    device = resolve_device(runtime["device"])
    encoder.to(device)
    dtype = PRECISIONS[runtime["precision"]]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    batch_size = runtime["batch_size"]
    log.info("%s: %d stores, %d rows to encode on %s", what, len(writers), total, device)
    with torch.inference_mode(), autocast, tqdm(total=total, unit="sample", desc=what) as bar:
        for rows in passes:
            loader = DataLoader(
                Rows(rows.tolist(), source.items[1]),
                batch_size=batch_size,
                num_workers=runtime["num_workers"],
                collate_fn=encoder.collate,
            )
            for start, batch in zip(range(0, len(rows), batch_size), loader, strict=True):
                batch_rows = rows[start : start + batch_size].tolist()
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                outputs = kind.forward(encoder, batch)
                for writer, need, output in zip(writers, needs, outputs, strict=True):
                    for b, row in enumerate(batch_rows):
                        if row in need:
                            writer.add(row, kind.row(output, b))
                bar.update(len(batch_rows))


def finish(kind: Kind, target: Path, shard_markers: Sequence[str | Path]) -> list[Path]:
    """Finish the stores the shard jobs of ``shard_markers`` wrote at ``target``
    (``core.finish_shards``); returns them."""
    records = {Path(m): json.loads(Path(m).read_text()) for m in shard_markers}
    shards = {
        m: (kind.shard_prints(target, r), r["shard"], r["shards"]) for m, r in records.items()
    }
    paths = list(next(iter(shards.values()))[0])
    writers = [kind.writer.open_existing(path) for path in paths]
    finish_shards(f"{kind.fmt.kind} {target}", target, writers, shards, kind.summary(writers[0]))
    return paths


def run_shard(job: Job, kind: Kind, layers: Sequence[int] | None = None) -> None:
    """A shard job (``pipeline.jobs.extract_features_shard``, ``extract_tokens_shard``): one
    run of the blocks of every store of the job, then its marker."""
    spec, marker = job.spec, job.output("shard")
    target = kind.target(marker)
    shard = (spec["shard"], spec["shards"])
    with RunMark(layout.shard_run_mark(marker)) as fresh:
        paths = extract(kind, Source.of_job(job), target, layers, fresh=fresh, shard=shard)
        prints = {path: read_attrs(path)["fingerprint"] for path in paths}
        atomic.write_json(
            marker,
            {
                **kind.shard_record(target, prints),
                "shard": spec["shard"],
                "shards": spec["shards"],
                "completed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )


# ---- the two kinds ------------------------------------------------------------------------------


class Features(Kind):
    """Pooled features: every layer in the job's one feature store."""

    fmt, reader, writer = keys.FEATURES, FeatureStore, FeatureWriter

    def target(self, marker: str) -> Path:
        if layout.is_shard_marker(marker):
            return Path(layout.store_of_shard_marker(marker))
        return Path(layout.store_of_marker(marker))

    def stores(
        self, source: Source, target: Path, layers: Sequence[int] | None
    ) -> dict[Path, tuple[str, Callable[..., BlockStoreWriter]]]:
        encoder, runtime = source.encoder, source.runtime
        key = source.fingerprint(self.fmt)
        open_writer = partial(
            FeatureWriter.create_or_resume,
            target,
            fingerprint=key,
            sample_ids=source.items[0],
            layer_names=encoder.layer_names,
            dims=encoder.dims,
            on_stale=runtime["on_stale"],
            chunk_bytes=int(runtime["chunk_mb"] * 2**20),
            attrs=source.attrs(self.fmt),
        )
        return {target: (key, open_writer)}

    def forward(self, encoder: Encoder, batch: dict[str, torch.Tensor]) -> list[Any]:
        return [[layer.float().cpu().numpy() for layer in encoder.pooled_layers(batch)]]

    def row(self, output: Any, b: int) -> Any:
        return [layer[b] for layer in output]

    def passes(self, writers: Sequence[BlockStoreWriter], blocks: Sequence[range]) -> list[Any]:
        """One pass per block: a batch never spans two blocks."""
        return [
            np.arange(rows.start, rows.stop)
            for writer, own in zip(writers, blocks, strict=True)
            for rows in map(writer.rows_of, writer.missing_blocks(own))
        ]

    def summary(self, writer: BlockStoreWriter) -> dict[str, Any]:
        return {**super().summary(writer), "layers": len(writer.group.attrs["layer_names"])}

    def shard_record(self, target: Path, prints: dict[Path, str]) -> dict[str, Any]:
        return {"fingerprint": prints[target]}

    def shard_prints(self, target: Path, record: dict[str, Any]) -> dict[Path, str]:
        return {target: record["fingerprint"]}


class Tokens(Kind):
    """Token features: one token store per chosen layer, in the job's token set folder."""

    fmt, reader, writer = keys.TOKENS, TokenStore, TokenWriter

    def __init__(self, settings: dict[str, Any] | None = None) -> None:
        """``settings``: the config's ``tokens`` section; None for a completion job, which
        only finishes the stores its shard jobs wrote."""
        self.settings = settings
        self.layers: list[int] = []

    def target(self, marker: str) -> Path:
        if layout.is_shard_marker(marker):
            return Path(layout.tokens_dir_of_shard_marker(marker))
        return Path(layout.tokens_dir_of_marker(marker))

    def stores(
        self, source: Source, target: Path, layers: Sequence[int] | None
    ) -> dict[Path, tuple[str, Callable[..., BlockStoreWriter]]]:
        encoder, (sample_ids, load_item) = source.encoder, source.items
        for layer in layers:
            if not 0 <= layer < len(encoder.layer_names):
                raise ValueError(
                    f"encoder {source.encoder_name!r} has {len(encoder.layer_names)} layers, "
                    f"not {layer}"
                )
        fixed = encoder.tokens_per_sample
        if fixed is not None:
            counts = np.full(len(sample_ids), fixed, dtype=np.int64)
        else:
            counts = np.asarray(
                encoder.token_counts([load_item(i) for i in range(len(sample_ids))])
            )
        if self.settings is None:
            raise ValueError("a token extraction needs the config's tokens section")
        dtype, shard_mb = self.settings["dtype"], self.settings["shard_mb"]
        target.mkdir(parents=True, exist_ok=True)
        attrs = source.attrs(self.fmt, dtype=dtype)
        stores = {}
        for layer in layers:
            dim = encoder.dims[layer]
            key = source.fingerprint(self.fmt, layer=int(layer), dtype=dtype)
            itemsize, shard_bytes = np.dtype(dtype).itemsize, int(shard_mb * 2**20)
            plan = plan_blocks(counts, dim, itemsize, shard_bytes, fixed is not None)
            open_writer = partial(
                TokenWriter.create_or_resume,
                Path(layout.token_store(str(target), layer)),
                fingerprint=key,
                sample_ids=sample_ids,
                plan=plan,
                dim=dim,
                dtype=dtype,
                on_stale=source.runtime["on_stale"],
                attrs={
                    **attrs,
                    "layer": int(layer),
                    "layer_name": encoder.layer_names[layer],
                    "layout": encoder.token_layout(),
                },
            )
            stores[Path(layout.token_store(str(target), layer))] = (key, open_writer)
        self.layers = list(layers)
        return stores

    def forward(self, encoder: Encoder, batch: dict[str, torch.Tensor]) -> list[Any]:
        return [
            (values.float().cpu().numpy(), mask.cpu().numpy())
            for values, mask in encoder.token_layers(batch, self.layers)
        ]

    def row(self, output: Any, b: int) -> Any:
        values, mask = output
        return values[b][mask[b]]

    def shard_record(self, target: Path, prints: dict[Path, str]) -> dict[str, Any]:
        return {"layers": {str(self.layer_of(path)): fp for path, fp in prints.items()}}

    def shard_prints(self, target: Path, record: dict[str, Any]) -> dict[Path, str]:
        layers = record["layers"].items()
        return {Path(layout.token_store(str(target), layer)): fp for layer, fp in layers}

    @staticmethod
    def layer_of(path: Path) -> int:
        return int(read_attrs(path)["layer"])


def job_layers(job: Job) -> list[int]:
    """The layers a token job extracts: its side's, chosen in its ``layers`` inputs."""
    spec = job.spec
    return chosen_layers(job.input_list("layers"), spec["side"], spec["layer_choices"])


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


def write_token_set(marker: Path, spec: dict[str, Any], paths: Sequence[Path]) -> None:
    """Remove the stores (and lock files) of layers no longer chosen from the token set's
    folder, then write the set's marker listing its layers' fingerprints."""
    folder = Path(layout.tokens_dir_of_marker(str(marker)))
    keep = {path.name for path in paths}
    for stale in folder.glob(layout.TOKEN_STORE_FILES):
        if stale.name.removesuffix(layout.MARKER_SUFFIX) not in keep:
            (shutil.rmtree if stale.is_dir() else Path.unlink)(stale)
    stores = [TokenStore.open(path) for path in paths]
    atomic.write_json(
        marker,
        {
            "encoder": spec["encoder_name"],
            "split": spec["split"],
            "layers": {str(store.layer): store.fingerprint for store in stores},
            "completed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
