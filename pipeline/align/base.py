"""The aligner interface, its fit report, and the registry that maps method names to classes.

An aligner maps image features x (n, d1) and text features y (n, d2) of the same pairs into a
shared space. ``build_aligner(method, params)`` makes an unfitted one from its config section;
``fit`` learns (or computes) the map; ``state`` holds every array needed to embed again, so an
artifact (``pipeline.align.artifacts``) can rebuild it with ``load_state``.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
import polars as pl

CURVE_SCHEMA: dict[str, pl.DataType] = {
    "epoch": pl.Int64(),
    "step": pl.Int64(),
    "lr": pl.Float64(),
    "structure_lambda": pl.Float64(),
    "train_loss": pl.Float64(),
    "infonce": pl.Float64(),
    "structure": pl.Float64(),
    "val_loss": pl.Float64(),
    "seconds": pl.Float64(),
}
"""Columns of a training curve, one row per epoch: ``step`` and ``lr`` after its last step,
``structure_lambda`` (lambda_t) at its last step, pair-weighted means of the total loss, InfoNCE
and R_S over its batches, the validation InfoNCE (null without validation pairs; null columns
without STRUCTURE), and its wall-clock seconds."""


def empty_curve() -> pl.DataFrame:
    """The curve of a closed-form method: no rows, the training-curve schema."""
    return pl.DataFrame(schema=CURVE_SCHEMA)


@dataclass
class FitReport:
    """What a fit produced besides the aligner's state.

    ``chosen_epoch``: the (1-based) epoch whose weights were kept, None for closed-form methods.
    ``curve``: one row per epoch with the ``CURVE_SCHEMA`` columns.
    ``extra``: JSON-able facts about the fit (sizes, stopping reason, seconds...).
    """

    chosen_epoch: int | None
    curve: pl.DataFrame = field(default_factory=empty_curve)
    extra: dict[str, Any] = field(default_factory=dict)


def check_features(name: str, a: np.ndarray, width: int | None = None) -> np.ndarray:
    """``a`` as a finite 2-D float64 array, optionally of a given width; else a ValueError."""
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D (n, dim) array, got shape {a.shape}")
    if width is not None and a.shape[1] != width:
        raise ValueError(f"{name}: expected width {width} (as fitted), got {a.shape[1]}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    return a.astype(np.float64, copy=False)


def check_pairs(x: np.ndarray, y: np.ndarray, what: str = "training") -> tuple[np.ndarray, ...]:
    """Image and text features of the same pairs, as float64; else a ValueError naming why."""
    x, y = check_features(f"{what} image features", x), check_features(f"{what} text features", y)
    if len(x) != len(y):
        raise ValueError(f"{what} pairs: {len(x)} image rows but {len(y)} text rows")
    if len(x) < 2:
        raise ValueError(f"{what} pairs: need at least 2 pairs, got {len(x)}")
    return x, y


class Aligner(ABC):
    """A map of both modalities into a shared space; see the module docstring."""

    kind: ClassVar[str]  # the aligner kind (``align.methods.<name>.aligner`` in the config)
    Params: ClassVar[type]  # frozen dataclass of the method's config keys and their defaults

    def __init__(self, params: Any) -> None:
        self.params = params
        self.choices: dict[str, Any] = {}  # data-dependent choices of the last fit, JSON-able

    @abstractmethod
    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        x_val: np.ndarray | None,
        y_val: np.ndarray | None,
        seed: int,
    ) -> FitReport:
        """Fit on pairs (x[i], y[i]); validation pairs, when given, drive early stopping."""

    @abstractmethod
    def embed_image(self, x: np.ndarray) -> np.ndarray:
        """(n, k) float32 image embeddings in the shared space, L2-normalised rows."""

    @abstractmethod
    def embed_text(self, y: np.ndarray) -> np.ndarray:
        """(n, k) float32 text embeddings in the shared space, L2-normalised rows."""

    def similarity(self, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
        """(n_img, n_txt) scores; cosine (inner product of normalised rows) by default."""
        return image_emb @ text_emb.T

    @abstractmethod
    def state(self) -> dict[str, np.ndarray]:
        """Every array needed to embed (weights, means, anchors...)."""

    @abstractmethod
    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Make this (unfitted) aligner equal to the one whose ``state()`` this is."""

    def hyperparameters(self) -> dict[str, Any]:
        """The resolved params (every key ``build_aligner`` accepts) plus ``fitted``: the
        data-dependent choices of the fit (e.g. a dimension reduction)."""
        return {**params_to_dict(self.params), "fitted": dict(self.choices)}

    def _require_fitted(self, ready: bool) -> None:
        if not ready:
            raise RuntimeError(f"{self.kind} aligner is not fitted (call fit or load_state)")


