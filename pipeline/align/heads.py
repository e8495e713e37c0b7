"""Trained heads: ``linear`` and ``mlp``, one head per modality into a shared space of ``dim``.

Each head first standardises its input with the training mean and one global scale (the root
mean squared norm of the centred features over sqrt(width)), so the learning rate means the same
for every layer whatever its feature scale; this affine map is fixed, not trained.

The MLP is Linear(d, hidden) - GELU - Dropout - Linear(hidden, dim), plus (``residual: true``)
a linear path Linear(d, dim) added to its output. The skip path is an ordinary trained layer:
the reference code's residual branch is gated by sigmoid(-inf) = 0 and so never trains.

A batch's loss is the symmetric InfoNCE of the two heads' unit embeddings, plus (with
``structure``) lambda_t times (R_S(image) + R_S(text)) / 2. Training (``pipeline.align.training``)
is deterministic on CPU for a seed: torch's generator is forked and seeded for initialisation
and dropout, and shuffling has its own seeded generator.
"""

from __future__ import annotations

from abc import abstractmethod

import numpy as np
import torch
from torch import nn

from pipeline.align.base import Aligner, FitReport, check_features, check_pairs
from pipeline.align.losses import info_nce, structure_regulariser, structure_weight
from pipeline.align.params import LinearParams, MLPParams, TrainConfig
from pipeline.align.training import Loss, train_model

EMBED_CHUNK = 16384  # rows per forward pass when embedding


def as_tensors(arrays: tuple[np.ndarray, ...]) -> tuple[torch.Tensor, ...]:
    """float32 torch tensors of numpy arrays."""
    return tuple(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in arrays)


