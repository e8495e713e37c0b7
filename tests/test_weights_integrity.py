"""Encoder weights are content-addressed: a user's local ``weights`` file (or model folder) is
part of every request by its SHA-256, and weights pretrained here are checked against their
record before use (docs/formats.md, "Encoder weights")."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_workflow import planned_jobs, snakemake

from pipeline import fingerprint, jobs, layout
from pipeline.config import validate_config
from pipeline.encoders import build_encoder
from pipeline.encoders.registry import planned_spec
from pipeline.encoders.weights import WeightsIntegrityError
from pipeline.pretrain import pretrained_spec
from pipeline.stages.extract_features import run as run_extract
from pipeline.stages.prepare_dataset import run as run_prepare
from pipeline.stores.core import StaleStoreError
from pipeline.stores.features import FeatureStore
from pipeline.verify import verify_results

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}
ARCHITECTURE = {
    "source": "timm",
    "name": "vit_tiny_patch16_224",
    "image_size": 32,
    "model_kwargs": TINY_VIT,
}
WEIGHTS = "user.safetensors"  # relative to the workflow root, as a config would name it


def config_with_weights(on_stale: str = "recompute") -> dict:
    return validate_config(raw_config(on_stale))


def raw_config(on_stale: str = "recompute") -> dict:
    head = {"aligner": "linear", "dim": 8, "max_epochs": 1}
    return copy.deepcopy(
        {
            "runtime": {"device": "cpu", "batch_size": 8, "on_stale": on_stale},
            "datasets": {
                "tiny": {
                    "source": "synthetic",
                    "seed": 3,
                    "image_size": 32,
                    "splits": {"train": 16, "val": 8, "test": 8},
                    "captions_per_image": 1,
                }
            },
            "encoders": {
                "vit_user": {**ARCHITECTURE, "weights": WEIGHTS},
                "minilm": {"source": "bundled", "name": "all-MiniLM-L6-v2", "max_tokens": 16},
            },
            "experiment": {
                "pairs": [{"vision": "vit_user", "text": "minilm"}],
                "train": {"dataset": "tiny", "split": "train"},
                "val": {"dataset": "tiny", "split": "val"},
                "evaluate": [{"dataset": "tiny", "split": "test"}],
            },
            "align": {"n_pairs": [8], "seeds": [0], "methods": {"linear": head}},
        }
    )


def save_vit(path: Path, seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A tiny random ViT's state dict saved as safetensors (every tensor times ``scale``)."""
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", **TINY_VIT)
    state = {key: value * scale for key, value in model.state_dict().items()}
    save_file(state, str(path))
    return state


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def flip_every_100th_float(path: Path) -> None:
    """The sign of every 100th float32 of a safetensors file, its header kept."""
    data = bytearray(path.read_bytes())
    (header,) = struct.unpack("<Q", data[:8])
    for offset in range(8 + header + 3, len(data), 400):
        data[offset] ^= 0x80
    path.write_bytes(bytes(data))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A workflow root (results/ and the hash cache under it) holding a user's weights file."""
    monkeypatch.chdir(tmp_path)
    save_vit(tmp_path / WEIGHTS)
    return tmp_path