class ClosedFormAligner(Aligner):
    """An aligner whose whole state is a few named arrays (``STATE_KEYS``) set by ``fit``."""

    STATE_KEYS: ClassVar[tuple[str, ...]]

    def __init__(self, params: Any) -> None:
        super().__init__(params)
        self.arrays: dict[str, np.ndarray] = {}

    def fitted(self) -> dict[str, np.ndarray]:
        """The state arrays; a RuntimeError before ``fit`` or ``load_state``."""
        self._require_fitted(bool(self.arrays))
        return self.arrays

    def state(self) -> dict[str, np.ndarray]:
        return dict(self.fitted())

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        self.arrays = state_arrays(self.kind, state, self.STATE_KEYS)


def state_arrays(kind: str, state: dict[str, np.ndarray], keys: tuple[str, ...]) -> dict:
    """The named arrays of a saved state; a ValueError names a missing or unexpected key."""
    missing, extra = set(keys) - set(state), set(state) - set(keys)
    if missing or extra:
        raise ValueError(
            f"{kind} state: missing keys {sorted(missing)}, unexpected keys {sorted(extra)}"
        )
    return {key: np.asarray(state[key]) for key in keys}


ALIGNERS: dict[str, type[Aligner]] = {}
"""Registry: aligner kind -> class; a kind's module registers it when first imported."""

A = TypeVar("A", bound=type[Aligner])
P = TypeVar("P")


def register(cls: A) -> A:
    """Class decorator adding an aligner to ``ALIGNERS`` under its ``method`` name."""
    if cls.kind in ALIGNERS:
        raise ValueError(f"aligner kind {cls.kind!r} is registered twice")
    ALIGNERS[cls.kind] = cls
    return cls


def require(condition: bool, key: str, message: str) -> None:
    """Raise ``ValueError("parameter 'key' message")`` unless ``condition``; for params checks."""
    if not condition:
        raise ValueError(f"parameter {key!r} {message}")


def coerce_param(key: str, value: Any, hint: Any) -> Any:
    """A config value checked against its params field's type hint; ints are accepted as
    floats, numeric strings (YAML reads ``1e-3`` as one) parsed as floats, lists as tuples.
    In a union (``float | str``) the first type is tried first, then the value as it is."""
    options = typing.get_args(hint) if typing.get_origin(hint) is types.UnionType else (hint,)
    if value is None:
        require(type(None) in options, key, "must not be null")
        return None
    kinds = [option for option in options if option is not type(None)]
    kind = kinds[0]
    if dataclasses.is_dataclass(kind):  # a nested section, converted by the params class
        require(isinstance(value, dict | kind), key, f"must be a mapping, got {value!r}")
        return value
    if typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        require(
            isinstance(value, list | tuple) and len(value) == len(items),
            key,
            f"must be a list of {len(items)}",
        )
        return tuple(
            coerce_param(f"{key}[{i}]", v, t)
            for i, (v, t) in enumerate(zip(value, items, strict=True))
        )
    if kind is float and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    ok = any(
        isinstance(value, k) and not (k is not bool and isinstance(value, bool)) for k in kinds
    )
    names = " or ".join(k.__name__ for k in kinds)
    require(ok, key, f"must be of type {names}, got {value!r}")
    return value


def make_params(cls: type[P], values: dict[str, Any], names: dict[str, str] | None = None) -> P:
    """A params dataclass from config values, checking each key and its value's type.

    ``names`` maps config keys to field names where they differ (default: the field names).
    """
    names = names or {f.name: f.name for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in values:
        require(key in names, key, f"is unknown (known: {sorted(names)})")
    return cls(**{names[k]: coerce_param(k, v, hints[names[k]]) for k, v in values.items()})


def params_to_dict(params: Any) -> dict[str, Any]:
    """A params dataclass as a JSON-able dict (nested params use their own ``to_dict``)."""
    out = {}
    for f in dataclasses.fields(params):
        value = getattr(params, f.name)
        out[f.name] = value.to_dict() if hasattr(value, "to_dict") else value
        if isinstance(out[f.name], tuple):
            out[f.name] = list(out[f.name])
    return out


def aligner_params(kind: str, params: dict[str, Any] | None = None) -> Any:
    """The resolved params dataclass of ``kind`` from its config section, without building
    the aligner (torch-free). Unknown kinds, unknown keys and invalid values raise a
    ValueError naming the kind and key."""
    from pipeline.align.params import KIND_PARAMS

    if kind not in KIND_PARAMS:
        raise ValueError(f"unknown aligner {kind!r} (known: {sorted(KIND_PARAMS)})")
    try:
        return make_params(KIND_PARAMS[kind], dict(params or {}))
    except ValueError as err:
        raise ValueError(f"aligner {kind!r}: {err}") from None


def build_aligner(kind: str, params: dict[str, Any] | None = None) -> Aligner:
    """An unfitted aligner of ``kind`` from its config section (missing keys take defaults)."""
    from pipeline.align.params import ALIGNER_MODULES

    resolved = aligner_params(kind, params)
    importlib.import_module(ALIGNER_MODULES[kind])  # registers the kind
    return ALIGNERS[kind](resolved)
