"""Training of a pair of heads: symmetric InfoNCE (+ STRUCTURE), AdamW, cosine schedule, early stop.

The configuration follows STRUCTURE's reference settings (docs/methods.md): AdamW with betas
(0.9, 0.95) and weight decay 1e-4, batch 4096 capped at n, an optional linear learning-rate
warm-up followed by a cosine decay to zero over ``max_epochs`` (or, with ``schedule:
reference``, the reference code's periodic cosine annealing), gradient-norm clipping at 1.0
(``clip``: global, per tower or per tensor), a fixed learning rate or one chosen by the finder
(``lr: auto``, ``pipeline.align.lr_finder``), and early stopping on the validation InfoNCE
with a patience in epochs, keeping the best epoch's
weights. The validation criterion is InfoNCE alone: the regulariser's weight ramps up during its
warm-up, so a total including it would not be comparable across epochs. Without validation
pairs the last epoch is kept.

Each epoch visits the training pairs in a seeded random order, split into ceil(n / batch)
batches of near-equal size (no tiny last batch). The caller seeds torch's global generator
(dropout) for the whole fit; the shuffling has its own generator seeded here.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import polars as pl
import torch
from torch import nn

from pipeline.align.base import CURVE_SCHEMA, FitReport
from pipeline.align.losses import info_nce, structure_regulariser, structure_weight
from pipeline.align.lr_finder import resolve_lr
from pipeline.align.params import Optimisation, TrainConfig


@contextmanager
def flushed_denormals() -> Iterator[None]:
    """Flush subnormal floats to zero inside the block. Tiny softmax probabilities and their
    gradients otherwise turn subnormal late in training and slow CPU steps down ~15x."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base learning rate: linear warm-up, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def reference_lr_factor(step: int, t_max: int) -> float:
    """The reference schedule: torch's ``CosineAnnealingLR`` (eta_min 0) in closed form,
    0.5 * (1 + cos(pi * step / t_max)); periodic, it rises again after ``t_max`` steps."""
    return 0.5 * (1.0 + math.cos(math.pi * step / t_max))


