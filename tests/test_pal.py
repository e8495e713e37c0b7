"""PAL: pooling against loop references, masking, training invariants, a planted token-level
case, determinism, state round trip, early stopping, params, and segmentation decoding."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.numpy import load_file, save_file

from pipeline.align.base import CURVE_SCHEMA
from pipeline.align.kinds import KINDS, build_aligner
from pipeline.align.pal import (
    Anchors,
    ArrayTokens,
    PALAligner,
    PALParams,
    batch_loss,
    cap_pool,
    cls_pool,
    mean_pool,
    profiles,
    token_anchor_cosine,
)
from pipeline.align.params import make_params
from pipeline.evaluate.segmentation import confusion_matrix, decode, segmentation_metrics
from pipeline.evaluate.zeroshot import class_embeddings

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = {"anchors": 8, "batch_size": 16, "max_epochs": 4, "patience": 2, "lr": 1e-2}


def pal(**params) -> PALAligner:
    return PALAligner(make_params(PALParams, {**TINY, **params}))


def random_tokens(rng: np.random.Generator, n: int, t: int, d: int) -> tuple[np.ndarray, ...]:
    """float64 tokens and a mask with a valid first token and >= 1 valid token per row."""
    tokens = rng.normal(size=(n, t, d))
    mask = rng.random((n, t)) < 0.6
    mask[:, 0] = True
    return tokens, mask


def tiny_pairs(n: int, seed: int, text_sign: float = 1.0) -> tuple[ArrayTokens, ArrayTokens]:
    """Image (n, 5, 6) and text (n, 7, 4) tokens sharing a 3-d latent (times ``text_sign`` on
    the text side), text right-padded."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3))
    maps = np.random.default_rng(5)
    image = rng.normal(size=(n, 5, 6)) + (z @ maps.normal(size=(3, 6)))[:, None]
    text = rng.normal(size=(n, 7, 4)) + (text_sign * z @ maps.normal(size=(3, 4)))[:, None]
    mask = np.arange(7) < rng.integers(2, 8, size=n)[:, None]
    return ArrayTokens(image.astype(np.float32)), ArrayTokens(text.astype(np.float32), mask)


# ---- pooling against plain loops ----


