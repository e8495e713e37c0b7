"""Learning-rate finder for ``lr: auto`` (docs/methods.md, "Learning-rate finder").

As in the STRUCTURE reference code's finder: on a copy of the model, AdamW takes ``steps``
steps on random batches of a seeded subset of at most ``max_pairs`` training pairs while the
learning rate grows exponentially from ``start_lr`` towards ``end_lr`` (lr_i = start *
(end / start) ** (i / steps)); the loss of each batch is recorded before its step. The sweep
stops early at a non-finite loss or one above ``divergence`` x the lowest so far. The losses are
smoothed exponentially (s_i = smoothing * s_{i-1} + (1 - smoothing) * loss_i), differentiated
against log10(lr), and the chosen lr is the lr of the steepest descent before the smoothed
minimum, divided by ``divisor`` (at least 10 x ``start_lr``). Without a descent (fewer than two
finite losses, or a smoothed loss that never falls below its first value) it falls back to
``fallback_lr``. The model passed in is never changed, and torch's global generator is left as
it was, so a fit with ``lr: auto`` trains exactly like one given the chosen number.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.align.params import AUTO_LR, Optimisation

BatchLoss = Callable[[nn.Module, torch.Tensor, int], torch.Tensor]
"""(model, training-row indices of a batch, sweep step) -> the batch's training loss."""


@dataclass(frozen=True)
class SweepSettings:
    """The finder's fixed settings (recorded with every chosen lr)."""

    start_lr: float = 1e-7
    end_lr: float = 10.0
    steps: int = 100
    max_pairs: int = 5000
    divergence: float = 5.0
    smoothing: float = 0.05
    divisor: float = 5.0
    fallback_lr: float = 1e-3


SWEEP = SweepSettings()


@dataclass
class Sweep:
    """A finder run: the chosen ``lr``, the lrs tried and their losses, the index of the
    steepest descent (None when it fell back)."""

    lr: float
    lrs: list[float]
    losses: list[float]
    steepest: int | None
    pairs: int
    batch_size: int
    settings: SweepSettings = SWEEP

    def record(self) -> dict[str, Any]:
        """JSON-able facts for a fit report."""
        return {
            **dataclasses.asdict(self.settings),
            "pairs": self.pairs,
            "batch_size": self.batch_size,
            "steps_run": len(self.losses),
            "fell_back": self.steepest is None,
            "steepest_lr": None if self.steepest is None else self.lrs[self.steepest],
            "lr": self.lr,
            "lrs": self.lrs,
            "losses": self.losses,
        }


def sweep_lrs(settings: SweepSettings = SWEEP) -> np.ndarray:
    """The sweep's learning rates, start * (end / start) ** (i / steps) for i < steps."""
    ratio = settings.end_lr / settings.start_lr
    return settings.start_lr * ratio ** (np.arange(settings.steps) / settings.steps)


def smooth(losses: Iterable[float], weight: float) -> np.ndarray:
    """Exponential smoothing s_i = weight * s_{i-1} + (1 - weight) * loss_i, s_0 = loss_0."""
    out: list[float] = []
    for loss in losses:
        out.append(loss if not out else weight * out[-1] + (1 - weight) * loss)
    return np.asarray(out)


def suggest(
    lrs: np.ndarray, losses: list[float], settings: SweepSettings = SWEEP
) -> tuple[float, int | None]:
    """The chosen lr and the index of the steepest descent (None: ``fallback_lr``)."""
    if len(losses) < 2:
        return settings.fallback_lr, None
    smoothed = smooth(losses, settings.smoothing)
    slope = np.gradient(smoothed, np.log10(lrs[: len(smoothed)]))
    lowest = int(np.argmin(smoothed))
    if lowest == 0:
        return settings.fallback_lr, None
    before = np.arange(1, min(lowest, len(slope) - 1))
    steepest = int(before[np.argmin(slope[before])]) if len(before) else lowest - 1
    if not slope[steepest] < 0:
        return settings.fallback_lr, None
    return max(float(lrs[steepest]) / settings.divisor, 10 * settings.start_lr), steepest


def find_lr(
    model: nn.Module,
    batch_loss: BatchLoss,
    n: int,
    batch_size: int,
    make_optimiser: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    seed: int,
    after_step: Callable[[nn.Module], None] | None = None,
    settings: SweepSettings = SWEEP,
) -> Sweep:
    """Run the sweep on a copy of ``model`` over training rows ``0..n-1`` (module docstring).

    ``after_step`` runs after every optimiser step (e.g. PAL's anchor renormalisation).
    Deterministic for a seed: the subset and batches come from a generator seeded by ``seed``
    and torch's global generator (dropout) is seeded by it inside a fork.
    """
    probe = copy.deepcopy(model).train()
    optimiser = make_optimiser(probe.parameters())
    generator = torch.Generator().manual_seed(seed)
    pairs = torch.randperm(n, generator=generator)[: min(n, settings.max_pairs)]
    batch = min(batch_size, len(pairs))
    lrs = sweep_lrs(settings)
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step, lr in enumerate(lrs):
            for group in optimiser.param_groups:
                group["lr"] = float(lr)
            rows = pairs[torch.randperm(len(pairs), generator=generator)[:batch]]
            loss = batch_loss(probe, rows, step)
            value = loss.item()
            if not math.isfinite(value):
                break
            losses.append(value)
            if value > settings.divergence * min(losses):
                break
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if after_step is not None:
                after_step(probe)
    lr, steepest = suggest(lrs, losses, settings)
    return Sweep(lr, lrs[: len(losses)].tolist(), losses, steepest, len(pairs), batch, settings)


def resolve_lr(
    model: nn.Module,
    batch_loss: BatchLoss,
    n: int,
    config: Optimisation,
    seed: int,
    after_step: Callable[[nn.Module], None] | None = None,
) -> tuple[float, dict[str, Any]]:
    """The learning rate of a fit and its fit-report facts: ``{"lr": ...}``, plus
    ``"lr_finder"`` (the sweep's settings and curve) when ``config.lr`` is ``"auto"``."""
    if config.lr != AUTO_LR:
        return float(config.lr), {"lr": float(config.lr)}

    def adamw(parameters: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(
            parameters, lr=SWEEP.start_lr, betas=config.betas, weight_decay=config.weight_decay
        )

    sweep = find_lr(model, batch_loss, n, config.batch_size, adamw, seed, after_step)
    return sweep.lr, {"lr": sweep.lr, "lr_finder": sweep.record()}
