"""PAL: token-level alignment through learnable anchors (docs/pal.md).

Each modality has K learnable unit anchors (``A_img``: K x Dv, ``A_txt``: K x Dt); they are the
only trained parameters. A sample's tokens z_t (CLS + patches of a ViT block, or every valid
token of a text hidden state) are L2-normalised and compared with the anchors,
``s[t, k] = cos(z_t, a_k)``; pooling over the tokens gives a K-dim profile, L2-normalised, and
an image and a text score by the cosine of their profiles. The default pooling is CAP: per
anchor, a softmax over the valid tokens of ``s / tau_p`` weights ``s``. ``mean`` (masked mean)
and ``cls`` (first token) are ablations.

Training is symmetric InfoNCE on the profiles (fixed tau 0.05) with the heads' training loop
(``pipeline.align.training``, the same ``lr`` / ``schedule`` / ``clip`` options): AdamW (0.9,
0.95), weight decay 1e-4, gradient-norm clipping, linear warm-up then cosine decay, early
stopping on the validation InfoNCE keeping the best epoch's anchors. ``anchor_update``:
``project`` (default) projects the anchors back onto the unit sphere after every optimiser step,
so they are unit rows at every forward and in ``state()`` (the weight decay then only damps the
steps' radial part); ``free`` leaves them where the step puts them, as the PAL authors do: the
forward pass normalises them anyway (``token_anchor_cosine``), so a profile depends only on
their directions, and the weight decay shrinks their norms.

Tokens are read in batches from a ``TokenSource`` (rows -> tokens, mask), so neither training
nor embedding ever holds a whole token cache in memory. Fits are deterministic for a seed: the
anchors' initialisation and the batch order have their own seeded generators.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.align.base import Aligner, FitReport, check_pair_count, state_arrays
from pipeline.align.losses import info_nce
from pipeline.align.params import PAL_POOLINGS as POOLINGS
from pipeline.align.params import PALParams
from pipeline.align.params import PalPooling as Pooling
from pipeline.align.training import Loss, train_model

PROFILE_ELEMENTS = 1 << 24
"""Budget of token-anchor cosines (rows x tokens x K) per chunk when computing profiles."""

TokenBatch = tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray]


# ---- token sources ----


class TokenSource(Protocol):
    """Token features of n samples, read by rows.

    ``source[rows]`` with ``rows`` a sorted 1-D int64 array gives ``(tokens, mask)``: float
    tokens (len(rows), T, D) and a bool mask (len(rows), T), True for valid tokens (padding
    False). T may differ between reads, D may not.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, rows: np.ndarray) -> TokenBatch: ...


class ArrayTokens:
    """A ``TokenSource`` over in-memory tokens (n, T, D) and an optional mask (n, T)."""

    def __init__(
        self, tokens: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor | None = None
    ) -> None:
        self.tokens = torch.as_tensor(tokens)
        if self.tokens.ndim != 3 or not self.tokens.is_floating_point():
            raise ValueError(f"tokens: expected a float (n, T, D) array, got {self.tokens.shape}")
        if mask is None:
            mask = torch.ones(self.tokens.shape[:2], dtype=torch.bool)
        self.mask = torch.as_tensor(mask)
        if self.mask.dtype != torch.bool or self.mask.shape != self.tokens.shape[:2]:
            raise ValueError(
                f"mask: expected bool {tuple(self.tokens.shape[:2])}, "
                f"got {self.mask.dtype} {tuple(self.mask.shape)}"
            )

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.as_tensor(rows, dtype=torch.long)
        return self.tokens[rows], self.mask[rows]


def as_source(tokens: TokenSource | np.ndarray | torch.Tensor) -> TokenSource:
    """A token source as is; a bare (n, T, D) array as an ``ArrayTokens`` with every token valid."""
    if isinstance(tokens, np.ndarray | torch.Tensor):
        return ArrayTokens(tokens)
    return tokens