def test_the_request_follows_the_weights_bytes_not_their_modification_time(workdir):
    config = config_with_weights()
    job = jobs.extract_features(config, "tiny", "train", "vit_user")
    assert job.input("weights") == WEIGHTS  # a declared input: extraction waits for it
    assert job.spec["encoder"]["weights_sha256"] == sha256(workdir / WEIGHTS)
    fit = jobs.fit_aligners(config, "vit_user", "minilm", "linear", "last").spec
    request = jobs.store_request(config, "tiny", "train", "vit_user")
    assert fit["stores"]["vision_train"] == request

    data = (workdir / WEIGHTS).read_bytes()
    (workdir / WEIGHTS).write_bytes(data)  # the same bytes, written again
    os.utime(workdir / WEIGHTS, ns=(10**18, 10**18))
    assert jobs.extract_features(config, "tiny", "train", "vit_user").spec == job.spec
    assert jobs.store_request(config, "tiny", "train", "vit_user") == request

    save_vit(workdir / WEIGHTS, scale=0.5)  # every matrix x 0.5: the same size, new bytes
    assert len((workdir / WEIGHTS).read_bytes()) == len(data)
    changed = jobs.extract_features(config, "tiny", "train", "vit_user").spec
    assert changed["encoder"]["weights_sha256"] == sha256(workdir / WEIGHTS) != sha256_of(data)
    assert jobs.store_request(config, "tiny", "train", "vit_user") != request
    refit = jobs.fit_aligners(config, "vit_user", "minilm", "linear", "last").spec
    assert refit["stores"]["vision_train"] != fit["stores"]["vision_train"]
    # the text encoder (no local weights) keeps the config's spec and its requests
    assert refit["stores"]["text_train"] == fit["stores"]["text_train"]
    assert jobs.encoder_spec(config, "minilm") == config["encoders"]["minilm"]
    assert "weights" not in jobs.extract_features(config, "tiny", "train", "minilm").inputs


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_local_model_folder_is_addressed_by_its_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"a" * 64)
    spec = {"source": "huggingface", "name": str(folder)}
    cache = tmp_path / "cache.json"
    first = planned_spec("text", spec)["weights_sha256"]
    assert first == fingerprint.content_sha256(folder, cache)
    (folder / "tokenizer.json").write_text("{}")  # a new file the model reads
    assert fingerprint.content_sha256(folder, cache) != first
    hub = {"source": "huggingface", "name": "sentence-transformers/all-MiniLM-L6-v2"}
    assert "weights_sha256" not in planned_spec("text", hub)


def test_the_hash_cache_is_used_until_size_mtime_or_inode_change(tmp_path, monkeypatch):
    weights, cache = tmp_path / "w.safetensors", tmp_path / "cache.json"
    weights.write_bytes(b"one")
    assert fingerprint.content_sha256(weights, cache) == sha256_of(b"one")
    assert not cache.exists()  # written this instant: it could change again unseen ("racy")

    monkeypatch.setattr(fingerprint, "RACY_NS", -(10**15))  # no file is racy from here on
    fake = "0" * 64

    def cached(path: Path) -> str:
        """The hash of ``path`` with its cache entry replaced by ``fake``: ``fake`` when the
        cache is trusted, the real hash when the file is read again."""
        fingerprint.content_sha256(path, cache)
        entries = json.loads(cache.read_text())
        entries[str(path.resolve())]["sha256"] = fake
        cache.write_text(json.dumps(entries))
        return fingerprint.content_sha256(path, cache)

    assert cached(weights) == fake  # an unchanged file is not read again
    weights.write_bytes(b"other")  # another size
    assert fingerprint.content_sha256(weights, cache) == sha256_of(b"other")
    assert cached(weights) == fake
    os.utime(weights, ns=(10**18, 10**18))  # the same bytes, another mtime: read again
    assert fingerprint.content_sha256(weights, cache) == sha256_of(b"other")
    assert cached(weights) == fake
    replacement = tmp_path / "new"
    replacement.write_bytes(b"third")  # as long as "other", same mtime: a new inode
    os.utime(replacement, ns=(10**18, 10**18))
    replacement.replace(weights)
    assert fingerprint.content_sha256(weights, cache) == sha256_of(b"third")
    cache.write_text("not json")  # a damaged cache is only a miss
    assert fingerprint.content_sha256(weights, cache) == sha256_of(b"third")


def extract_train_store(config: dict) -> Path:
    job = jobs.extract_features(config, "tiny", "train", "vit_user")
    run_extract(job)
    return Path(layout.store_of_marker(job.output("marker")))