def reference_t_max(n: int, batch_size: int, epochs: int) -> int:
    """The reference code's T_max in scheduler (= optimiser) steps: ``epochs`` cycles of
    max(n // batch_size, 1) steps (floor, while an epoch takes ceil(n / batch) steps)."""
    return epochs * max(n // batch_size, 1)


def adamw_with_schedule(
    parameters: Any,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "cosine",
    t_max: int = 1,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and its schedule, stepped after every optimiser step: ``"cosine"``
    (``lr_factor``) or ``"reference"`` (``reference_lr_factor`` with ``t_max`` steps)."""
    optimiser = torch.optim.AdamW(parameters, lr=lr, betas=betas, weight_decay=weight_decay)
    if schedule == "reference":
        factor = functools.partial(reference_lr_factor, t_max=t_max)
    elif schedule == "cosine":
        factor = functools.partial(lr_factor, warmup_steps=warmup_steps, total_steps=total_steps)
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return optimiser, torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


def optimiser_for(
    parameters: Any, config: Optimisation, n: int, lr: float
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """``adamw_with_schedule`` for a trained aligner's settings on n training pairs."""
    return adamw_with_schedule(
        parameters,
        lr,
        config.betas,
        config.weight_decay,
        config.warmup_steps,
        batches_per_epoch(n, config.batch_size) * config.max_epochs,
        config.schedule,
        reference_t_max(n, config.batch_size, config.schedule_t_max),
    )


def clip_gradients(model: nn.Module, config: Optimisation) -> None:
    """Gradient-norm clipping at ``config.grad_clip``: over all parameters (``global``), over
    each top-level submodule's or parameter's tensors, i.e. each modality (``per_tower``), or
    over each tensor alone (``per_tensor``)."""
    if config.clip == "global":
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        return
    groups: dict[str, list[nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        key = name if config.clip == "per_tensor" else name.split(".")[0]
        groups.setdefault(key, []).append(parameter)
    for parameters in groups.values():
        nn.utils.clip_grad_norm_(parameters, config.grad_clip)


class EarlyStopping:
    """Keeps a copy of the weights of the epoch with the lowest validation loss and says when
    ``patience`` epochs have passed without a strictly lower one."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best_loss, self.best_epoch = math.inf, 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def should_stop(self, module: nn.Module, epoch: int, val_loss: float) -> bool:
        if val_loss < self.best_loss:
            self.best_loss, self.best_epoch = val_loss, epoch
            self.best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            return False
        return epoch - self.best_epoch >= self.patience

    def report(
        self, module: nn.Module, rows: list[dict[str, Any]], validated: bool, max_epochs: int
    ) -> FitReport:
        """Restore the best epoch's weights (if any was chosen); the fit's curve and summary.
        Without validation, or when no epoch could be chosen (training ended before the
        STRUCTURE warm-up did: ``regulariser_at_full_weight``), the last epoch is kept."""
        if self.best_state is not None:
            module.load_state_dict(self.best_state)
        chosen = validated and self.best_state is not None
        return FitReport(
            chosen_epoch=self.best_epoch if chosen else len(rows),
            curve=pl.DataFrame(rows, schema=CURVE_SCHEMA),
            extra={
                "epochs_run": len(rows),
                "steps": rows[-1]["step"],
                "stopped_early": len(rows) < max_epochs,
                "best_val_loss": None if self.best_state is None else self.best_loss,
            },
        )


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


def batch_losses(
    towers: Towers, x: torch.Tensor, y: torch.Tensor, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """InfoNCE of a batch and, when configured, (R_S(image) + R_S(text)) / 2."""
    z_img, z_txt = towers(x, y)
    contrastive = info_nce(z_img, z_txt, config.tau)
    s = config.structure
    if s is None:
        return contrastive, None
    regulariser = 0.5 * (
        structure_regulariser(x, z_img, config.tau, s.levels, s.divergence)
        + structure_regulariser(y, z_txt, config.tau, s.levels, s.divergence)
    )
    return contrastive, regulariser


def objective(
    contrastive: torch.Tensor, regulariser: torch.Tensor | None, config: TrainConfig, step: int
) -> tuple[torch.Tensor, float | None]:
    """The training loss at optimiser step ``step`` and its lambda_t (None without STRUCTURE)."""
    if regulariser is None:
        return contrastive, None
    s = config.structure
    weight = structure_weight(step, s.weight, s.warmup_steps)
    return contrastive + weight * regulariser, weight


def batches_per_epoch(n: int, batch_size: int) -> int:
    """ceil(n / batch), the batch capped at n."""
    return math.ceil(n / min(batch_size, n))


def near_equal_batches(order: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, ...]:
    """``order`` cut into ``batches_per_epoch`` consecutive batches, sizes differing by <= 1."""
    return torch.tensor_split(order, batches_per_epoch(len(order), batch_size))


@torch.no_grad()
def validation_loss(towers: Towers, x: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> float:
    """Pair-weighted mean InfoNCE over the validation pairs, in fixed near-equal batches."""
    towers.eval()
    total = 0.0
    for rows in near_equal_batches(torch.arange(len(x)), config.batch_size):
        total += info_nce(*towers(x[rows], y[rows]), config.tau).item() * len(rows)
    return total / len(x)


def train_epoch(
    towers: Towers,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    shuffle: torch.Generator,
    step: int,
) -> dict[str, Any]:
    """One pass over the pairs in a shuffled order; returns the epoch's curve entries."""
    towers.train()
    n = len(x)
    row = {"train_loss": 0.0, "infonce": 0.0, "structure": None, "structure_lambda": None}
    for batch in near_equal_batches(torch.randperm(n, generator=shuffle), config.batch_size):
        contrastive, regulariser = batch_losses(towers, x[batch], y[batch], config)
        loss, weight = objective(contrastive, regulariser, config, step)
        if regulariser is not None:
            row["structure_lambda"] = weight
            row["structure"] = (row["structure"] or 0.0) + regulariser.item() * len(batch) / n
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training diverged: loss {loss.item()} at step {step}")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(towers, config)
        optimiser.step()
        schedule.step()
        step += 1
        row["train_loss"] += loss.item() * len(batch) / n
        row["infonce"] += contrastive.item() * len(batch) / n
    return {**row, "step": step, "lr": schedule.get_last_lr()[0]}


def regulariser_at_full_weight(config: TrainConfig, step: int) -> bool:
    """Whether the last batch of an epoch that ended after ``step`` optimiser steps had the
    full STRUCTURE weight (lambda_t at t = step - 1; ``losses.structure_weight``). Early
    stopping only starts then, and only such epochs can be chosen: the warm-up counts steps,
    so at small n (one step per epoch) patience would otherwise stop training, and choose a
    model, before lambda ever ramped up (docs/methods.md)."""
    return config.structure is None or step - 1 >= config.structure.warmup_steps


def train_towers(
    towers: Towers,
    x: torch.Tensor,
    y: torch.Tensor,
    x_val: torch.Tensor | None,
    y_val: torch.Tensor | None,
    config: TrainConfig,
    seed: int,
) -> FitReport:
    """Train ``towers`` in place on pairs (x[i], y[i]); leaves it holding the chosen epoch.
    With ``lr: auto`` the learning-rate finder first sweeps a copy of ``towers``."""

    def sweep_loss(probe: nn.Module, rows: torch.Tensor, step: int) -> torch.Tensor:
        return objective(*batch_losses(probe, x[rows], y[rows], config), config, step)[0]

    with flushed_denormals():
        lr, lr_facts = resolve_lr(towers, sweep_loss, len(x), config, seed)
    optimiser, schedule = optimiser_for(towers.parameters(), config, len(x), lr)
    shuffle = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    stopping = EarlyStopping(config.patience)
    with flushed_denormals():
        for epoch in range(1, config.max_epochs + 1):
            start = time.perf_counter()
            step = rows[-1]["step"] if rows else 0
            row = train_epoch(towers, x, y, config, optimiser, schedule, shuffle, step)
            val_loss = None if x_val is None else validation_loss(towers, x_val, y_val, config)
            seconds = time.perf_counter() - start
            rows.append({"epoch": epoch, **row, "val_loss": val_loss, "seconds": seconds})
            if val_loss is None or not regulariser_at_full_weight(config, row["step"]):
                continue
            if stopping.should_stop(towers, epoch, val_loss):
                break
    report = stopping.report(towers, rows, x_val is not None, config.max_epochs)
    report.extra |= lr_facts
    towers.eval()
    return report