def read_batch(source: TokenSource, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 tokens and bool mask of ``rows``; a ValueError if the shapes disagree."""
    tokens, mask = source[rows]
    tokens = torch.as_tensor(tokens, dtype=torch.float32)
    mask = torch.as_tensor(mask, dtype=torch.bool)
    if tokens.ndim != 3 or mask.shape != tokens.shape[:2] or len(tokens) != len(rows):
        raise ValueError(
            f"token source gave tokens {tuple(tokens.shape)} and mask {tuple(mask.shape)} "
            f"for {len(rows)} rows (expected (rows, T, D) and (rows, T))"
        )
    return tokens, mask


def token_width(source: TokenSource) -> int:
    """D, the width of a source's tokens (read from its first row)."""
    return read_batch(source, np.zeros(1, dtype=np.int64))[0].shape[2]


# ---- pure functions ----


def token_anchor_cosine(tokens: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """s (B, T, K): cosines of tokens (B, T, D) and anchors (K, D), both L2-normalised here."""
    return F.normalize(tokens, dim=-1) @ F.normalize(anchors, dim=-1).T


def _check_mask(s: torch.Tensor, mask: torch.Tensor) -> None:
    if mask.shape != s.shape[:2]:
        raise ValueError(f"mask {tuple(mask.shape)} does not match tokens {tuple(s.shape[:2])}")
    if not mask.any(dim=1).all():
        raise ValueError("every sample needs at least one valid token (mask row all False)")


class _CAP(torch.autograd.Function):
    """CAP with its gradient in closed form, dp_k / ds_tk = a_tk (1 + (s_tk - p_k) / tau_p):
    a few in-place passes over (B, T, K) instead of autograd's graph of temporaries."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, valid: torch.Tensor, tau_p: float) -> torch.Tensor:
        weights = (s / tau_p).masked_fill_(~valid, -math.inf).softmax(dim=1)
        pooled = (weights * s).sum(dim=1)
        ctx.save_for_backward(s, weights, pooled)
        ctx.tau_p = tau_p
        return pooled

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        s, weights, pooled = ctx.saved_tensors
        grad_s = (s - pooled.unsqueeze(1)).div_(ctx.tau_p).add_(1.0).mul_(weights)
        return grad_s.mul_(grad.unsqueeze(1)), None, None


def cap_pool(s: torch.Tensor, mask: torch.Tensor, tau_p: float) -> torch.Tensor:
    """CAP (B, K): p_k = sum_t a_tk s_tk, a = softmax over the valid tokens of s / tau_p.

    ``s`` must be finite (padded tokens get weight 0, and 0 x NaN is NaN); ``profiles`` zeroes
    padded tokens first.
    """
    _check_mask(s, mask)
    return _CAP.apply(s, mask.unsqueeze(-1), tau_p)


def mean_pool(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, K): the mean of s over the valid tokens."""
    _check_mask(s, mask)
    valid = mask.unsqueeze(-1)
    return s.masked_fill(~valid, 0.0).sum(dim=1) / valid.sum(dim=1).to(s.dtype)


def cls_pool(s: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, K): s of the first token (CLS), which must be valid."""
    _check_mask(s, mask)
    if not mask[:, 0].all():
        raise ValueError("cls pooling needs the first token of every sample to be valid")
    return s[:, 0]


def pool(s: torch.Tensor, mask: torch.Tensor, pooling: Pooling, tau_p: float) -> torch.Tensor:
    """(B, K) pooled token-anchor cosines by ``pooling`` (cap, mean or cls)."""
    if pooling == "cap":
        return cap_pool(s, mask, tau_p)
    if pooling == "mean":
        return mean_pool(s, mask)
    if pooling == "cls":
        return cls_pool(s, mask)
    raise ValueError(f"unknown pooling {pooling!r} (expected one of {POOLINGS})")


def profiles(
    tokens: torch.Tensor,
    mask: torch.Tensor,
    anchors: torch.Tensor,
    pooling: Pooling = "cap",
    tau_p: float = 0.03,
) -> torch.Tensor:
    """(B, K) unit profiles of token sets (B, T, D) with mask (B, T) against anchors (K, D).

    Padded tokens are zeroed before anything is computed, so their values (even NaN) never
    reach a profile or a gradient.
    """
    if not mask.all():
        tokens = torch.where(mask.unsqueeze(-1), tokens, torch.zeros((), dtype=tokens.dtype))
    pooled = pool(token_anchor_cosine(tokens, anchors), mask, pooling, tau_p)
    return F.normalize(pooled, dim=-1)


# ---- parameters and model ----


class Anchors(nn.Module):
    """The trained parameters: anchors ``image_anchors`` (K, Dv), ``text_anchors`` (K, Dt), unit
    rows at initialisation (taken as given: a saved state is loaded bit for bit)."""

    def __init__(self, image_anchors: torch.Tensor, text_anchors: torch.Tensor) -> None:
        super().__init__()
        if len(image_anchors) != len(text_anchors):
            raise ValueError(f"{len(image_anchors)} image anchors but {len(text_anchors)} text")
        self.image_anchors = nn.Parameter(image_anchors.to(torch.float32))
        self.text_anchors = nn.Parameter(text_anchors.to(torch.float32))

    @classmethod
    def initial(cls, k: int, image_width: int, text_width: int, seed: int) -> Anchors:
        """Seeded standard normal anchors (image first, then text), rows normalised."""
        generator = torch.Generator().manual_seed(seed)
        image = torch.randn(k, image_width, generator=generator)
        anchors = cls(image, torch.randn(k, text_width, generator=generator))
        anchors.renormalise()
        return anchors

    @torch.no_grad()
    def renormalise(self) -> None:
        """Project every anchor back onto the unit sphere."""
        for anchors in self.parameters():
            anchors.copy_(F.normalize(anchors, dim=1))


# ---- training ----


def read_pairs(
    image: TokenSource, text: TokenSource, rows: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """(image tokens, image mask, text tokens, text mask) of pairs ``rows``, read in ascending
    row order (InfoNCE does not depend on it)."""
    rows = torch.sort(rows).values.numpy()
    return (*read_batch(image, rows), *read_batch(text, rows))


def batch_loss(model: Anchors, batch: tuple[torch.Tensor, ...], params: PALParams) -> torch.Tensor:
    """Symmetric InfoNCE of a batch's image and text profiles."""
    x, x_mask, y, y_mask = batch
    h_img = profiles(x, x_mask, model.image_anchors, params.pooling, params.tau_p)
    h_txt = profiles(y, y_mask, model.text_anchors, params.pooling, params.tau_p)
    return info_nce(h_img, h_txt, params.tau)


def train_anchors(
    model: Anchors,
    train: tuple[TokenSource, TokenSource],
    val: tuple[TokenSource, TokenSource] | None,
    params: PALParams,
    seed: int,
) -> FitReport:
    """Train ``model`` in place on (image, text) pairs (``training.train_model``), the anchors
    renormalised after every step unless ``anchor_update`` is ``free``; leaves it holding the
    chosen epoch."""

    def train_loss(probe: nn.Module, rows: torch.Tensor, step: int) -> Loss:
        loss = batch_loss(probe, read_pairs(*train, rows), params)
        return Loss(loss, loss)

    def val_loss(probe: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        return batch_loss(probe, read_pairs(*val, rows), params)

    validation = None if val is None else (len(val[0]), val_loss)
    after_step = Anchors.renormalise if params.anchor_update == "project" else None
    return train_model(
        model, len(train[0]), train_loss, validation, params, seed, after_step=after_step
    )


# ---- the aligner ----


class PALAligner(Aligner):
    """PAL anchors of both modalities (kind ``pal``). Its inputs are ``TokenSource``s (or
    (n, T, D) arrays), not pooled features: the kinds table's ``tokens`` flag tells the align
    and evaluate stages to read token caches for it; ``scores_patches`` tells segmentation to
    score patches with ``patch_scores``."""

    kind = "pal"
    scores_patches = True
    params: PALParams

    def __init__(self, params: PALParams) -> None:
        super().__init__(params)
        self.anchors: Anchors | None = None

    def fit(
        self,
        image_tokens: TokenSource,
        text_tokens: TokenSource,
        val_image_tokens: TokenSource | None,
        val_text_tokens: TokenSource | None,
        seed: int,
    ) -> FitReport:
        """Train the anchors on pairs (image_tokens[i], text_tokens[i]); validation pairs, when
        given, drive early stopping."""
        train = (as_source(image_tokens), as_source(text_tokens))
        check_pair_count(*map(len, train), "training")
        if (val_image_tokens is None) != (val_text_tokens is None):
            raise ValueError("validation pairs: give both image and text tokens, or neither")
        val = None
        if val_image_tokens is not None:
            val = (as_source(val_image_tokens), as_source(val_text_tokens))
            check_pair_count(*map(len, val), "validation")
        widths = [token_width(source) for source in train]
        if val is not None and [token_width(source) for source in val] != widths:
            raise ValueError(f"validation token widths differ from the training widths {widths}")
        model = Anchors.initial(self.params.anchors, *widths, seed)
        report = train_anchors(model, train, val, self.params, seed)
        self.anchors = model
        report.extra |= {"n_train": len(train[0]), "n_val": 0 if val is None else len(val[0])}
        return report

    @torch.no_grad()
    def _profiles(self, source: TokenSource | np.ndarray, anchors: torch.Tensor) -> np.ndarray:
        source, p = as_source(source), self.params
        if len(source) == 0:
            return np.zeros((0, len(anchors)), dtype=np.float32)
        tokens_per_row = read_batch(source, np.zeros(1, dtype=np.int64))[0].shape[1]
        chunk = max(1, PROFILE_ELEMENTS // (tokens_per_row * len(anchors)))
        parts = []
        for start in range(0, len(source), chunk):
            rows = np.arange(start, min(start + chunk, len(source)), dtype=np.int64)
            tokens, mask = read_batch(source, rows)
            if tokens.shape[2] != anchors.shape[1]:
                raise ValueError(
                    f"tokens of width {tokens.shape[2]}, but the anchors have {anchors.shape[1]}"
                )
            parts.append(profiles(tokens, mask, anchors, p.pooling, p.tau_p))
        return torch.cat(parts).numpy()

    def image_profiles(self, source: TokenSource | np.ndarray) -> np.ndarray:
        """(n, K) float32 unit image profiles, read in batches."""
        self._require_fitted(self.anchors is not None)
        return self._profiles(source, self.anchors.image_anchors)

    def text_profiles(self, source: TokenSource | np.ndarray) -> np.ndarray:
        """(n, K) float32 unit text profiles, read in batches."""
        self._require_fitted(self.anchors is not None)
        return self._profiles(source, self.anchors.text_anchors)

    embed_image = image_profiles
    embed_text = text_profiles

    @torch.no_grad()
    def patch_scores(self, patch_tokens: np.ndarray | torch.Tensor) -> np.ndarray:
        """(..., P, K) float32 cosines of patch tokens (..., P, Dv) and the image anchors, no
        pooling (drop the CLS token first: ``tokens[..., 1:, :]``); the profiles' coordinates,
        so class profiles score them by an inner product."""
        self._require_fitted(self.anchors is not None)
        tokens = torch.as_tensor(patch_tokens, dtype=torch.float32)
        return token_anchor_cosine(tokens, self.anchors.image_anchors).numpy()

    def state(self) -> dict[str, np.ndarray]:
        self._require_fitted(self.anchors is not None)
        return {k: v.detach().numpy().copy() for k, v in self.anchors.state_dict().items()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        arrays = state_arrays(self.kind, state, ("image_anchors", "text_anchors"))
        shapes = [a.shape for a in arrays.values()]
        if any(len(shape) != 2 or shape[0] != self.params.anchors for shape in shapes):
            raise ValueError(
                f"{self.kind} state: expected ({self.params.anchors}, width) anchors, got {shapes}"
            )
        self.anchors = Anchors(*(torch.tensor(a, dtype=torch.float32) for a in arrays.values()))