def test_a_store_of_rewritten_weights_is_refused_by_name_and_rerun(workdir):
    config = config_with_weights(on_stale="error")
    run_prepare(jobs.prepare_dataset(config, "tiny"))
    store = extract_train_store(config)
    before = FeatureStore.open(store).attrs
    assert before["weights"] == {"path": WEIGHTS, "sha256": sha256(workdir / WEIGHTS)}
    assert verify_results(workdir / "results") == []

    save_vit(workdir / WEIGHTS, scale=0.5)
    # verify names the store as stale ...
    [problem] = verify_results(workdir / "results")
    assert problem.where == str(workdir / store) and "vit_user" in problem.what
    assert WEIGHTS in problem.what
    # ... a reading job refuses it ...
    content = json.loads(Path(layout.dataset_manifest("tiny")).read_text())["content_hash"]
    request = jobs.store_request(config, "tiny", "train", "vit_user")
    with pytest.raises(StaleStoreError, match=f"'vit_user'.*{WEIGHTS}"):
        FeatureStore.open_requested(store, request, content)
    # ... and extraction refuses to overwrite it under on_stale: error, naming encoder and file
    with pytest.raises(StaleStoreError, match=f"'vit_user'.*{WEIGHTS}.*on_stale"):
        extract_train_store(config)
    # under recompute it is extracted again, from the new bytes, for the new request
    extract_train_store(config_with_weights())
    after = FeatureStore.open_requested(store, request, content)
    assert after.attrs["weights"]["sha256"] == sha256(workdir / WEIGHTS)
    assert after.attrs["encoder"]["weights_sha256"] == sha256(workdir / WEIGHTS)
    assert verify_results(workdir / "results") == []


def test_weights_changed_after_planning_are_refused_before_use(workdir):
    spec = jobs.encoder_spec(config_with_weights(), "vit_user")
    save_vit(workdir / WEIGHTS, seed=1)
    with pytest.raises(WeightsIntegrityError, match=f"'vit_user'.*{WEIGHTS}.*planned"):
        build_encoder("vit_user", spec)


def pretrained_here(workdir: Path) -> tuple[Path, dict]:
    """Weights as the pretrain_encoder job of encoder ``vit_pre`` leaves them, with its record."""
    weights = workdir / layout.pretrained_weights("vit_pre")
    weights.parent.mkdir(parents=True)
    save_vit(weights, seed=2)
    record = {"objective": "simclr", "weights_sha256": sha256(weights)}
    Path(layout.pretrain_record("vit_pre")).write_text(json.dumps(record))
    spec = {**ARCHITECTURE, "pretrain": {"dataset": "tiny"}}
    return weights, pretrained_spec(spec, layout.pretrained_weights("vit_pre"))


def test_damaged_pretrained_weights_are_refused_before_use_and_named_by_verify(workdir):
    weights, spec = pretrained_here(workdir)
    intact = load_file(weights)
    model = build_encoder("vit_pre", spec).model.state_dict()
    assert all(torch.equal(model[key], intact[key]) for key in intact)

    flip_every_100th_float(weights)
    assert load_file(weights).keys() == intact.keys()  # still a readable safetensors file
    with pytest.raises(WeightsIntegrityError, match=r"'vit_pre'.*vit_pre\.safetensors.*pretrain"):
        build_encoder("vit_pre", spec)
    [problem] = verify_results(workdir / "results", [Path("structure.yaml")])
    assert problem.where == str(weights) and "vit_pre.json" in problem.what
    target = layout.pretrained_weights("vit_pre")
    assert problem.repair.endswith(f"--configfile structure.yaml --force {target}")

    Path(layout.pretrain_record("vit_pre")).unlink()  # weights without their record
    with pytest.raises(WeightsIntegrityError, match="no readable record"):
        build_encoder("vit_pre", spec)
    assert len(verify_results(workdir / "results")) == 1


@pytest.mark.slow
def test_snakemake_plans_the_extraction_again_when_the_bytes_change_not_the_mtime(workdir):
    (workdir / "config.yaml").write_text(yaml.safe_dump(raw_config()))
    target = layout.feature_marker("tiny", "train", "vit_user")
    result = snakemake(workdir, target)
    assert result.returncode == 0, result.output[-3000:]
    weights = workdir / WEIGHTS
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**10))
    assert planned_jobs(workdir, target) == {}  # a newer file of the same bytes: nothing to do
    mtime = weights.stat().st_mtime_ns
    save_vit(weights, scale=0.5)
    os.utime(weights, ns=(mtime, mtime))  # new bytes behind the old modification time
    assert planned_jobs(workdir, target) == {"extract_features": 1}
