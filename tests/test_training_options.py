"""The trained aligners' protocol options: ``schedule``, ``clip`` and ``lr: auto``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.align.artifacts import load_aligner, read_params, save_run
from pipeline.align.kinds import aligner_params, build_aligner
from pipeline.align.lr_finder import SWEEP, find_lr, suggest, sweep_lrs
from pipeline.align.params import LinearParams, Optimisation
from pipeline.align.training import (
    adamw_with_schedule,
    clip_gradients,
    lr_factor,
    optimiser_for,
    reference_t_max,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def planted(n: int, seed: int, d1: int = 12, d2: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Image and text features that are two noisy linear views of one latent."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 6))
    x = z @ np.random.default_rng(1).normal(size=(6, d1)) + 0.1 * rng.normal(size=(n, d1))
    y = z @ np.random.default_rng(2).normal(size=(6, d2)) + 0.1 * rng.normal(size=(n, d2))
    return x, y


def lrs_before_each_step(schedule: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list:
    """The learning rate used by each of ``steps`` optimiser steps."""
    out = []
    for _ in range(steps):
        out.append(schedule.get_last_lr()[0])
        schedule.optimizer.step()
        schedule.step()
    return out


# ---- schedules ----


def test_reference_schedule_is_the_periodic_cosine_annealing_closed_form() -> None:
    lr, t_max = 0.1, 10
    _, schedule = adamw_with_schedule(
        [nn.Parameter(torch.zeros(2))], lr, (0.9, 0.95), 0.0, 0, 1000, "reference", t_max
    )
    got = lrs_before_each_step(schedule, 45)
    for t in (0, 3, 5, 10, 13, 20, 27, 40):
        assert got[t] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * t / t_max)), abs=1e-9)
    assert got[10] == pytest.approx(0.0, abs=1e-12)  # the minimum at T_max ...
    assert got[20] == pytest.approx(lr) and got[40] == pytest.approx(lr)  # ... period 2 T_max
    assert got[15] == pytest.approx(got[5])
    # torch's own (recursive) CosineAnnealingLR agrees
    optimiser = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=lr)
    torch_lrs = lrs_before_each_step(
        torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=t_max), 45
    )
    np.testing.assert_allclose(got, torch_lrs, atol=1e-6)


def test_reference_t_max_counts_floor_batches_per_epoch() -> None:
    assert reference_t_max(100, 30, 50) == 150  # 50 cycles of floor(100 / 30) = 3 steps
    assert reference_t_max(100, 4096, 50) == 50  # batch above n: one step per cycle
    config = Optimisation(lr=0.2, batch_size=30, schedule="reference", schedule_t_max=2)
    _, schedule = optimiser_for([nn.Parameter(torch.zeros(2))], config, 100, 0.2)
    got = lrs_before_each_step(schedule, 13)
    assert got[6] == pytest.approx(0.0, abs=1e-12) and got[12] == pytest.approx(0.2)


def test_default_schedule_is_unchanged() -> None:
    config = Optimisation(lr=0.1, batch_size=10, max_epochs=3, warmup_steps=2)
    assert config.schedule == "cosine" and config.clip == "global"
    _, schedule = optimiser_for([nn.Parameter(torch.zeros(2))], config, 40, 0.1)
    got = lrs_before_each_step(schedule, 12)  # 4 batches x 3 epochs
    expected = [0.1 * lr_factor(step, 2, 12) for step in range(12)]
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert got[:3] == pytest.approx([0.05, 0.1, 0.1])
    # the positional form used by the SimCLR pretraining is the same schedule
    _, legacy = adamw_with_schedule([nn.Parameter(torch.zeros(2))], 0.1, (0.9, 0.95), 0.0, 2, 12)
    np.testing.assert_allclose(lrs_before_each_step(legacy, 12), expected, rtol=1e-9)


def test_fitted_head_follows_the_reference_schedule() -> None:
    x, y = planted(60, seed=0)
    params = {"lr": 0.01, "batch_size": 20, "max_epochs": 5, "dim": 4}
    report = build_aligner(
        "linear", {**params, "schedule": "reference", "schedule_t_max": 2, "clip": "per_tensor"}
    ).fit(x, y, None, None, seed=0)
    steps = report.curve["step"].to_list()
    assert steps == [3, 6, 9, 12, 15]
    expected = [0.01 * 0.5 * (1 + math.cos(math.pi * s / 6)) for s in steps]
    np.testing.assert_allclose(report.curve["lr"].to_list(), expected, atol=1e-9)
    assert report.extra["lr"] == 0.01 and "lr_finder" not in report.extra


# ---- clipping ----


class TwoTowers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))
        self.text = nn.Linear(6, 3)


def large_gradients(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = 10 * torch.randn(p.shape, generator=generator)


def norms(tensors) -> list[float]:
    return [float(t.grad.norm()) for t in tensors]


def total(tensors) -> float:
    return math.sqrt(sum(n**2 for n in norms(tensors)))


def test_per_tensor_clipping_bounds_every_tensor_global_only_the_total() -> None:
    model = TwoTowers()
    large_gradients(model)
    before = norms(model.parameters())
    assert min(before) > 1.0
    clip_gradients(model, Optimisation(grad_clip=1.0, clip="per_tensor"))
    assert all(n <= 1.0 + 1e-4 for n in norms(model.parameters()))
    assert total(model.parameters()) > 1.5  # each tensor at the bound: the total is above it

    large_gradients(model)
    clip_gradients(model, Optimisation(grad_clip=1.0))
    after = norms(model.parameters())
    assert total(model.parameters()) <= 1.0 + 1e-4
    np.testing.assert_allclose(np.array(after) / np.array(before), after[0] / before[0], rtol=1e-4)

    large_gradients(model)
    clip_gradients(model, Optimisation(grad_clip=1.0, clip="per_tower"))
    image, text = list(model.image.parameters()), list(model.text.parameters())
    assert total(image) <= 1.0 + 1e-4 and total(text) <= 1.0 + 1e-4
    assert total(model.parameters()) > 1.2


# ---- the learning-rate finder ----


class Regression(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(8, 1, generator=generator))


def regression_loss(inputs: torch.Tensor, targets: torch.Tensor):
    def loss(model: nn.Module, rows: torch.Tensor, step: int) -> torch.Tensor:
        return (inputs[rows] @ model.weight - targets[rows]).square().mean()

    return loss


def adamw(parameters) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=SWEEP.start_lr, betas=(0.9, 0.95))


def test_finder_on_a_planted_problem_is_deterministic_and_leaves_the_model() -> None:
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(6000, 8, generator=generator)
    targets = inputs @ torch.randn(8, 1, generator=generator)
    model = Regression()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    sweep = find_lr(model, regression_loss(inputs, targets), 6000, 256, adamw, seed=3)
    assert math.isfinite(sweep.lr) and 1e-7 <= sweep.lr <= 10 and sweep.steepest is not None
    assert sweep.pairs == 5000 and sweep.batch_size == 256 and len(sweep.losses) >= 2
    assert sweep.losses[-1] < sweep.losses[0]
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    again = find_lr(model, regression_loss(inputs, targets), 6000, 256, adamw, seed=3)
    assert again.lr == sweep.lr and again.losses == sweep.losses
    record = sweep.record()
    assert record["lr"] == sweep.lr and record["steps"] == 100 and record["end_lr"] == 10.0


def test_finder_falls_back_when_the_loss_never_decreases() -> None:
    def rising(model: nn.Module, rows: torch.Tensor, step: int) -> torch.Tensor:
        return model.weight.sum() * 0 + 1.0 + step

    sweep = find_lr(Regression(), rising, 100, 16, adamw, seed=0)
    assert sweep.lr == 1e-3 and sweep.steepest is None and sweep.record()["fell_back"]
    assert len(sweep.losses) < 100  # stopped once the loss passed 5 x its lowest

    def diverged(model: nn.Module, rows: torch.Tensor, step: int) -> torch.Tensor:
        return model.weight.sum() * math.nan

    assert find_lr(Regression(), diverged, 100, 16, adamw, seed=0).lr == 1e-3


def test_suggestion_is_the_steepest_descent_over_five() -> None:
    lrs = sweep_lrs()
    assert lrs[0] == pytest.approx(1e-7) and lrs[-1] < 10 and len(lrs) == 100
    losses = [5.0] * 30 + [5.0 - 0.1 * i for i in range(40)] + [1.1 + 0.5 * i for i in range(10)]
    lr, steepest = suggest(lrs, losses)
    assert 30 <= steepest < 70 and lr == pytest.approx(lrs[steepest] / 5)


def test_head_with_auto_lr_records_the_chosen_lr(tmp_path) -> None:
    x, y = planted(300, seed=0)
    params = {"lr": "auto", "batch_size": 64, "max_epochs": 2, "dim": 4}
    fits = [build_aligner("mlp", params) for _ in range(2)]
    reports = [aligner.fit(x, y, *planted(60, seed=1), seed=5) for aligner in fits]
    chosen = reports[0].extra["lr"]
    assert math.isfinite(chosen) and 1e-7 <= chosen <= 10
    assert reports[1].extra["lr"] == chosen  # same seed, same lr
    assert reports[0].curve["lr"][0] == pytest.approx(chosen * lr_factor(5, 0, 10))
    run = save_run(tmp_path / "run", fits[0], reports[0], {"seed": 5})
    recorded = read_params(run)
    assert recorded["hyperparameters"]["lr"] == "auto"
    assert recorded["fit"]["lr"] == chosen == recorded["fit"]["lr_finder"]["lr"]
    assert recorded["fit"]["lr_finder"]["max_pairs"] == 5000
    assert recorded["fit"]["lr_finder"]["pairs"] == 300
    assert load_aligner(run).hyperparameters() == fits[0].hyperparameters()
    # a fit given the chosen number trains exactly like the auto one
    fixed = build_aligner("mlp", {**params, "lr": chosen})
    fixed.fit(x, y, *planted(60, seed=1), seed=5)
    np.testing.assert_array_equal(fixed.embed_image(x), fits[0].embed_image(x))


def test_pal_with_auto_lr_records_the_chosen_lr() -> None:
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(48, 5, 12)), rng.normal(size=(48, 4, 10))
    params = {"anchors": 4, "batch_size": 16, "max_epochs": 2, "lr": "auto", "clip": "per_tower"}
    report = build_aligner("pal", params).fit(image, text, None, None, seed=0)
    assert report.extra["lr"] == report.extra["lr_finder"]["lr"]
    assert 1e-7 <= report.extra["lr"] <= 10


@pytest.mark.parametrize("kind", ["linear", "mlp", "pal"])
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"schedule": "linear"}, "'schedule' must be one of"),
        ({"schedule_t_max": 0}, "'schedule_t_max' must be >= 1"),
        ({"schedule": "reference", "warmup_steps": 5}, "'warmup_steps' must be 0 with schedule"),
        ({"clip": "norm"}, "'clip' must be one of"),
        ({"lr": "fast"}, "'lr' must be > 0 or 'auto'"),
        ({"lr": 0}, "'lr' must be > 0 or 'auto'"),
        ({"lr": True}, "'lr' must be of type float or str"),
    ],
)
def test_option_errors_name_the_key(kind: str, values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        aligner_params(kind, values)


def test_options_are_accepted_and_recorded() -> None:
    params = aligner_params("linear", {"lr": "auto", "schedule": "reference", "clip": "per_tower"})
    assert isinstance(params, LinearParams) and params.lr == "auto"
    assert params.schedule_t_max == 50
    hp = build_aligner("linear", {"lr": "auto", "schedule_t_max": 7}).hyperparameters()
    assert hp["lr"] == "auto" and hp["schedule"] == "cosine" and hp["schedule_t_max"] == 7
    assert aligner_params("pal", {"lr": "2e-3"}).lr == 2e-3
