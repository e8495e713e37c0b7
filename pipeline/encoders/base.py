"""What every frozen encoder offers the extraction stage, and helpers shared by the sources.

An encoder turns a batch of raw items (images or strings) into one pooled vector per
layer, all layers from a single forward pass, and, for the token caches, into every token of
chosen layers from the same forward pass (``token_layers``). Spec parsing here is plain
Python so that configs can be validated before torch, timm or transformers do any work.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import version
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

POOLINGS = ("cls", "mean")
Pooling = Literal["cls", "mean"]


class EncoderSpecError(ValueError):
    """An encoder spec is malformed; the message names the encoder and the key."""

    def __init__(self, encoder: str, key: str | None, problem: str) -> None:
        where = f"encoder {encoder!r}" + (f", key {key!r}" if key else "")
        super().__init__(f"{where}: {problem}")


class EncoderLoadError(RuntimeError):
    """A valid spec whose model, weights or tokenizer could not be loaded."""


class Encoder(ABC):
    """A frozen encoder exposing a pooled vector for each of its layers."""

    name: str
    modality: Literal["vision", "text"]
    layer_names: list[str]
    dims: list[int]

    @abstractmethod
    def provenance(self) -> dict[str, Any]:
        """JSON-able description of everything that determines the pooled values."""

    @abstractmethod
    def collate(self, items: list) -> dict[str, torch.Tensor]:
        """Preprocess raw items on the CPU into the model's input tensors."""

    @abstractmethod
    def pooled_layers(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """One forward pass; a float (B, dims[l]) tensor for each layer l."""

    @abstractmethod
    def to(self, device: torch.device | str) -> Encoder:
        """Move the model to ``device``; returns self."""

    # Token features (token caches, ``pipeline.stores.tokens``): the same forward pass, every token.
    tokens_per_sample: int | None = None
    """Tokens of every sample when they are all alike (images), None when they vary (text)."""

    def token_layout(self) -> dict[str, Any]:
        """JSON-able facts about a sample's tokens stored with them (vision: prefix tokens and
        the patch grid); empty by default."""
        return {}

    def token_counts(self, items: list) -> list[int]:
        """Tokens per raw item, without a forward pass; only for encoders whose count varies."""
        raise NotImplementedError(f"encoder {self.name!r} has {self.tokens_per_sample} per sample")

    @abstractmethod
    def token_layers(
        self, batch: dict[str, torch.Tensor], layers: list[int]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One forward pass; for each layer index in ``layers`` the tokens (B, T, dims[l]) and
        their mask (B, T), True for a real token (the same states ``pooled_layers`` pools)."""


def check_keys(encoder: str, spec: Mapping[str, Any], allowed: Iterable[str]) -> None:
    """Reject keys a source does not know (typos would otherwise be ignored silently)."""
    allowed = set(allowed)
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise EncoderSpecError(
            encoder, unknown[0], f"unknown key; this source accepts {sorted(allowed)}"
        )


_REQUIRED = object()


def read_option(
    encoder: str, spec: Mapping[str, Any], key: str, kind: type, default: Any = _REQUIRED
) -> Any:
    """``spec[key]`` checked to be a ``kind``; a missing or null key gives ``default``."""
    value = spec.get(key)
    if value is None:
        if default is _REQUIRED:
            raise EncoderSpecError(encoder, key, "is required")
        return default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise EncoderSpecError(encoder, key, f"must be {kind.__name__}, got {value!r}")
    return value


def read_name(encoder: str, spec: Mapping[str, Any]) -> str:
    name = read_option(encoder, spec, "name", str)
    if not name.strip():
        raise EncoderSpecError(encoder, "name", "must not be empty")
    return name


def read_positive_int(encoder: str, spec: Mapping[str, Any], key: str) -> int | None:
    value = read_option(encoder, spec, key, int, None)
    if value is not None and value <= 0:
        raise EncoderSpecError(encoder, key, f"must be a positive integer, got {value}")
    return value


def read_pooling(encoder: str, spec: Mapping[str, Any], default: Pooling) -> Pooling:
    pooling = read_option(encoder, spec, "pooling", str, default)
    if pooling not in POOLINGS:
        raise EncoderSpecError(encoder, "pooling", f"must be one of {POOLINGS}, got {pooling!r}")
    return pooling


def read_init_seed(encoder: str, spec: Mapping[str, Any], needs_seed: bool, why: str) -> int | None:
    """The random-init seed; required when ``needs_seed`` (``why`` explains when)."""
    seed = read_option(encoder, spec, "init_seed", int, None)
    if needs_seed and seed is None:
        raise EncoderSpecError(encoder, "init_seed", f"is required {why}")
    return seed


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Seed torch's CPU generator inside the block and restore the caller's state after it."""
    import torch

    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def package_versions(*packages: str) -> dict[str, str]:
    return {package: version(package) for package in packages}
