"""Vision encoders from timm (``source: timm``): every transformer block is a layer.

Block outputs are read before the final norm, from ``forward_intermediates`` where the
model reports its prefix (class, register) tokens, else from forward hooks on
``model.blocks``. timm is imported on first use: it takes seconds, and validating a
spec must stay cheap.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from pipeline.fingerprint import content_sha256

from .base import (
    Encoder,
    EncoderLoadError,
    EncoderSpecError,
    Pooling,
    package_versions,
    seeded,
)
from .specs import TimmSpec, parse_timm_spec  # noqa: F401  (re-exported: the encoder specs)

# Per block: (prefix tokens (B, P, D), patch tokens (B, N, D)); P may be 0.
BlockTokens = list[tuple[torch.Tensor, torch.Tensor]]


class TimmVisionEncoder(Encoder):
    modality = "vision"

    def __init__(self, name: str, spec: TimmSpec) -> None:
        from timm.data import create_transform, resolve_data_config

        self.name = name
        self.spec = spec
        self.model = create_timm_model(name, spec).eval()
        self.weights_sha256 = content_sha256(spec.weights) if spec.weights else None
        self._block_tokens = _block_token_reader(name, spec, self.model)
        size = spec.image_size or resolve_data_config(model=self.model)["input_size"][-1]
        self.data_config = resolve_data_config(
            {"input_size": (3, size, size), **VIEW_DATA_CONFIG[spec.view]}, model=self.model
        )
        self.transform = create_transform(**self.data_config, is_training=False)
        self.view = image_view(self.transform)
        try:  # one image through the real path: exact widths, and image_size checked early
            with torch.inference_mode():
                blocks = self._block_tokens(self.model, torch.zeros(1, 3, size, size))
                pooled = [pool_tokens(prefix, patches, spec.pooling) for prefix, patches in blocks]
        except Exception as err:
            raise EncoderLoadError(
                f"encoder {name!r}: a forward pass of timm model {spec.name!r} at "
                f"image_size={size} failed: {err}"
            ) from err
        self.layer_names = [f"block.{i}" for i in range(len(pooled))]
        self.dims = [vector.shape[-1] for vector in pooled]
        self.prefix_tokens, self.num_patches = blocks[0][0].shape[1], blocks[0][1].shape[1]
        self.tokens_per_sample = self.prefix_tokens + self.num_patches
        self.grid = patch_grid(self.model, self.num_patches)

    def provenance(self) -> dict[str, Any]:
        return {
            "source": "timm",
            "name": self.spec.name,
            "revision": self.model.pretrained_cfg.get("tag") if self.spec.from_hub else None,
            "weights_sha256": self.weights_sha256,
            "pretrained": self.spec.pretrained,
            "init_seed": self.spec.init_seed,
            "pooling": self.spec.pooling,
            "image_size": self.data_config["input_size"][-1],
            "view": self.spec.view,
            "model_kwargs": self.spec.model_kwargs,
            "preprocessing": {
                key: list(value) if isinstance(value, tuple) else value
                for key, value in self.data_config.items()
            },
            "versions": package_versions("torch", "timm"),
        }

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        for item in items:
            if not isinstance(item, Image.Image):
                raise TypeError(f"encoder {self.name!r} takes PIL images, not {type(item)}")
        return {"pixel_values": torch.stack([self.transform(i.convert("RGB")) for i in items])}

    def pooled_layers(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        blocks = self._block_tokens(self.model, batch["pixel_values"])
        return [pool_tokens(prefix, patches, self.spec.pooling) for prefix, patches in blocks]

    def to(self, device: torch.device | str) -> TimmVisionEncoder:
        self.model.to(device)
        return self

    def token_layout(self) -> dict[str, Any]:
        """Prefix tokens (CLS, registers) come first, then the patches of a row-major grid
        covering the input, which ``view`` places on the original image (``image_view``)."""
        return {
            "prefix_tokens": self.prefix_tokens,
            "grid": None if self.grid is None else list(self.grid),
            "view": self.view,
        }

    def token_layers(
        self, batch: dict[str, torch.Tensor], layers: list[int]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Prefix + patch tokens of the given blocks; the forward stops after the deepest one."""
        wanted = sorted(set(layers))
        blocks = dict(
            zip(wanted, self._block_tokens(self.model, batch["pixel_values"], wanted), strict=True)
        )
        out = []
        for layer in layers:
            prefix, patches = blocks[layer]
            tokens = torch.cat([prefix, patches], dim=1)
            out.append(
                (tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device))
            )
        return out


# What each view asks of timm's eval transform (``resolve_data_config`` overrides): "crop" is the
# model's own (for ViTs the shorter side resized to size / crop_pct, then a centre crop);
# "square" resizes the whole image to the square input, dropping no pixel.
VIEW_DATA_CONFIG: dict[str, dict[str, Any]] = {
    "crop": {},
    "square": {"crop_mode": "squash", "crop_pct": 1.0},
}


