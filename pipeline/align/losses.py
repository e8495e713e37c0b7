"""Training objectives of the trained heads: symmetric InfoNCE and the STRUCTURE regulariser.

Pure torch functions (tensors in, scalar tensor out); definitions in DESIGN.md section 7.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Divergence = Literal["js", "reference"]
DIVERGENCES: tuple[str, ...] = ("js", "reference")

_TINY = torch.finfo(torch.float32).tiny  # floor before a log, so log(0) stays finite


def info_nce(image_emb: torch.Tensor, text_emb: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE of paired rows: mean of the row-wise and column-wise cross-entropies.

    ``image_emb`` and ``text_emb`` are (b, k) with L2-normalised rows; row i of each is a pair.
    """
    logits = image_emb @ text_emb.T / tau
    labels = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


class _Gram(torch.autograd.Function):
    """A A^T with a one-matmul backward, (G + G^T) A, instead of autograd's two."""

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a)
        return a @ a.T

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (a,) = ctx.saved_tensors
        return (grad + grad.T) @ a


def gram(a: torch.Tensor) -> torch.Tensor:
    """The Gram matrix A A^T of the rows of A (differentiable, cheaper backward)."""
    return _Gram.apply(a)


def neighbour_distributions(
    features: torch.Tensor, tau: float, levels: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(P^l, log P^l) for l = 1..levels, P the row-softmax of the batch's similarities / tau.

    Rows are L2-normalised, then the batch mean is subtracted, before the similarities.
    """
    unit = F.normalize(features.float(), dim=1)
    centred = unit - unit.mean(dim=0, keepdim=True)
    log_p = torch.log_softmax(gram(centred) / tau, dim=1)
    p = log_p.exp()
    powers = [(p, log_p)]
    power = p
    for _ in range(2, levels + 1):
        power = power @ p
        powers.append((power, power.clamp_min(_TINY).log()))
    return powers


def row_divergence(
    p: torch.Tensor,
    log_p: torch.Tensor,
    q: torch.Tensor,
    log_q: torch.Tensor,
    divergence: Divergence,
) -> torch.Tensor:
    """Divergence between the rows of two row-stochastic matrices, averaged over rows.

    ``js``: the true Jensen-Shannon divergence 0.5 KL(P||M) + 0.5 KL(Q||M), M = (P + Q) / 2.
    ``reference``: the STRUCTURE reference code's 0.5 [KL(M||Q) + KL(M||P)].
    """
    m = 0.5 * (p + q)
    log_m = m.clamp_min(_TINY).log()
    if divergence == "js":
        per_row = 0.5 * ((p * (log_p - log_m)).sum(dim=1) + (q * (log_q - log_m)).sum(dim=1))
    elif divergence == "reference":
        per_row = 0.5 * ((m * (log_m - log_q)).sum(dim=1) + (m * (log_m - log_p)).sum(dim=1))
    else:
        raise ValueError(f"unknown divergence {divergence!r} (expected one of {DIVERGENCES})")
    return per_row.mean()


def level_weights(levels: int) -> list[float]:
    """w_l: 1 for a single level, 1/l ("inverse") for several."""
    if levels < 1:
        raise ValueError(f"STRUCTURE levels must be >= 1, got {levels}")
    return [1.0] if levels == 1 else [1.0 / level for level in range(1, levels + 1)]


def structure_regulariser(
    original: torch.Tensor,
    aligned: torch.Tensor,
    tau: float,
    levels: int = 1,
    divergence: Divergence = "js",
) -> torch.Tensor:
    """R_S = (1/L) sum_l w_l D(P_X^l, P_Z^l) between a batch's original features and embeddings.

    Always computed in float32, also under autocast.
    """
    with torch.autocast(device_type=aligned.device.type, enabled=False):
        original_powers = neighbour_distributions(original.detach(), tau, levels)
        aligned_powers = neighbour_distributions(aligned, tau, levels)
        terms = [
            weight * row_divergence(p_x, log_p_x, p_z, log_p_z, divergence)
            for weight, (p_x, log_p_x), (p_z, log_p_z) in zip(
                level_weights(levels), original_powers, aligned_powers, strict=True
            )
        ]
        return torch.stack(terms).sum() / levels


def structure_weight(step: int, weight: float, warmup_steps: int) -> float:
    """lambda_t = lambda * min(1, step / warmup_steps): the regulariser's linear warm-up."""
    if warmup_steps <= 0:
        return weight
    return weight * min(1.0, step / warmup_steps)