def loop_cosines(tokens: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    s = np.zeros((len(tokens), tokens.shape[1], len(anchors)))
    for b, t, k in np.ndindex(*s.shape):
        z, a = tokens[b, t], anchors[k]
        s[b, t, k] = sum(zi * ai for zi, ai in zip(z, a, strict=True)) / (
            math.sqrt(sum(zi * zi for zi in z)) * math.sqrt(sum(ai * ai for ai in a))
        )
    return s


def loop_pool(s: np.ndarray, mask: np.ndarray, pooling: str, tau_p: float) -> np.ndarray:
    out = np.zeros((s.shape[0], s.shape[2]))
    for b in range(s.shape[0]):
        valid = [t for t in range(s.shape[1]) if mask[b, t]]
        for k in range(s.shape[2]):
            if pooling == "cls":
                out[b, k] = s[b, 0, k]
            elif pooling == "mean":
                out[b, k] = sum(s[b, t, k] for t in valid) / len(valid)
            else:
                top = max(s[b, t, k] / tau_p for t in valid)
                weights = [math.exp(s[b, t, k] / tau_p - top) for t in valid]
                total = sum(weights)
                out[b, k] = sum(w / total * s[b, t, k] for w, t in zip(weights, valid, strict=True))
    return out


def test_poolings_equal_loop_references() -> None:
    rng = np.random.default_rng(0)
    tokens, mask = random_tokens(rng, 4, 6, 5)
    anchors = rng.normal(size=(3, 5))
    s = token_anchor_cosine(torch.from_numpy(tokens), torch.from_numpy(anchors))
    assert s.dtype == torch.float64 and s.shape == (4, 6, 3)
    expected_s = loop_cosines(tokens, anchors)
    np.testing.assert_allclose(s.numpy(), expected_s, rtol=0, atol=1e-10)
    m = torch.from_numpy(mask)
    pooled = {"cap": cap_pool(s, m, 0.03), "mean": mean_pool(s, m), "cls": cls_pool(s, m)}
    for pooling, value in pooled.items():
        expected = loop_pool(expected_s, mask, pooling, 0.03)
        np.testing.assert_allclose(value.numpy(), expected, rtol=0, atol=1e-10)
        unit = profiles(torch.from_numpy(tokens), m, torch.from_numpy(anchors), pooling, 0.03)
        expected_unit = expected / np.linalg.norm(expected, axis=1, keepdims=True)
        np.testing.assert_allclose(unit.numpy(), expected_unit, rtol=0, atol=1e-10)


def test_cap_gradient_matches_numerical_differences() -> None:
    rng = np.random.default_rng(3)
    s = torch.from_numpy(rng.uniform(-1, 1, size=(3, 5, 4))).requires_grad_()
    mask = torch.from_numpy(rng.random((3, 5)) < 0.7)
    mask[:, 0] = True
    assert torch.autograd.gradcheck(lambda s: cap_pool(s, mask, 0.3), (s,))
    cap_pool(s, mask, 0.3).sum().backward()
    assert (s.grad[~mask] == 0).all()


def test_cap_tends_to_max_and_mean_with_temperature() -> None:
    rng = np.random.default_rng(1)
    s = torch.from_numpy(rng.uniform(-1, 1, size=(3, 5, 4)))
    mask = torch.ones(3, 5, dtype=torch.bool)
    sharp, flat = cap_pool(s, mask, 1e-4), cap_pool(s, mask, 1e6)
    np.testing.assert_allclose(sharp.numpy(), s.amax(dim=1).numpy(), rtol=0, atol=1e-8)
    np.testing.assert_allclose(flat.numpy(), mean_pool(s, mask).numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("pooling", ["cap", "mean", "cls"])
def test_masked_padding_changes_no_profile(pooling: str) -> None:
    rng = np.random.default_rng(2)
    tokens, mask = random_tokens(rng, 5, 4, 6)
    anchors = torch.from_numpy(rng.normal(size=(7, 6)))
    padding = rng.normal(scale=10.0, size=(5, 3, 6))
    padding[0, 0] = np.nan
    padding[1, 1] = np.inf
    padded = np.concatenate([tokens, padding], axis=1)
    padded_mask = np.concatenate([mask, np.zeros((5, 3), dtype=bool)], axis=1)
    plain = profiles(torch.from_numpy(tokens), torch.from_numpy(mask), anchors, pooling)
    with_pad = profiles(torch.from_numpy(padded), torch.from_numpy(padded_mask), anchors, pooling)
    np.testing.assert_allclose(with_pad.numpy(), plain.numpy(), rtol=0, atol=1e-12)


def test_pooling_rejects_bad_masks() -> None:
    s = torch.zeros(2, 3, 4)
    empty = torch.tensor([[True, False, False], [False, False, False]])
    with pytest.raises(ValueError, match="at least one valid token"):
        cap_pool(s, empty, 0.03)
    with pytest.raises(ValueError, match="first token"):
        cls_pool(s, torch.tensor([[True, True, False], [False, True, True]]))
    with pytest.raises(ValueError, match="does not match"):
        mean_pool(s, torch.ones(2, 4, dtype=torch.bool))


# ---- training invariants ----


def test_only_the_anchors_train_and_they_stay_unit() -> None:
    image, text = tiny_pairs(40, seed=0)
    model = Anchors.initial(8, 6, 4, seed=0)
    assert [name for name, _ in model.named_parameters()] == ["image_anchors", "text_anchors"]
    rows = np.arange(16)
    batch = (*image[rows], *text[rows])
    assert not any(part.requires_grad for part in batch)
    batch_loss(model, batch, make_params(PALParams, TINY)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())

    aligner = pal()
    aligner.fit(image, text, *tiny_pairs(20, seed=1), seed=0)
    state = aligner.state()
    assert set(state) == {"image_anchors", "text_anchors"}
    assert state["image_anchors"].shape == (8, 6) and state["text_anchors"].shape == (8, 4)
    for anchors in state.values():
        np.testing.assert_allclose(np.linalg.norm(anchors, axis=1), 1.0, atol=1e-5)
    initial = Anchors.initial(8, 6, 4, seed=0).state_dict()
    assert not np.allclose(state["image_anchors"], initial["image_anchors"].numpy())
    for get, source in ((aligner.image_profiles, image), (aligner.text_profiles, text)):
        p = get(source)
        assert p.dtype == np.float32 and p.shape == (40, 8)
        np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1.0, atol=1e-5)


def test_free_anchors_leave_the_sphere_and_the_forward_sees_only_their_directions() -> None:
    image, text = tiny_pairs(40, seed=0)
    val = tiny_pairs(20, seed=1)
    # one step from the same unit anchors: the same forward and gradient, so the free anchors
    # are the projected ones up to each row's norm
    one_step = {"batch_size": 40, "max_epochs": 1}
    stepped = {}
    for update in ("project", "free"):
        aligner = pal(anchor_update=update, **one_step)
        aligner.fit(image, text, None, None, seed=0)
        stepped[update] = aligner.state()
    for key, free in stepped["free"].items():
        norms = np.linalg.norm(free, axis=1, keepdims=True)
        assert not np.allclose(norms, 1.0, atol=1e-4)
        np.testing.assert_allclose(free / norms, stepped["project"][key], atol=1e-6)

    fits = {}
    for update in ("project", "free"):
        aligner = pal(anchor_update=update, max_epochs=8, patience=8)
        fits[update] = (aligner, aligner.fit(image, text, *val, seed=0))
    for _, report in fits.values():  # both train
        val_loss = report.curve["val_loss"]
        assert val_loss.min() < val_loss[0] - 1e-3, val_loss.to_list()
    free_aligner = fits["free"][0]
    for anchors in free_aligner.state().values():
        assert np.abs(np.linalg.norm(anchors, axis=1) - 1.0).max() > 1e-3
    for anchors in fits["project"][0].state().values():
        np.testing.assert_allclose(np.linalg.norm(anchors, axis=1), 1.0, atol=1e-5)
    # the forward normalises the anchors: their unit rows give the same profiles
    unit = pal()
    unit.load_state(
        {k: a / np.linalg.norm(a, axis=1, keepdims=True) for k, a in free_aligner.state().items()}
    )
    for side, source in (("image_profiles", image), ("text_profiles", text)):
        np.testing.assert_allclose(
            getattr(unit, side)(source), getattr(free_aligner, side)(source), atol=1e-6
        )


def test_fit_report_follows_the_curve_schema() -> None:
    report = pal().fit(*tiny_pairs(40, seed=0), None, None, seed=0)
    assert report.curve.schema == pl.Schema(CURVE_SCHEMA)
    assert report.curve["epoch"].to_list() == [1, 2, 3, 4]
    assert report.curve["step"].to_list() == [3, 6, 9, 12]  # ceil(40 / 16) batches per epoch
    for column in ("structure", "structure_lambda", "val_loss"):
        assert report.curve[column].null_count() == 4
    assert report.chosen_epoch == 4 and report.extra["n_train"] == 40
    assert report.extra["n_val"] == 0 and report.extra["best_val_loss"] is None


# ---- a planted token-level case ----


def planted_pairs(n: int, seed: int, tokens: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Image (n, 16, 96) and text (n, 16, 128) tokens: unit noise tokens in random directions,
    except one token per sample, at a random position, that is the pair's shared 4-d latent
    embedded in a fixed 4-d subspace of each modality (plus a little noise)."""
    basis = np.random.default_rng(123)
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 4))

    def side(width: int) -> np.ndarray:
        embed = np.linalg.qr(basis.normal(size=(width, 4)))[0].T
        out = rng.normal(size=(n, tokens, width))
        out /= np.linalg.norm(out, axis=2, keepdims=True)
        signal = z @ embed
        signal /= np.linalg.norm(signal, axis=1, keepdims=True)
        where = rng.integers(tokens, size=n)
        out[np.arange(n), where] = signal + 0.1 * rng.normal(size=signal.shape) / np.sqrt(width)
        return out.astype(np.float32)

    return side(96), side(128)


def top1(image_emb: np.ndarray, text_emb: np.ndarray) -> float:
    """Fraction of images whose own caption (same row) scores highest."""
    return float(np.mean(np.argmax(image_emb @ text_emb.T, axis=1) == np.arange(len(image_emb))))


def test_cap_finds_the_informative_token_where_pooled_features_cannot() -> None:
    x, y = planted_pairs(1500, seed=0)
    xv, yv = planted_pairs(256, seed=1)
    xt, yt = planted_pairs(256, seed=2)  # held out; chance top-1 is 1/256
    settings = {"anchors": 64, "batch_size": 256, "max_epochs": 30, "patience": 3, "lr": 2e-2}
    scores = {}
    for pooling in ("cap", "mean"):
        aligner = PALAligner(make_params(PALParams, {**settings, "pooling": pooling}))
        aligner.fit(x, y, xv, yv, seed=0)
        scores[pooling] = top1(aligner.image_profiles(xt), aligner.text_profiles(yt))
    head = build_aligner("linear", {"dim": 64, "batch_size": 256, "max_epochs": 30, "patience": 3})
    head.fit(x.mean(axis=1), y.mean(axis=1), xv.mean(axis=1), yv.mean(axis=1), seed=0)
    scores["linear"] = top1(head.embed_image(xt.mean(axis=1)), head.embed_text(yt.mean(axis=1)))
    # measured over 8 data and fit seeds: cap 0.41-0.79, mean and linear 0.008-0.043
    assert scores["cap"] >= 0.3, scores
    assert scores["cap"] >= scores["mean"] + 0.2, scores
    assert scores["cap"] >= scores["linear"] + 0.2, scores


# ---- determinism, state, early stopping, params ----


def test_fits_are_deterministic_for_a_seed() -> None:
    data = (*tiny_pairs(40, seed=0), *tiny_pairs(20, seed=1))

    def anchors(seed: int) -> dict[str, np.ndarray]:
        aligner = pal()
        aligner.fit(*data, seed=seed)
        return aligner.state()

    first, again, other = anchors(7), anchors(7), anchors(8)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert all(not np.allclose(first[k], other[k]) for k in first)


def test_state_round_trips_through_safetensors(tmp_path) -> None:
    image, text = tiny_pairs(40, seed=0)
    aligner = pal(pooling="mean")
    aligner.fit(image, text, None, None, seed=0)
    save_file(aligner.state(), tmp_path / "weights.safetensors")
    loaded = pal(pooling="mean")
    loaded.load_state(load_file(tmp_path / "weights.safetensors"))
    assert loaded.hyperparameters() == aligner.hyperparameters()
    assert np.array_equal(loaded.image_profiles(image), aligner.image_profiles(image))
    assert np.array_equal(loaded.text_profiles(text), aligner.text_profiles(text))
    patches = image.tokens[:3, 1:]
    assert np.array_equal(loaded.patch_scores(patches), aligner.patch_scores(patches))
    with pytest.raises(ValueError, match=r"missing keys \['text_anchors'\]"):
        pal().load_state({"image_anchors": aligner.state()["image_anchors"]})
    with pytest.raises(ValueError, match=r"expected \(16, width\) anchors"):
        pal(anchors=16).load_state(aligner.state())
    with pytest.raises(RuntimeError, match="not fitted"):
        pal().image_profiles(image)


def test_early_stopping_is_driven_by_validation_and_restores_the_best_epoch() -> None:
    image, text = tiny_pairs(40, seed=0)
    # validation pairs of opposite latents: the better training aligns, the worse they score
    val_image, val_text = tiny_pairs(40, seed=1, text_sign=-1.0)
    aligner = pal(max_epochs=30, patience=2, batch_size=64)  # one batch: whole-set InfoNCE
    report = aligner.fit(image, text, val_image, val_text, seed=0)
    val_loss = report.curve["val_loss"].to_numpy()
    assert report.chosen_epoch == int(np.argmin(val_loss)) + 1
    assert report.extra["stopped_early"] and len(val_loss) == report.chosen_epoch + 2
    assert report.extra["best_val_loss"] == pytest.approx(val_loss.min())
    # the kept anchors are the chosen epoch's: their validation InfoNCE is the curve's minimum
    h_img, h_txt = aligner.image_profiles(val_image), aligner.text_profiles(val_text)
    logits = torch.from_numpy(h_img @ h_txt.T) / 0.05
    labels = torch.arange(len(logits))
    loss = 0.5 * (
        torch.nn.functional.cross_entropy(logits, labels)
        + torch.nn.functional.cross_entropy(logits.T, labels)
    )
    assert loss.item() == pytest.approx(val_loss.min(), rel=1e-4)
    # the same training pairs without validation train every epoch and keep the last
    free = pal(max_epochs=30, patience=2, batch_size=64).fit(image, text, None, None, seed=0)
    assert free.chosen_epoch == 30 and free.curve["val_loss"].null_count() == 30


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"anchors": 0}, "parameter 'anchors' must be >= 1"),
        ({"tau_p": 0}, "parameter 'tau_p' must be > 0"),
        ({"pooling": "max"}, "parameter 'pooling' must be one of"),
        ({"anchor_update": "clamp"}, "parameter 'anchor_update' must be one of"),
        ({"lr": -1}, "parameter 'lr' must be > 0"),
        ({"batch_size": 1}, "parameter 'batch_size' must be >= 2"),
        ({"patience": 0}, "parameter 'patience' must be >= 1"),
        ({"anchors": "many"}, "parameter 'anchors' must be of type int"),
        ({"dim": 64}, "parameter 'dim' is unknown"),
    ],
)
def test_param_errors_name_the_key(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_params(PALParams, values)


def test_params_defaults_and_hyperparameters() -> None:
    aligner = PALAligner(make_params(PALParams, {"lr": "1e-3"}))
    hp = aligner.hyperparameters()
    assert hp["anchors"] == 512 and hp["tau_p"] == 0.03 and hp["pooling"] == "cap"
    assert hp["anchor_update"] == "project"
    assert hp["tau"] == 0.05 and hp["betas"] == [0.9, 0.95] and hp["weight_decay"] == 1e-4
    assert hp["lr"] == 1e-3 and hp["fitted"] == {}
    assert PALAligner.kind == "pal" and KINDS["pal"].params is PALParams


def test_mismatched_sources_are_rejected() -> None:
    image, text = tiny_pairs(40, seed=0)
    with pytest.raises(ValueError, match="40 image rows but 39 text rows"):
        pal().fit(image, ArrayTokens(text.tokens[:39], text.mask[:39]), None, None, seed=0)
    with pytest.raises(ValueError, match="give both"):
        pal().fit(image, text, image, None, seed=0)
    with pytest.raises(ValueError, match="mask: expected bool"):
        ArrayTokens(np.zeros((2, 3, 4), np.float32), np.ones((2, 4), bool))


# ---- segmentation through the anchors ----


def test_patch_scores_and_prompt_profiles_decode_a_planted_mask() -> None:
    """Unit anchors e_0..e_3 on both sides; patches of class c point along e_c, each prompt of
    class c holds e_c and a filler token along e_3, so the class profile is about
    (e_c + e_3) / sqrt(2) and the patch-class score peaks at the patch's class."""
    aligner = pal(anchors=4)
    aligner.load_state({"image_anchors": np.eye(4), "text_anchors": np.eye(4)})
    grid, size = (2, 3), (20, 30)
    layout = np.array([[1, 0, 2], [1, 0, 2]])  # class per patch (columns; 0 = background)
    rng = np.random.default_rng(0)
    patches = np.eye(4)[layout.ravel()] + 0.01 * rng.normal(size=(6, 4))
    scores = aligner.patch_scores(patches)
    assert scores.shape == (6, 4)
    prompts = np.zeros((6, 3, 4))
    prompts[np.arange(6), 0, [0, 0, 1, 1, 2, 2]] = 1.0
    prompts[:, 1, 3] = 1.0
    prompts[:, 2] = rng.normal(size=(6, 4))  # padding
    mask = np.array([[True, True, False]] * 6)
    classes = class_embeddings(aligner, ArrayTokens(prompts, mask), np.repeat(np.arange(3), 2), 3)
    np.testing.assert_allclose(classes[:, :3], np.eye(3) / np.sqrt(2), atol=1e-3)
    labels = decode(scores @ classes.T, grid, size)
    target = np.kron(layout, np.ones((10, 10), dtype=np.int64))
    assert labels.shape == size and np.array_equal(labels, target)
    metrics = segmentation_metrics(confusion_matrix(labels, target, 3))
    assert metrics.pop("miou_all_background") < 1.0  # background is not everywhere
    assert metrics == {"miou": 1.0, "miou_fg": 1.0, "pixel_accuracy": 1.0}
