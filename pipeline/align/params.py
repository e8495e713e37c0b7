"""Every aligner kind's hyper-parameters: frozen dataclasses built from config sections.

Torch-free on purpose: the config is validated when the workflow is read (``snakemake -n``
included) by building these (``make_params``), without importing any model code; the table of
kinds (``pipeline.align.kinds``) names each kind's params class. Definitions: docs/methods.md.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar, get_args

P = TypeVar("P")


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


Divergence = Literal["js", "reference"]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)
PalPooling = Literal["cap", "mean", "cls"]
PAL_POOLINGS: tuple[str, ...] = get_args(PalPooling)
Schedule = Literal["cosine", "reference"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)
Clip = Literal["global", "per_tower", "per_tensor"]
CLIPS: tuple[str, ...] = get_args(Clip)
AnchorUpdate = Literal["project", "free"]
ANCHOR_UPDATES: tuple[str, ...] = get_args(AnchorUpdate)
AUTO_LR = "auto"


@dataclass(frozen=True)
class StructureConfig:
    """The STRUCTURE regulariser: config keys ``lambda``, ``levels``, ``warmup_steps`` and
    ``divergence`` ("js": true Jensen-Shannon; "reference": the reference code's variant, with
    which lambda = 10 was tuned)."""

    weight: float = 10.0
    levels: int = 1
    warmup_steps: int = 1000
    divergence: str = "js"

    CONFIG_KEYS: ClassVar[dict[str, str]] = {
        "lambda": "weight",
        "levels": "levels",
        "warmup_steps": "warmup_steps",
        "divergence": "divergence",
    }

    def __post_init__(self) -> None:
        require(self.weight >= 0, "lambda", f"must be >= 0, got {self.weight}")
        require(self.levels >= 1, "levels", f"must be >= 1, got {self.levels}")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(
            self.divergence in DIVERGENCES,
            "divergence",
            f"must be one of {DIVERGENCES}, got {self.divergence!r}",
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StructureConfig:
        """From the config section; a ValueError names a bad ``structure.<key>``."""
        try:
            return make_params(cls, values, cls.CONFIG_KEYS)
        except ValueError as err:
            raise ValueError(str(err).replace("parameter '", "parameter 'structure.", 1)) from None

    def to_dict(self) -> dict[str, Any]:
        return {key: getattr(self, name) for key, name in self.CONFIG_KEYS.items()}


@dataclass(frozen=True)
class Optimisation:
    """Optimisation settings of every trained aligner (config keys = field names).

    ``lr``: the AdamW learning rate, or ``"auto"``: chosen per fit by the learning-rate
    finder (``pipeline.align.lr_finder``). ``schedule``: ``"cosine"`` (linear warm-up over
    ``warmup_steps``, then cosine decay to 0 over ``max_epochs``) or ``"reference"`` (the
    STRUCTURE code's periodic ``CosineAnnealingLR``, no warm-up, T_max = ``schedule_t_max``
    epochs of floor(n / batch_size) optimiser steps). ``clip``: gradient-norm clipping at
    ``grad_clip`` over all parameters (``"global"``), over each modality's parameters
    separately (``"per_tower"``, the reference code's) or over each tensor (``"per_tensor"``).
    Definitions: docs/methods.md.
    """

    lr: float | str = 5e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    batch_size: int = 4096
    max_epochs: int = 100
    patience: int = 10
    warmup_steps: int = 0
    grad_clip: float = 1.0
    tau: float = 0.05
    schedule: str = "cosine"
    schedule_t_max: int = 50
    clip: str = "global"

    def __post_init__(self) -> None:
        auto = self.lr == AUTO_LR
        number = isinstance(self.lr, int | float) and not isinstance(self.lr, bool)
        require(auto or (number and self.lr > 0), "lr", f"must be > 0 or 'auto', got {self.lr!r}")
        require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        require(all(0 <= b < 1 for b in self.betas), "betas", "must lie in [0, 1)")
        require(self.batch_size >= 2, "batch_size", f"must be >= 2, got {self.batch_size}")
        require(self.max_epochs >= 1, "max_epochs", f"must be >= 1, got {self.max_epochs}")
        require(self.patience >= 1, "patience", f"must be >= 1, got {self.patience}")
        require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        require(self.grad_clip > 0, "grad_clip", f"must be > 0, got {self.grad_clip}")
        require(self.tau > 0, "tau", f"must be > 0, got {self.tau}")
        require(
            self.schedule in SCHEDULES,
            "schedule",
            f"must be one of {SCHEDULES}, got {self.schedule!r}",
        )
        require(
            self.schedule_t_max >= 1, "schedule_t_max", f"must be >= 1, got {self.schedule_t_max}"
        )
        require(
            self.schedule == "cosine" or self.warmup_steps == 0,
            "warmup_steps",
            "must be 0 with schedule 'reference' (that schedule has no warm-up)",
        )
        require(self.clip in CLIPS, "clip", f"must be one of {CLIPS}, got {self.clip!r}")


@dataclass(frozen=True)
class TrainConfig(Optimisation):
    """The trained heads' settings: ``Optimisation`` plus ``structure``, None (off) or a
    ``StructureConfig`` / its config dict."""

    structure: StructureConfig | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.structure, dict):
            object.__setattr__(self, "structure", StructureConfig.from_dict(self.structure))
        require(
            self.structure is None or isinstance(self.structure, StructureConfig),
            "structure",
            "must be null or a mapping of lambda, levels, warmup_steps, divergence",
        )


@dataclass(frozen=True)
class LinearParams(TrainConfig):
    """``linear`` config: the shared-space width ``dim`` plus the training settings."""

    dim: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.dim >= 1, "dim", f"must be >= 1, got {self.dim}")


@dataclass(frozen=True)
class MLPParams(LinearParams):
    """``mlp`` config: ``linear``'s plus the hidden width, dropout and the residual path."""

    hidden: int = 1024
    dropout: float = 0.1
    residual: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.hidden >= 1, "hidden", f"must be >= 1, got {self.hidden}")
        require(0 <= self.dropout < 1, "dropout", f"must lie in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class CSAParams:
    """``csa`` config: canonical dimensions kept, covariance ridge (``eps: 0``: unregularised,
    the authors' estimator), the policy for a singular side, and whether the score weights the
    canonical coordinates by their correlations or equally (``equal_weights``)."""

    sim_dim: int = 64
    eps: float = 0.1
    reduce: str = "pca"
    pca_dim: int | None = None
    equal_weights: bool = False

    def __post_init__(self) -> None:
        require(self.sim_dim >= 1, "sim_dim", f"must be >= 1, got {self.sim_dim}")
        require(self.eps >= 0, "eps", f"must be >= 0, got {self.eps}")
        require(self.reduce in ("pca", "error"), "reduce", f"must be pca or error: {self.reduce!r}")
        require(self.pca_dim is None or self.pca_dim >= 1, "pca_dim", "must be null or >= 1")


@dataclass(frozen=True)
class ASIFParams:
    """``asif`` config: anchors kept per query (k) and the exponent (p)."""

    k: int = 800
    p: float = 8.0

    def __post_init__(self) -> None:
        require(self.k >= 1, "k", f"must be >= 1, got {self.k}")
        require(self.p > 0, "p", f"must be > 0, got {self.p}")


@dataclass(frozen=True)
class ProcrustesParams:
    """``procrustes`` config: the common PCA width (null: min(d1, d2, n - 1))."""

    dim: int | None = None

    def __post_init__(self) -> None:
        require(self.dim is None or self.dim >= 1, "dim", f"must be null or >= 1, got {self.dim}")


@dataclass(frozen=True)
class RidgeParams:
    """``ridge`` config: the L2 penalty alpha on the map (features are unit rows, centred)."""

    alpha: float = 1.0

    def __post_init__(self) -> None:
        require(self.alpha >= 0, "alpha", f"must be >= 0, got {self.alpha}")


@dataclass(frozen=True)
class NoneParams:
    """``none`` config (the reference row, ``reference.py``): no hyper-parameters."""


@dataclass(frozen=True)
class PALParams(Optimisation):
    """``pal`` config (keys = field names; the optimisation keys are ``Optimisation``'s).

    ``anchors``: K per modality; ``tau_p``: CAP temperature; ``pooling``: cap, mean or cls;
    ``tau``: the fixed InfoNCE temperature; ``anchor_update``: ``project`` (back onto the unit
    sphere after every optimiser step) or ``free`` (left as the step leaves them, normalised
    only in the forward pass: the PAL authors') (docs/pal.md).
    """

    anchors: int = 512
    tau_p: float = 0.03
    pooling: str = "cap"
    anchor_update: str = "project"

    def __post_init__(self) -> None:
        require(self.anchors >= 1, "anchors", f"must be >= 1, got {self.anchors}")
        require(self.tau_p > 0, "tau_p", f"must be > 0, got {self.tau_p}")
        require(self.pooling in PAL_POOLINGS, "pooling", f"must be one of {PAL_POOLINGS}")
        require(
            self.anchor_update in ANCHOR_UPDATES,
            "anchor_update",
            f"must be one of {ANCHOR_UPDATES}, got {self.anchor_update!r}",
        )
        super().__post_init__()
