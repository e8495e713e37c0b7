"""The table of aligner kinds: ``align.methods.<name>.aligner`` names a params class, an
aligner class and what the aligner fits on.

Params classes are torch-free (``params.py``), so validating a config never imports a model
library; the aligner class is imported only when an aligner is built. Adding a kind is one row
here and its module (the schema's ``aligner`` enum is checked against ``KINDS`` by
tests/test_config.py).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, NamedTuple

from pipeline.align.params import (
    ASIFParams,
    CSAParams,
    LinearParams,
    MLPParams,
    NoneParams,
    PALParams,
    ProcrustesParams,
    RidgeParams,
    make_params,
)

if TYPE_CHECKING:
    from pipeline.align.base import Aligner


class Kind(NamedTuple):
    params: type  # frozen dataclass of the kind's config keys and their defaults
    aligner: str  # "module:Class" of the aligner, imported on build
    tokens: bool = False  # fits on token sets (``pal.TokenSource``), not pooled feature arrays


KINDS: dict[str, Kind] = {
    "linear": Kind(LinearParams, "pipeline.align.heads:LinearAligner"),
    "mlp": Kind(MLPParams, "pipeline.align.heads:MLPAligner"),
    "csa": Kind(CSAParams, "pipeline.align.csa:CSAAligner"),
    "asif": Kind(ASIFParams, "pipeline.align.asif:ASIFAligner"),
    "procrustes": Kind(ProcrustesParams, "pipeline.align.linear_maps:ProcrustesAligner"),
    "ridge": Kind(RidgeParams, "pipeline.align.linear_maps:RidgeAligner"),
    "pal": Kind(PALParams, "pipeline.align.pal:PALAligner", tokens=True),
    "none": Kind(NoneParams, "pipeline.align.reference:IdentityAligner"),
}


def kind_of(kind: str) -> Kind:
    """The table row of ``kind``; a ValueError names an unknown kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown aligner {kind!r} (known: {sorted(KINDS)})")
    return KINDS[kind]


def uses_tokens(kind: str) -> bool:
    """Whether aligner ``kind`` fits on token caches: its jobs read token stores, not feature
    stores."""
    return kind_of(kind).tokens


def aligner_params(kind: str, params: dict[str, Any] | None = None) -> Any:
    """The resolved params dataclass of ``kind`` from its config section, without building
    the aligner (torch-free). Unknown kinds, unknown keys and invalid values raise a
    ValueError naming the kind and key."""
    row = kind_of(kind)
    try:
        return make_params(row.params, dict(params or {}))
    except ValueError as err:
        raise ValueError(f"aligner {kind!r}: {err}") from None


def aligner_class(kind: str) -> type[Aligner]:
    """The aligner class of ``kind``, its module imported when first built."""
    module, name = kind_of(kind).aligner.split(":")
    return getattr(importlib.import_module(module), name)


def build_aligner(kind: str, params: dict[str, Any] | None = None) -> Aligner:
    """An unfitted aligner of ``kind`` from its config section (missing keys take defaults)."""
    resolved = aligner_params(kind, params)
    return aligner_class(kind)(resolved)
