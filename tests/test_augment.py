"""ClassMix, kornia-0.5.8 colour jitter, DACS blur, MIC block masks; docs/method.md §4.6-§5."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from ssr.data.labels import MEAN, STD
from ssr.uda.augment import (
    JitterParams,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    apply_jitter,
    blur_kernel_size,
    class_mix_masks,
    color_jitter_k05,
    gaussian_blur,
    hsv_to_rgb,
    mix,
    rgb_to_hsv,
    sample_jitter_params,
    sample_mix_classes,
    strong_augment,
)
from ssr.uda.masking import MaskedConsistency
from ssr.uda.mixing import DACSMixing


def rgb(*values: float, size: int = 4) -> torch.Tensor:
    """A (1, 3, size, size) image of one colour."""
    return torch.tensor(values, dtype=torch.float32).reshape(1, 3, 1, 1).expand(1, 3, size, size)


def one(x: float) -> torch.Tensor:
    return torch.tensor([x])


# ------------------------------------------------------------------------------------ ClassMix
def two_image_labels() -> torch.Tensor:
    lbl = torch.zeros(2, 8, 8, dtype=torch.long)
    lbl[0, :4] = 1
    lbl[0, 4:, :4] = 2
    lbl[1] = 3
    lbl[1, :2] = 255  # union over the batch = {0, 1, 2, 3, 255}, n = 5
    return lbl


def test_class_choice_size_and_union() -> None:
    lbl = two_image_labels()
    for seed in range(20):
        chosen = sample_mix_classes(lbl, np.random.default_rng(seed))
        assert len(chosen) == 2
        for cls in chosen:
            assert cls.numel() == 3  # ceil(5 / 2)
            assert len(set(cls.tolist())) == 3
            assert set(cls.tolist()) <= {0, 1, 2, 3, 255}
    even = lbl.clone()
    even[even == 255] = 3  # n = 4 -> 2 chosen
    assert all(c.numel() == 2 for c in sample_mix_classes(even, np.random.default_rng(0)))


def test_mask_is_membership_of_chosen_classes() -> None:
    lbl = two_image_labels()
    for seed in range(10):
        masks = class_mix_masks(lbl, np.random.default_rng(seed))
        chosen = sample_mix_classes(lbl, np.random.default_rng(seed))
        assert masks.shape == (2, 1, 8, 8) and masks.dtype == torch.float32
        for i in range(2):
            expected = torch.isin(lbl[i], chosen[i]).float()
            assert torch.equal(masks[i, 0], expected)


def test_ignore_can_be_chosen_and_classes_come_from_the_batch_union() -> None:
    lbl = torch.zeros(2, 4, 4, dtype=torch.long)
    lbl[1] = 255  # image 0 is all class 0, image 1 all ignore; one of the two is chosen per image
    pasted = {0: set(), 1: set()}
    for seed in range(40):
        masks = class_mix_masks(lbl, np.random.default_rng(seed))
        for i in range(2):
            pasted[i].add(masks[i].mean().item())
    # both images are sometimes fully pasted (incl. "ignore" for image 1) and sometimes not at all,
    # because the choice may be a class that the image does not contain
    assert pasted == {0: {0.0, 1.0}, 1: {0.0, 1.0}}


def test_mix_invariants() -> None:
    lbl = two_image_labels()
    mask = class_mix_masks(lbl, np.random.default_rng(3))
    m = mask[:, 0].bool()
    pseudo = torch.full_like(lbl, 7)
    mixed_lbl = mix(mask, lbl, pseudo)
    assert mixed_lbl.dtype == torch.int64 and mixed_lbl.shape == lbl.shape
    assert torch.equal(mixed_lbl[m], lbl[m]) and mixed_lbl[~m].eq(7).all()
    src, tgt = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    mixed = mix(mask, src, tgt)
    m3 = m[:, None].expand_as(src)
    assert torch.equal(mixed[m3], src[m3]) and torch.equal(mixed[~m3], tgt[~m3])
    w_t = torch.full((2, 8, 8), 0.4)
    w_t[:, :1] = 0.0  # cropped rows
    mixed_w = mix(mask, torch.ones_like(w_t), w_t)
    assert mixed_w[m].eq(1.0).all()  # pasted source pixels weigh 1, even in cropped rows
    assert torch.equal(mixed_w[~m], w_t[~m])


def test_class_mix_rejects_channel_labels() -> None:
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        class_mix_masks(torch.zeros(2, 1, 4, 4, dtype=torch.long), np.random.default_rng(0))


# ---------------------------------------------------------------------------- colour jitter
def test_single_operations_by_hand() -> None:
    gray = rgb(0.5, 0.5, 0.5)
    torch.testing.assert_close(adjust_brightness(gray, one(1.1)), rgb(0.6, 0.6, 0.6))  # additive
    torch.testing.assert_close(adjust_brightness(gray, one(0.8)), rgb(0.3, 0.3, 0.3))
    torch.testing.assert_close(
        adjust_brightness(rgb(0.95, 0.5, 0.1), one(1.2))[:, 0], torch.ones(1, 4, 4)
    )
    torch.testing.assert_close(adjust_contrast(gray, one(0.9)), rgb(0.45, 0.45, 0.45))  # x * c
    torch.testing.assert_close(adjust_contrast(rgb(0.9, 0.5, 0.1), one(1.2)), rgb(1.0, 0.6, 0.12))
    torch.testing.assert_close(adjust_saturation(gray, one(1.2)), gray)  # gray stays gray
    # (0.8, 0.4, 0.4): H 0, S 0.5, V 0.8; S * 1.2 = 0.6 -> G = B = 0.8 * (1 - 0.6) = 0.32
    torch.testing.assert_close(
        adjust_saturation(rgb(0.8, 0.4, 0.4), one(1.2)), rgb(0.8, 0.32, 0.32)
    )
    red = rgb(1.0, 0.0, 0.0)
    torch.testing.assert_close(adjust_hue(red, one(1 / 6)), rgb(1.0, 1.0, 0.0))  # +60° -> yellow
    torch.testing.assert_close(adjust_hue(red, one(-1 / 6)), rgb(1.0, 0.0, 1.0))  # -60° -> magenta
    torch.testing.assert_close(adjust_hue(red, one(1 / 3)), rgb(0.0, 1.0, 0.0))  # +120° -> green


def test_hsv_known_values_and_round_trip() -> None:
    hsv = rgb_to_hsv(torch.stack([rgb(0.0, 0.0, 1.0)[0], rgb(0.2, 0.2, 0.2)[0]]))
    torch.testing.assert_close(hsv[0, :, 0, 0], torch.tensor([4 * math.pi / 3, 1.0, 1.0]))  # blue
    torch.testing.assert_close(hsv[1, :, 0, 0], torch.tensor([0.0, 0.0, 0.2]))  # gray: H = S = 0
    img = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    img[0, :, 0, 0] = 0.0  # black
    img[0, :, 0, 1] = torch.tensor([0.3, 0.3, 0.7])  # ties in the two smallest channels
    hsv = rgb_to_hsv(img)
    assert hsv[:, 0].min() >= 0 and hsv[:, 0].max() < 2 * math.pi
    assert hsv[:, 1:].min() >= 0 and hsv[:, 1:].max() <= 1
    torch.testing.assert_close(hsv_to_rgb(hsv), img, atol=1e-6, rtol=0)


def test_operation_order_matters_and_is_followed() -> None:
    img = rgb(0.5, 0.3, 0.2)
    neutral = torch.ones(2)
    order = torch.tensor([[0, 1, 2, 3], [1, 0, 2, 3]])  # brightness first / contrast first
    params = JitterParams(
        torch.full((2,), 1.1), torch.full((2,), 1.2), neutral, torch.zeros(2), order
    )
    out = apply_jitter(img.expand(2, 3, 4, 4), params)
    torch.testing.assert_close(out[0], ((img + 0.1) * 1.2)[0])  # (0.72, 0.48, 0.36)
    torch.testing.assert_close(out[1], (img * 1.2 + 0.1)[0])  # (0.70, 0.46, 0.34)


def test_jitter_sampling_ranges_and_order_sharing() -> None:
    gen = torch.Generator().manual_seed(0)
    p = sample_jitter_params(64, 0.2, 0.2, 0.2, 0.2, gen, per_image_order=True)
    for f in (p.brightness, p.contrast, p.saturation):
        assert f.shape == (64,) and f.min() >= 0.8 and f.max() <= 1.2 and f.std() > 0.05
    assert p.hue.min() >= -0.2 and p.hue.max() <= 0.2 and p.hue.min() < 0 < p.hue.max()
    assert all(sorted(row) == [0, 1, 2, 3] for row in p.order.tolist())
    assert len({tuple(row) for row in p.order.tolist()}) > 1  # a permutation per image
    shared = sample_jitter_params(64, generator=gen, per_image_order=False)
    assert len({tuple(row) for row in shared.order.tolist()}) == 1  # one order for the batch
    assert shared.brightness.std() > 0.05  # factors are still per image


def test_color_jitter_deterministic_identity_and_range() -> None:
    img = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    a = color_jitter_k05(img, generator=torch.Generator().manual_seed(5))
    b = color_jitter_k05(img, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1 and not torch.allclose(a, img)
    ident = color_jitter_k05(img, 0.0, 0.0, 0.0, 0.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ident, img, atol=1e-5, rtol=0)  # two HSV round trips
    with pytest.raises(ValueError, match="hue"):
        color_jitter_k05(img, hue=0.7)


# ---------------------------------------------------------------------------------- blur
def test_blur_kernel_size_rule() -> None:
    assert blur_kernel_size(512) == 51
    assert blur_kernel_size(1024) == 103
    assert blur_kernel_size(64) == 7  # ceil(6.4) = 7, odd -> 7
    assert blur_kernel_size(40) == 3  # ceil(4) = 4, even -> 3


def test_blur_by_hand() -> None:
    # sigma 1, 7 taps: w_i ∝ exp(-i²/2), normalised; centre tap w_0 = 1 / 2.505948 = 0.399050
    w = torch.tensor([math.exp(-(i**2) / 2) for i in range(-3, 4)])
    w = w / w.sum()
    assert w[3].item() == pytest.approx(0.399050, abs=1e-6)
    delta = torch.zeros(1, 1, 64, 64)
    delta[0, 0, 32, 32] = 1.0
    out = gaussian_blur(delta, 1.0)
    assert out[0, 0, 32, 32].item() == pytest.approx(0.399050**2, abs=1e-6)
    torch.testing.assert_close(out[0, 0, 29:36, 29:36], torch.outer(w, w))
    # reflect border on a ramp x_j = j: output at column 0 = sum_i w_i |i| = 2 (w1 + 2 w2 + 3 w3)
    ramp = torch.arange(64.0).expand(1, 1, 64, 64)
    expected = 2 * (w[4] + 2 * w[5] + 3 * w[6])
    assert gaussian_blur(ramp, 1.0)[0, 0, 10, 0].item() == pytest.approx(expected.item(), abs=1e-5)


def test_blur_constant_image_and_per_image_sigma() -> None:
    const = torch.full((2, 3, 64, 48), -1.7)
    torch.testing.assert_close(gaussian_blur(const, torch.tensor([0.2, 1.1])), const)
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    both = gaussian_blur(noise, torch.tensor([0.3, 1.0]))
    torch.testing.assert_close(both[0:1], gaussian_blur(noise[0:1], 0.3))
    torch.testing.assert_close(both[1:2], gaussian_blur(noise[1:2], 1.0))
    assert both[1].std() < both[0].std() < noise.std()
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur(noise, torch.tensor([0.3, 1.0, 2.0]))


# --------------------------------------------------------------------------- strong augment
def test_strong_augment_gates() -> None:
    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    untouched = strong_augment(img, u_jitter=0.2, u_blur=0.5, generator=gen)  # gates are strict >
    assert torch.equal(untouched, img)
    kw = dict(mean=MEAN, std=STD, generator=gen)
    jitter_only = strong_augment(img, u_jitter=0.9, u_blur=0.0, **kw)
    blur_only = strong_augment(img, u_jitter=0.0, u_blur=0.9, **kw)
    assert not torch.allclose(jitter_only, img) and not torch.allclose(blur_only, img)
    assert blur_only.std() < img.std()  # blur smooths
    # zero-strength jitter is the identity up to the de-/re-normalisation round trip
    low = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))  # [0,1] images
    norm = (low * 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    same = strong_augment(norm, 0.9, 0.0, strength=0.0, generator=gen)
    torch.testing.assert_close(same, norm, atol=1e-5, rtol=0)


def test_strong_augment_blur_sigma_sharing() -> None:
    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    batch = torch.cat([img[:1], img[:1]])  # two copies of one image
    shared = strong_augment(batch, 0.0, 0.9, np_rng=np.random.default_rng(0), per_image_order=False)
    assert torch.equal(shared[0], shared[1])  # one sigma for the batch (MIC)
    per = strong_augment(batch, 0.0, 0.9, np_rng=np.random.default_rng(0), per_image_order=True)
    assert not torch.allclose(per[0], per[1])  # one sigma per image (DACS)


# ------------------------------------------------------------------------------ MIC masking
def test_block_mask_ratio_and_structure() -> None:
    masker = MaskedConsistency(block_size=32, ratio=0.7)
    mask = masker.mask((8, 3, 512, 512), generator=torch.Generator().manual_seed(0))
    assert mask.shape == (8, 1, 512, 512)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    blocks = mask.reshape(8, 16, 32, 16, 32)
    corner = blocks[:, :, :1, :, :1]
    assert torch.equal(blocks, corner.expand_as(blocks))  # constant within each 32x32 block
    kept = corner.mean().item()  # 2048 cells; binomial std of the kept fraction ~0.01
    assert abs(kept - 0.3) < 0.04


def test_masking_applies_mask_and_is_seeded() -> None:
    masker = MaskedConsistency(block_size=8, ratio=0.7)
    img = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    out = masker(img, generator=torch.Generator().manual_seed(1))
    mask = masker.mask(img.shape, generator=torch.Generator().manual_seed(1))
    assert mask.shape == (2, 1, 64, 48)
    torch.testing.assert_close(out, img * mask)
    assert out.eq(0).any() and 0.5 < (out == 0).float().mean() < 0.9
    assert MaskedConsistency(32, 0.7).mask((1, 3, 80, 80)).shape == (
        1,
        1,
        80,
        80,
    )  # round(2.5) cells
    with pytest.raises(ValueError, match="ratio"):
        MaskedConsistency(32, 1.5)


def test_mask_modes_build_their_masked_batch() -> None:
    """MIC's mask_mode: `separatetrgaug` masks the colour-augmented target batch with the teacher's
    labels; `separate` (ACDC, Dark Zurich) masks [source 0, target 0] with [its label (weight 1),
    the pseudo-label and weight], unaugmented, drawing only the mask from the mixing stream."""
    g = torch.Generator().manual_seed(0)
    xs, xt = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    ys, pl_lbl = torch.randint(0, 19, (2, 32, 32), generator=g), torch.randint(0, 19, (2, 32, 32))
    pl_w = torch.tensor([0.4, 0.7])[:, None, None].expand(2, 32, 32)

    img, lbl, w = MaskedConsistency(8, 0.7).inputs(xs, ys, xt, pl_lbl, pl_w, DACSMixing(seed=5))
    ref = DACSMixing(seed=5)
    expected = MaskedConsistency(8, 0.7)(ref.augment(xt, per_image=False), ref.generator)
    torch.testing.assert_close(img, expected, rtol=0, atol=0)
    assert lbl is pl_lbl and w is pl_w

    separate = MaskedConsistency(8, 0.7, mode="separate")
    img, lbl, w = separate.inputs(xs, ys, xt, pl_lbl, pl_w, DACSMixing(seed=5))
    mask = separate.mask((2, 3, 32, 32), generator=DACSMixing(seed=5).generator)
    torch.testing.assert_close(img, torch.cat([xs[:1], xt[:1]]) * mask, rtol=0, atol=0)
    assert torch.equal(lbl, torch.stack([ys[0], pl_lbl[0]]))
    assert torch.equal(w, torch.stack([torch.ones(32, 32), torch.full((32, 32), 0.4)]))
    with pytest.raises(ValueError, match="mask mode='trg'"):
        MaskedConsistency(mode="trg")


# -------------------------------------------------------------------------- DACS mixing part
def test_mixing_is_classmix_then_strong_augmentation_from_its_own_streams() -> None:
    """`DACSMixing` = class_mix_masks + mix + strong_augment, drawing from its generators in the
    reference's order (ClassMix classes, then the two gates, then jitter / blur parameters)."""
    g = torch.Generator().manual_seed(0)
    xs, xt = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    ys = torch.randint(0, 5, (2, 32, 32), generator=g)
    pl_lbl, pl_w = torch.randint(0, 19, (2, 32, 32), generator=g), torch.full((2, 32, 32), 0.3)
    mixed = DACSMixing(seed=3)(xs, ys, xt, pl_lbl, pl_w)

    np_rng, py_rng = np.random.default_rng(3), random.Random(3)
    m = class_mix_masks(ys, np_rng)
    u_jitter, u_blur = py_rng.random(), py_rng.random()
    expected = strong_augment(
        mix(m, xs, xt), u_jitter, u_blur, generator=torch.Generator().manual_seed(3),
        np_rng=np_rng, per_image_order=True,
    )  # fmt: skip
    torch.testing.assert_close(mixed.image, expected, rtol=0, atol=0)
    assert torch.equal(mixed.mask, m)
    assert torch.equal(mixed.label, torch.where(m[:, 0].bool(), ys, pl_lbl))
    assert torch.equal(mixed.weight, torch.where(m[:, 0].bool(), 1.0, 0.3))
    assert torch.equal(pl_w, torch.full((2, 32, 32), 0.3))  # MIC reuses the un-mixed weight


def test_mixing_rng_state_round_trip_and_blur_off() -> None:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    a = DACSMixing(seed=1)
    a.augment(x, per_image=True)
    state = a.rng_state()
    first = a.augment(x, per_image=False)
    b = DACSMixing(seed=99)
    b.load_rng_state(state)
    assert torch.equal(b.augment(x, per_image=False), first)
    no_blur = DACSMixing(color_jitter_p=1.0, blur=False, seed=1)  # no jitter, no blur
    assert torch.equal(no_blur.augment(x, per_image=True), x)