def image_view(transform: Any) -> dict[str, Any] | None:
    """Where the model's input lies on the original image, read from the transform's own
    steps: ``resize`` (an int: the shorter side scaled to it, the aspect kept, as torchvision's
    ``Resize``; [h, w]: that exact size) then ``crop`` ([h, w] centre crop, or None). None when
    a step that moves pixels is not one of these (segmentation then refuses the tokens)."""
    from torchvision import transforms

    view: dict[str, Any] = {"resize": None, "crop": None}
    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, transforms.Resize) and view["resize"] is None and not step.max_size:
            size = [step.size] if isinstance(step.size, int) else list(step.size)
            view["resize"] = size[0] if len(size) == 1 else size
        elif isinstance(step, transforms.CenterCrop) and view["crop"] is None and view["resize"]:
            view["crop"] = list(step.size)
        elif not isinstance(step, transforms.ToTensor | transforms.Normalize):
            return None  # timm's MaybeToTensor is a ToTensor
    return view if view["resize"] is not None else None


def pool_tokens(prefix: torch.Tensor, patches: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """CLS = first prefix token; mean = mean over patch tokens only (no class/register)."""
    if pooling == "cls":
        return prefix[:, 0].float()
    return patches.mean(dim=1, dtype=torch.float32)


def patch_grid(model: nn.Module, num_patches: int) -> tuple[int, int] | None:
    """(rows, columns) of the patch grid: the patch embedding's, or the square root of the
    patch count; None when neither fits (the tokens then cannot be decoded into a map)."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is not None and len(grid) == 2 and int(grid[0]) * int(grid[1]) == num_patches:
        return int(grid[0]), int(grid[1])
    side = math.isqrt(num_patches)
    return (side, side) if side * side == num_patches else None


def create_timm_model(encoder: str, spec: TimmSpec) -> nn.Module:
    """The timm model with its weights: a local file, timm's hub path, or a seeded init."""
    import timm

    try:
        with seeded(spec.init_seed):
            model = timm.create_model(spec.name, pretrained=spec.from_hub, **spec.model_kwargs)
    except Exception as err:
        if spec.from_hub:
            problem = (
                f"timm could not load pretrained {spec.name!r} (it fetches weights from the "
                "hub, which needs network or a cached copy; offline, set 'weights' to a local "
                "file)"
            )
        else:
            problem = f"timm could not create {spec.name!r}"
        raise EncoderLoadError(f"encoder {encoder!r}: {problem}: {err}") from err
    if spec.weights is not None:
        state = read_state_dict(spec.weights)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise EncoderLoadError(
                f"encoder {encoder!r}: weights {spec.weights} do not fit timm model "
                f"{spec.name!r}: {err}"
            ) from err
    return model


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A flat state dict from safetensors, or from a torch file with ``weights_only=True``."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EncoderLoadError(f"{path}: expected a flat state dict of tensors")
    return state


def _block_token_reader(
    encoder: str, spec: TimmSpec, model: nn.Module
) -> Callable[..., BlockTokens]:
    """How to read the per-block tokens of ``model``; fails early when pooling is impossible."""
    if _reports_prefix_tokens(model):
        if spec.pooling == "cls" and getattr(model, "cls_token", None) is None:
            raise EncoderSpecError(
                encoder, "pooling", f"timm model {spec.name!r} has no CLS token; use 'mean'"
            )
        return _intermediate_tokens
    if not isinstance(getattr(model, "blocks", None), nn.Module):
        raise EncoderLoadError(
            f"encoder {encoder!r}: timm model {spec.name!r} has neither forward_intermediates "
            "with prefix tokens nor a 'blocks' module; only transformer-style models are supported"
        )
    if spec.pooling == "cls":
        raise EncoderSpecError(
            encoder,
            "pooling",
            f"timm model {spec.name!r} exposes no CLS token in its block outputs; use 'mean'",
        )
    return _hooked_block_tokens


def _reports_prefix_tokens(model: nn.Module) -> bool:
    method = getattr(model, "forward_intermediates", None)
    return method is not None and "return_prefix_tokens" in inspect.signature(method).parameters


def _intermediate_tokens(
    model: nn.Module, pixel_values: torch.Tensor, blocks: list[int] | None = None
) -> BlockTokens:
    """Every block's tokens, or those of ``blocks`` (ascending; the pass stops after the last)."""
    outputs = model.forward_intermediates(
        pixel_values,
        indices=blocks,
        norm=False,
        stop_early=blocks is not None,
        output_fmt="NLC",
        intermediates_only=True,
        return_prefix_tokens=True,
    )
    # timm gives (patches, prefix) pairs, or bare patch tokens when the model has no prefix.
    return [(out[1], out[0]) if isinstance(out, tuple) else (out[:, :0], out) for out in outputs]


def _hooked_block_tokens(
    model: nn.Module, pixel_values: torch.Tensor, blocks: list[int] | None = None
) -> BlockTokens:
    """Block outputs via hooks; all tokens count as patch tokens (these models add none).
    ``blocks`` (ascending) selects some; the pass runs whole."""
    outputs: list[torch.Tensor] = []
    handles = [
        block.register_forward_hook(lambda _module, _args, out: outputs.append(out))
        for block in model.blocks
    ]
    try:
        model.forward_features(pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    if any(out.ndim != 3 for out in outputs) or len({out.shape[1] for out in outputs}) > 1:
        shapes = [tuple(out.shape) for out in outputs]
        raise ValueError(f"block outputs are not token sequences of one length: {shapes}")
    if blocks is not None:
        outputs = [outputs[i] for i in blocks]
    return [(out[:, :0], out) for out in outputs]
