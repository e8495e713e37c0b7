"""The two towers of an open_clip CLIP model (``source: open_clip_vision`` / ``open_clip_text``):
an already-aligned pair, the reference row both papers compare with (docs/methods.md).

Each tower has one layer, ``embed``: its joint-space embedding (``encode_image`` /
``encode_text``, before CLIP's L2 normalisation), so the layer choice is trivial and the
``none`` aligner (``pipeline.align.reference``) scores the pair as CLIP itself does. Images go
through CLIP's own eval transform (``open_clip.image_transform``: the shorter side resized, a
centre crop), text through its tokenizer (padded to the context length). The towers expose no
tokens: token methods (PAL) and segmentation need a timm / Hugging Face encoder. open_clip is
imported on first use.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from PIL import Image

from pipeline.fingerprint import content_sha256

from .base import Encoder, EncoderLoadError, package_versions, seeded
from .specs import OpenCLIPSpec

LAYER = "embed"


def create_clip_model(encoder: str, spec: OpenCLIPSpec) -> torch.nn.Module:
    """The CLIP model in eval mode: open_clip's pretrained tag, a local checkpoint, or a seeded
    random init."""
    import open_clip

    try:
        with seeded(spec.init_seed):
            model = open_clip.create_model(
                spec.name,
                pretrained=spec.pretrained,
                pretrained_image=False,
                require_pretrained=spec.pretrained is not None,
                **spec.model_kwargs,
            )
        if spec.weights is not None:
            open_clip.load_checkpoint(model, str(spec.weights))
    except Exception as err:  # open_clip raises many kinds (unknown name, no network, shapes)
        raise EncoderLoadError(
            f"encoder {encoder!r}: open_clip could not create {spec.name!r}"
            f"{f' with weights {spec.pretrained!r}' if spec.pretrained else ''}: {err}"
        ) from err
    return model.eval()


class _OpenCLIPTower(Encoder):
    """What both towers share: the model, one layer, provenance, no tokens."""

    PROBE: ClassVar[tuple]  # one raw item, run through the real path to read the width

    def __init__(self, name: str, spec: OpenCLIPSpec) -> None:
        self.name, self.spec = name, spec
        self.model = create_clip_model(name, spec)
        self.weights_sha256 = content_sha256(spec.weights) if spec.weights else None
        self.layer_names = [LAYER]
        self.prepare()
        with torch.inference_mode():
            self.dims = [self.pooled_layers(self.collate(list(self.PROBE)))[0].shape[-1]]

    def prepare(self) -> None:
        """Set up the tower's preprocessing (transform or tokenizer)."""

    def provenance(self) -> dict[str, Any]:
        return {
            "source": f"open_clip_{self.modality}",
            "name": self.spec.name,
            "pretrained": self.spec.pretrained,
            "weights_sha256": self.weights_sha256,
            "init_seed": self.spec.init_seed,
            "model_kwargs": self.spec.model_kwargs,
            "versions": package_versions("torch", "open_clip_torch"),
        }

    def to(self, device: torch.device | str) -> _OpenCLIPTower:
        self.model.to(device)
        return self

    def token_layers(self, batch: dict[str, torch.Tensor], layers: list[int]) -> list:
        raise NotImplementedError(
            f"encoder {self.name!r}: open_clip towers give their joint embedding only; token "
            "methods (pal) and segmentation need a timm or Hugging Face encoder"
        )


class OpenCLIPVisionEncoder(_OpenCLIPTower):
    modality = "vision"
    PROBE = (Image.new("RGB", (8, 8)),)

    def prepare(self) -> None:
        import open_clip

        cfg = self.model.visual.preprocess_cfg  # CLIP's own eval preprocessing
        self.transform = open_clip.image_transform(
            cfg["size"],
            is_train=False,
            mean=cfg["mean"],
            std=cfg["std"],
            resize_mode=cfg["resize_mode"],
            interpolation=cfg["interpolation"],
            fill_color=cfg["fill_color"],
        )

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        for item in items:
            if not isinstance(item, Image.Image):
                raise TypeError(f"encoder {self.name!r} takes PIL images, not {type(item)}")
        return {"pixel_values": torch.stack([self.transform(i.convert("RGB")) for i in items])}

    def pooled_layers(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [self.model.encode_image(batch["pixel_values"]).float()]


class OpenCLIPTextEncoder(_OpenCLIPTower):
    modality = "text"
    PROBE = ("a photo",)

    def prepare(self) -> None:
        import open_clip

        self.tokenizer = open_clip.get_tokenizer(
            self.spec.name, context_length=self.model.context_length
        )

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        for item in items:
            if not isinstance(item, str):
                raise TypeError(f"encoder {self.name!r} takes strings, not {type(item)}")
        return {"input_ids": self.tokenizer(items)}

    def pooled_layers(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [self.model.encode_text(batch["input_ids"]).float()]
