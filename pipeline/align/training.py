"""The training loop of every trained aligner (heads and PAL): AdamW, schedule, early stop.

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
(dropout) for the whole fit; the shuffling has its own generator seeded here. The model and
its data are the caller's: ``train_model`` sees a batch only through its ``BatchLoss`` (rows
-> the batch's loss terms) and the validation pairs through a ``ValLoss``.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import polars as pl
import torch
from torch import nn

from pipeline.align.base import CURVE_SCHEMA, FitReport
from pipeline.align.lr_finder import resolve_lr
from pipeline.align.params import Optimisation


class Loss(NamedTuple):
    """A batch's training loss, its InfoNCE term, and the regulariser and its weight lambda_t
    (None without one)."""

    total: torch.Tensor
    infonce: torch.Tensor
    structure: torch.Tensor | None = None
    weight: float | None = None


BatchLoss = Callable[[nn.Module, torch.Tensor, int], Loss]
"""(model, training-row indices of a batch, optimiser step) -> the batch's ``Loss``."""
ValLoss = Callable[[nn.Module, torch.Tensor], torch.Tensor]
"""(model, validation-row indices of a batch) -> the batch's InfoNCE."""


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
        STRUCTURE warm-up did: ``heads.settle_steps``), the last epoch is kept."""
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


def batches_per_epoch(n: int, batch_size: int) -> int:
    """ceil(n / batch), the batch capped at n."""
    return math.ceil(n / min(batch_size, n))


def near_equal_batches(order: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, ...]:
    """``order`` cut into ``batches_per_epoch`` consecutive batches, sizes differing by <= 1."""
    return torch.tensor_split(order, batches_per_epoch(len(order), batch_size))


@torch.no_grad()
def validation_loss(model: nn.Module, n: int, loss: ValLoss, batch_size: int) -> float:
    """Pair-weighted mean InfoNCE over the n validation pairs, in fixed near-equal batches."""
    model.eval()
    total = 0.0
    for rows in near_equal_batches(torch.arange(n), batch_size):
        total += loss(model, rows).item() * len(rows)
    return total / n


def train_epoch(
    model: nn.Module,
    n: int,
    batch_loss: BatchLoss,
    config: Optimisation,
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    shuffle: torch.Generator,
    step: int,
    after_step: Callable[[nn.Module], None] | None = None,
) -> dict[str, Any]:
    """One pass over the n pairs in a shuffled order; returns the epoch's curve entries.
    ``after_step`` runs after every optimiser step (PAL's anchor renormalisation)."""
    model.train()
    row = {"train_loss": 0.0, "infonce": 0.0, "structure": None, "structure_lambda": None}
    for batch in near_equal_batches(torch.randperm(n, generator=shuffle), config.batch_size):
        loss = batch_loss(model, batch, step)
        if loss.structure is not None:
            row["structure_lambda"] = loss.weight
            row["structure"] = (row["structure"] or 0.0) + loss.structure.item() * len(batch) / n
        if not torch.isfinite(loss.total):
            raise FloatingPointError(f"training diverged: loss {loss.total.item()} at step {step}")
        optimiser.zero_grad(set_to_none=True)
        loss.total.backward()
        clip_gradients(model, config)
        optimiser.step()
        schedule.step()
        if after_step is not None:
            after_step(model)
        step += 1
        row["train_loss"] += loss.total.item() * len(batch) / n
        row["infonce"] += loss.infonce.item() * len(batch) / n
    return {**row, "step": step, "lr": schedule.get_last_lr()[0]}


def train_model(
    model: nn.Module,
    n: int,
    batch_loss: BatchLoss,
    val: tuple[int, ValLoss] | None,
    config: Optimisation,
    seed: int,
    *,
    settle_steps: int = 0,
    after_step: Callable[[nn.Module], None] | None = None,
) -> FitReport:
    """Train ``model`` in place on n pairs; leaves it holding the chosen epoch, in eval mode.
    ``val``: the number of validation pairs and their loss (None: keep the last epoch). An
    epoch counts for early stopping only once its last step is >= ``settle_steps`` (the
    heads' STRUCTURE warm-up: ``heads.settle_steps``). With ``lr: auto`` the learning-rate
    finder first sweeps a copy of ``model``."""

    def sweep_loss(probe: nn.Module, rows: torch.Tensor, step: int) -> torch.Tensor:
        return batch_loss(probe, rows, step).total

    with flushed_denormals():
        lr, lr_facts = resolve_lr(model, sweep_loss, n, config, seed, after_step)
    optimiser, schedule = optimiser_for(model.parameters(), config, n, lr)
    shuffle = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    stopping = EarlyStopping(config.patience)
    with flushed_denormals():
        for epoch in range(1, config.max_epochs + 1):
            start = time.perf_counter()
            step = rows[-1]["step"] if rows else 0
            row = train_epoch(
                model, n, batch_loss, config, optimiser, schedule, shuffle, step, after_step
            )
            val_loss = None if val is None else validation_loss(model, *val, config.batch_size)
            seconds = time.perf_counter() - start
            rows.append({"epoch": epoch, **row, "val_loss": val_loss, "seconds": seconds})
            if val_loss is None or row["step"] - 1 < settle_steps:
                continue
            if stopping.should_stop(model, epoch, val_loss):
                break
    report = stopping.report(model, rows, val is not None, config.max_epochs)
    report.extra |= lr_facts
    model.eval()
    return report