class Standardise(nn.Module):
    """(x - mean) / scale with fixed (buffer) statistics of the training features."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("scale", torch.ones(()))

    def set_statistics(self, x: torch.Tensor) -> None:
        """Training mean, and the RMS of the centred features per coordinate (1 if constant)."""
        mean = x.double().mean(dim=0)
        rms = (x.double() - mean).square().mean().sqrt()
        self.mean.copy_(mean)
        self.scale.copy_(rms if rms > 0 else torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


class MLP(nn.Module):
    """Linear-GELU-Dropout-Linear, plus an optional trained linear skip path."""

    def __init__(self, width: int, dim: int, hidden: int, dropout: float, residual: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )
        self.skip = nn.Linear(width, dim, bias=False) if residual else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        return out if self.skip is None else out + self.skip(x)


class Towers(nn.Module):
    """An image head and a text head; ``forward`` gives L2-normalised embeddings of both."""

    def __init__(self, image: nn.Module, text: nn.Module) -> None:
        super().__init__()
        self.image = image
        self.text = text

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed_image(x), self.embed_text(y)

    def embed_image(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.image(x), dim=1)

    def embed_text(self, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.text(y), dim=1)


def batch_loss(
    towers: Towers, x: torch.Tensor, y: torch.Tensor, config: TrainConfig, step: int
) -> Loss:
    """A batch's loss at optimiser step ``step``: InfoNCE, plus with STRUCTURE lambda_t times
    (R_S(image) + R_S(text)) / 2."""
    z_img, z_txt = towers(x, y)
    contrastive = info_nce(z_img, z_txt, config.tau)
    s = config.structure
    if s is None:
        return Loss(contrastive, contrastive)
    regulariser = 0.5 * (
        structure_regulariser(x, z_img, config.tau, s.levels, s.divergence)
        + structure_regulariser(y, z_txt, config.tau, s.levels, s.divergence)
    )
    weight = structure_weight(step, s.weight, s.warmup_steps)
    return Loss(contrastive + weight * regulariser, contrastive, regulariser, weight)


def settle_steps(config: TrainConfig) -> int:
    """The optimiser steps before STRUCTURE has its full weight (0 without it). Early stopping
    only counts epochs whose last batch had lambda_t = lambda (t = step - 1;
    ``losses.structure_weight``): the warm-up counts steps, so at small n (one step per epoch)
    patience would otherwise stop training, and choose a model, before lambda ever ramped up
    (docs/methods.md)."""
    return 0 if config.structure is None else config.structure.warmup_steps


def train_towers(
    towers: Towers,
    x: torch.Tensor,
    y: torch.Tensor,
    x_val: torch.Tensor | None,
    y_val: torch.Tensor | None,
    config: TrainConfig,
    seed: int,
) -> FitReport:
    """Train ``towers`` in place on pairs (x[i], y[i]) (``training.train_model``)."""

    def train_loss(model: nn.Module, rows: torch.Tensor, step: int) -> Loss:
        return batch_loss(model, x[rows], y[rows], config, step)

    def val_loss(model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        return info_nce(*model(x_val[rows], y_val[rows]), config.tau)

    val = None if x_val is None else (len(x_val), val_loss)
    return train_model(
        towers, len(x), train_loss, val, config, seed, settle_steps=settle_steps(config)
    )


class HeadAligner(Aligner):
    """Shared logic of the trained heads; subclasses say how one head is built."""

    params: LinearParams

    def __init__(self, params: LinearParams) -> None:
        super().__init__(params)
        self.towers: Towers | None = None

    @abstractmethod
    def make_head(self, width: int) -> nn.Module:
        """One modality's trainable head from ``width`` input features to ``dim``."""

    def build_towers(self, image_width: int, text_width: int) -> Towers:
        return Towers(
            nn.Sequential(Standardise(image_width), self.make_head(image_width)),
            nn.Sequential(Standardise(text_width), self.make_head(text_width)),
        )

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        x_val: np.ndarray | None,
        y_val: np.ndarray | None,
        seed: int,
    ) -> FitReport:
        x, y = as_tensors(check_pairs(x, y))
        if (x_val is None) != (y_val is None):
            raise ValueError("validation pairs: give both x_val and y_val, or neither")
        if x_val is not None:
            x_val, y_val = check_pairs(x_val, y_val, "validation")
            check_features("validation image features", x_val, x.shape[1])
            check_features("validation text features", y_val, y.shape[1])
            x_val, y_val = as_tensors((x_val, y_val))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            towers = self.build_towers(x.shape[1], y.shape[1])
            towers.image[0].set_statistics(x)
            towers.text[0].set_statistics(y)
            report = train_towers(towers, x, y, x_val, y_val, self.params, seed)
        self.towers = towers
        report.extra |= {"n_train": len(x), "n_val": 0 if x_val is None else len(x_val)}
        return report

    @torch.no_grad()
    def _embed(self, head: nn.Module, a: np.ndarray, name: str, width: int) -> np.ndarray:
        a = torch.from_numpy(check_features(name, a, width).astype(np.float32))
        chunks = [
            nn.functional.normalize(head(part), dim=1) for part in torch.split(a, EMBED_CHUNK)
        ]
        return torch.cat(chunks).numpy()

    def embed_image(self, x: np.ndarray) -> np.ndarray:
        self._require_fitted(self.towers is not None)
        width = self.towers.image[0].mean.shape[0]
        return self._embed(self.towers.image, x, "image features", width)

    def embed_text(self, y: np.ndarray) -> np.ndarray:
        self._require_fitted(self.towers is not None)
        width = self.towers.text[0].mean.shape[0]
        return self._embed(self.towers.text, y, "text features", width)

    def state(self) -> dict[str, np.ndarray]:
        self._require_fitted(self.towers is not None)
        return {k: v.detach().numpy().copy() for k, v in self.towers.state_dict().items()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        for key in ("image.0.mean", "text.0.mean"):
            if key not in state:
                raise ValueError(f"{self.kind} state lacks {key!r}")
        with torch.random.fork_rng(devices=[]):  # initial weights are overwritten below
            towers = self.build_towers(len(state["image.0.mean"]), len(state["text.0.mean"]))
        towers.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()})
        self.towers = towers.eval()


class LinearAligner(HeadAligner):
    """One linear layer (with bias) per modality, trained with InfoNCE (+ STRUCTURE)."""

    kind = "linear"

    def make_head(self, width: int) -> nn.Module:
        return nn.Linear(width, self.params.dim)


class MLPAligner(HeadAligner):
    """One MLP (see the module docstring) per modality, trained with InfoNCE (+ STRUCTURE)."""

    kind = "mlp"
    params: MLPParams

    def make_head(self, width: int) -> nn.Module:
        p = self.params
        return MLP(width, p.dim, p.hidden, p.dropout, p.residual)
