"""Training objectives of the trained heads: symmetric InfoNCE and the STRUCTURE regulariser.

Pure torch functions (tensors in, scalar tensor out); definitions in docs/methods.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.align.params import DIVERGENCES, Divergence

_TINY = torch.finfo(torch.float32).tiny  # floor before a log, so log(0) stays finite


def info_nce(image_emb: torch.Tensor, text_emb: torch.Tensor, tau: float) -> torch.Tensor:
    """Symmetric InfoNCE of paired rows: mean of the row-wise and column-wise cross-entropies.

    ``image_emb`` and ``text_emb`` are (b, k) with L2-normalised rows; row i of each is a pair.
    """
    logits = (image_emb / tau) @ text_emb.T  # scale the (b, k) rows, not the (b, b) logits
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


def scaled_centred_units(features: torch.Tensor, tau: float) -> torch.Tensor:
    """(u - mean(u)) / sqrt(tau) in float32, u the L2-normalised rows: the rows whose inner
    products are the similarity logits S / tau (scaling the (b, d) rows, not the (b, b) S)."""
    unit = F.normalize(features.float(), dim=1)
    return (unit - unit.mean(dim=0, keepdim=True)) / math.sqrt(tau)


def similarity_logits(features: torch.Tensor, tau: float) -> torch.Tensor:
    """S / tau in float32: inner products of the batch's rows after L2-normalising each row
    and subtracting the batch mean."""
    return gram(scaled_centred_units(features, tau))


def log_transitions(features: torch.Tensor, tau: float) -> torch.Tensor:
    """log P, P = row-softmax(S / tau): each row's neighbour distribution in the batch."""
    return torch.log_softmax(similarity_logits(features, tau), dim=1)


def transition_powers(log_p: torch.Tensor, levels: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(P^l, log P^l) for l = 1..levels: matrix powers of the row-stochastic P."""
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
    check_divergence(divergence)
    m = 0.5 * (p + q)
    log_m = m.clamp_min(_TINY).log()
    if divergence == "js":
        per_row = 0.5 * ((p * (log_p - log_m)).sum(dim=1) + (q * (log_q - log_m)).sum(dim=1))
    else:
        per_row = 0.5 * ((m * (log_m - log_q)).sum(dim=1) + (m * (log_m - log_p)).sum(dim=1))
    return per_row.mean()


BLOCK_ELEMENTS = 1 << 20
"""(rows x batch) logits per block of the fused regulariser: its ~15 elementwise passes then
run over a cache-sized block instead of streaming (b, b) temporaries through memory."""


class _FusedDivergence(torch.autograd.Function):
    """``row_divergence(softmax(X X^T), softmax(Z Z^T))`` and its gradient w.r.t. Z in one
    pass over row blocks of the logits; X carries no gradient.

    With q = softmax(s) per row and g = dD/dq, dD/ds = q g - q sum_k(q_k g_k), where
    q g = (q/2)(log q - log m) for ``js`` and q (log m / 2 + 1/2 - log q / 4 - log p / 4) - m/2
    for ``reference``; then dD/dZ = (G + G^T) Z for the (b, b) G = dD/ds.
    """

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, z: torch.Tensor, divergence: str, block_rows: int
    ) -> torch.Tensor:
        n = len(z)
        grad_logits = torch.empty(n, n, dtype=z.dtype, device=z.device)
        value = torch.zeros((), dtype=z.dtype, device=z.device)
        for start in range(0, n, block_rows):
            rows = slice(start, start + block_rows)
            log_p = torch.log_softmax(x[rows] @ x.T, dim=1)
            log_q = torch.log_softmax(z[rows] @ z.T, dim=1)
            p, q = log_p.exp(), log_q.exp()
            m = (p + q).mul_(0.5)
            log_m = m.clamp_min(_TINY).log_()
            if divergence == "js":
                q_grad = (log_q - log_m).mul_(q)
                value += 0.5 * ((log_p - log_m).mul_(p).sum() + q_grad.sum())
                q_grad.mul_(0.5)
            else:
                value += (log_m * 2 - log_q - log_p).mul_(m).sum() / 2
                q_grad = (log_m * 0.5 - log_q * 0.25 - log_p * 0.25 + 0.5).mul_(q) - m * 0.5
            grad_logits[rows] = q_grad - q * q_grad.sum(dim=1, keepdim=True)
        ctx.save_for_backward((grad_logits + grad_logits.T) @ z / n)
        return value / n

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor, None, None]:
        (grad_z,) = ctx.saved_tensors
        return None, grad * grad_z, None, None


def fused_divergence(
    x: torch.Tensor, z: torch.Tensor, divergence: Divergence, block_elements: int = BLOCK_ELEMENTS
) -> torch.Tensor:
    """D(softmax(X X^T), softmax(Z Z^T)) averaged over rows, differentiable in Z only."""
    check_divergence(divergence)
    block_rows = max(1, block_elements // max(1, len(z)))
    return _FusedDivergence.apply(x.detach(), z, divergence, block_rows)


def check_divergence(divergence: str) -> None:
    """A ValueError naming an unknown divergence variant."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r} (expected one of {DIVERGENCES})")


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

    Always computed in float32, also under autocast. One level uses ``fused_divergence``;
    several go through matrix powers and ``row_divergence``.
    """
    with torch.autocast(device_type=aligned.device.type, enabled=False):
        if levels == 1:
            return fused_divergence(
                scaled_centred_units(original, tau), scaled_centred_units(aligned, tau), divergence
            )
        log_p_x = log_transitions(original.detach(), tau)
        terms = [
            weight * row_divergence(px, log_px, pz, log_pz, divergence)
            for weight, (px, log_px), (pz, log_pz) in zip(
                level_weights(levels),
                transition_powers(log_p_x, levels),
                transition_powers(log_transitions(aligned, tau), levels),
                strict=True,
            )
        ]
        return torch.stack(terms).sum() / levels


def structure_weight(step: int, weight: float, warmup_steps: int) -> float:
    """lambda_t = lambda * min(1, step / warmup_steps): the regulariser's linear warm-up."""
    if warmup_steps <= 0:
        return weight
    return weight * min(1.0, step / warmup_steps)
