"""Self-supervised pretraining of a vision encoder on unpaired synthetic images.

``settings`` parses a config's ``pretrain`` block without torch; ``simclr`` trains.
"""

from pipeline.pretrain.settings import (
    DEFAULTS,
    SPLIT,
    PretrainSettings,
    PretrainSpecError,
    initial_spec,
    parse_settings,
    pretrained_spec,
)

__all__ = [
    "DEFAULTS",
    "SPLIT",
    "PretrainSettings",
    "PretrainSpecError",
    "initial_spec",
    "parse_settings",
    "pretrained_spec",
]
