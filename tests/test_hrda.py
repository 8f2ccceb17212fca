"""HRDA (docs/hrda.md §2-§3): detail boxes, context view, scale-attention fusion and its border
quirk, the 0.9/0.1 loss, full-resolution inference and the test protocol. Every expected number is
worked out by hand (or by a formula restated here), never produced by the code under test."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn

from ssr.model.hrda import HRDAHead, HRDASegmentor, down2, draw_box
from ssr.model.inference import Inference, window_spans
from ssr.model.segmentor import Prediction, Segmentor, View
from ssr.uda.losses import seg_loss

from helpers import compose_cfg

K = 19


def up(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear, align_corners=False: the reference's Up2 and its loss-side resize."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def ce(logits: Tensor, label: Tensor, weight: Tensor) -> Tensor:
    """mmseg-0.16 CE restated: logits resized to the label, ignored pixels in the denominator."""
    per_pixel = F.cross_entropy(
        up(logits, label.shape[-2:]), label, ignore_index=255, reduction="none"
    )
    return (per_pixel * weight).mean()


@pytest.fixture(scope="module")
def hrda() -> HRDASegmentor:
    """model=hrda_tiny (every size of the paper's / 8: 128 crops, 64 views) in eval mode, so
    dropout is off and BN uses running stats: each head call is batch-independent, repeatable."""
    torch.manual_seed(0)
    return instantiate(compose_cfg("train", "model=hrda_tiny").model).eval()


def input_shapes(module: torch.nn.Module, fn: Callable[[], Tensor]) -> tuple[list, Tensor]:
    """(the input shape of each call of `module` while `fn` runs, fn's result)."""
    calls: list[tuple[int, ...]] = []
    handle = module.register_forward_pre_hook(lambda m, a: calls.append(tuple(a[0].shape)))
    try:
        return calls, fn()
    finally:
        handle.remove()


# ----------------------------------------------------------------------------- detail box
def test_draw_box_reference_range_multiples_of_8() -> None:
    """1024 crop, 512 detail, divisor 8: offsets 8·{0..63}; 512 is never drawn (the last 8 rows
    and columns never get HR supervision), unless `full_range`."""
    rng = np.random.default_rng(0)
    boxes = [draw_box((1024, 1024), (512, 512), 8, rng) for _ in range(2000)]
    offsets = {b[0] for b in boxes} | {b[2] for b in boxes}
    assert offsets == set(range(0, 505, 8))  # 0 and 504 occur, nothing else
    assert all(y2 - y1 == 512 and x2 - x1 == 512 for y1, y2, x1, x2 in boxes)
    full = [draw_box((1024, 1024), (512, 512), 8, rng, full_range=True) for _ in range(2000)]
    assert {b[0] for b in full} == set(range(0, 513, 8))
    assert draw_box((512, 512), (512, 512), 8, rng) == (0, 512, 0, 512)
    assert draw_box((512, 512), (512, 512), 8, rng, full_range=True) == (0, 512, 0, 512)
    with pytest.raises(ValueError, match="larger than the image"):
        draw_box((256, 1024), (512, 512), 8, rng)


def test_draw_box_without_rng_uses_numpy_global_stream() -> None:
    """rng=None draws from np.random (seeded by the run's seed), as the reference."""
    draws = {}
    for seed in (3, 3, 4):
        np.random.seed(seed)
        draws.setdefault(seed, []).append([draw_box((1024, 1024), (512, 512), 8) for _ in range(6)])
    assert draws[3][0] == draws[3][1] and draws[3][0] != draws[4][0]
    a, b = (draw_box((64, 64), (32, 32), 8, np.random.default_rng(7)) for _ in range(2))
    assert a == b  # a seeded Generator reproduces too


def test_down2_is_the_2x2_block_mean() -> None:
    """No anti-aliasing: an anti-aliased resize gives [[1.94, 2.45], [1.78, 4.49]] here."""
    x = torch.tensor([[1.0, 2, 0, 0], [3, 4, 0, 8], [0, 0, 5, 5], [0, 4, 5, 5]])[None, None]
    assert torch.equal(down2(x), torch.tensor([[[[2.5, 2.0], [1.0, 5.0]]]]))


def test_train_views_context_and_detail(hrda: HRDASegmentor) -> None:
    """Context = the whole crop ×0.5; detail = the box of the crop at scale 1, one per batch."""
    x = torch.randn(2, 3, 128, 128)
    context, detail = hrda.train_views(x, rng=np.random.default_rng(1))
    assert context.box is None and detail.box is not None
    y1, y2, x1, x2 = detail.box
    assert y2 - y1 == x2 - x1 == 64 and {y1 % 8, x1 % 8} == {0} and max(y1, x1) <= 56
    assert torch.allclose(context.image, x.reshape(2, 3, 64, 2, 64, 2).mean((3, 5)), atol=1e-6)
    assert torch.equal(detail.image, x[:, :, y1:y2, x1:x2])


# ----------------------------------------------------------------------------- fusion
def test_fuse_upsamples_the_product_not_the_factors() -> None:
    """Up2((1 − a)·LR), not (1 − Up2(a))·Up2(LR). One row, LR [0, 4], a [1, 0]: (1 − a)·LR =
    [0, 4] → [0, 1, 3, 4]; Up2(a) = [1, .75, .25, 0]; HR = 1 adds it: [1, 1.75, 3.25, 4] (the
    factor-wise order would give [1, 1, 2.5, 4])."""
    lr = torch.tensor([[[[0.0, 4.0]]]])
    att = torch.tensor([[[[1.0, 0.0]]]])
    fused = HRDAHead.fuse(lr, torch.ones(1, 1, 2, 4), att)
    assert torch.allclose(fused, torch.tensor([[1.0, 1.75, 3.25, 4.0]] * 2)[None, None])


class FirstMap(nn.Module):
    """Stand-in head whose 'features' are hand-made logits: returns one given map."""

    num_classes = 2

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def forward(self, feats: list[Tensor]) -> Tensor:
        return feats[self.index]


def stub_hrda(**kwargs: object) -> HRDASegmentor:
    """HRDA with heads replaced by `FirstMap` (for a 64 crop and a 32 detail view: LR features =
    [LR logits (8×8), attention logits (8×8)], HR features = [HR logits (8×8)])."""
    backbone = nn.Identity()
    backbone.embed_dims = (2, 2)
    return HRDASegmentor(backbone, FirstMap(0), FirstMap(-1), **kwargs)  # type: ignore[arg-type]


BOX = (16, 48, 16, 48)  # attention mask: LR rows/cols 2..5 (stride 8); HR at fused 4..11 (stride 4)
VIEWS = [View(torch.zeros(1, 3, 32, 32)), View(torch.zeros(1, 3, 32, 32), BOX)]


def fused_of(model: HRDASegmentor, lr: Tensor, att_logit: Tensor, hr: Tensor) -> Tensor:
    return model.decode_train([[lr, att_logit], [hr]], VIEWS)[0].logits


def test_fusion_by_hand_box_interior_far_outside_and_border_ring() -> None:
    """a = 0.5, LR = 2, HR = 6. Inside: 0.5·6 + 0.5·2 = 4. Far outside: LR. Ring row 3 (just above
    the box), interior column: Up2(a·M) = 0.25·0.5, HR_placed = 0, Up2((1 − a·M)·LR) = 0.75·2 +
    0.25·1 = 1.75 ≠ 2 (quirk: the masked attention leaks out). Ring corner (3, 3): 2·(1 −
    0.0625·0.5) = 1.9375. First box row (4, 7): Up2(a·M) = 0.375 → 0.375·6 + 0.25·2 + 0.75·1 = 3.5.
    With exact_box_attention: 4 inside, exactly 2 everywhere outside."""
    lr, att, hr = (
        torch.full((1, 2, 8, 8), 2.0),
        torch.zeros(1, 2, 8, 8),
        torch.full((1, 2, 8, 8), 6.0),
    )
    fused = fused_of(stub_hrda(hr_crop_size=(32, 32)), lr, att, hr)[0, 0]
    assert fused.shape == (16, 16)
    for (r, c), value in {
        (7, 7): 4.0,
        (8, 10): 4.0,
        (0, 0): 2.0,
        (15, 15): 2.0,
        (3, 7): 1.75,
        (12, 7): 1.75,
        (7, 3): 1.75,
        (7, 12): 1.75,
        (3, 3): 1.9375,
        (4, 7): 3.5,
    }.items():
        assert fused[r, c].item() == pytest.approx(value, abs=1e-6), (r, c)
    inside = torch.zeros(16, 16, dtype=torch.bool)
    inside[4:12, 4:12] = True
    exact = fused_of(stub_hrda(hr_crop_size=(32, 32), exact_box_attention=True), lr, att, hr)[0, 0]
    assert torch.equal(exact, torch.where(inside, 4.0, 2.0))


def test_fusion_formula_on_random_maps() -> None:
    """fused = Up2(a·M)·HR_placed + Up2((1 − a·M)·LR), M at stride 8, HR placed at stride 4;
    outside the box and its 1-pixel ring it is Up2(LR) exactly; with exact_box_attention
    everywhere outside the box."""
    g = torch.Generator().manual_seed(0)
    lr, att, hr = (torch.randn(1, 2, 8, 8, generator=g) for _ in range(3))
    a = torch.sigmoid(att)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    placed = torch.zeros(1, 2, 16, 16)
    placed[..., 4:12, 4:12] = hr
    expected = up(a * mask, 16) * placed + up((1 - a * mask) * lr, 16)
    fused = fused_of(stub_hrda(hr_crop_size=(32, 32)), lr, att, hr)
    torch.testing.assert_close(fused, expected)
    far = torch.ones(16, 16, dtype=torch.bool)
    far[3:13, 3:13] = False  # the box (4..11) and its ring
    assert torch.equal(fused[..., far], up(lr, 16)[..., far])
    ring = torch.zeros(16, 16, dtype=torch.bool)
    ring[3:13, 3:13], ring[4:12, 4:12] = True, False
    assert not torch.isclose(fused[..., ring], up(lr, 16)[..., ring]).any()
    outside = far.clone()
    outside[ring] = True
    exact = fused_of(stub_hrda(hr_crop_size=(32, 32), exact_box_attention=True), lr, att, hr)
    assert torch.equal(exact[..., outside], up(lr, 16)[..., outside])


def train_forward(model: HRDASegmentor) -> tuple[list[View], list[list[Tensor]], list[Prediction]]:
    """One training forward of two random 128 crops with a seeded box."""
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    views = model.train_views(x, rng=np.random.default_rng(0))
    feats = [model.features(v.image) for v in views]
    return views, feats, model.decode_train(feats, views)


@torch.no_grad()
def test_decode_train_of_the_tiny_hrda(hrda: HRDASegmentor) -> None:
    """[fused 0.9 over the crop, detail 0.1 at its box]; fused = the formula on the model's own
    head and attention outputs (LR logits 16² = stride 8 of the 128 crop, fused 32² = stride 4)."""
    views, feats, (fused, detail) = train_forward(hrda)
    box = views[1].box
    assert (fused.weight, fused.box) == (pytest.approx(0.9), None)
    assert (detail.weight, detail.box) == (pytest.approx(0.1), box)
    assert fused.logits.shape == (2, K, 32, 32) and detail.logits.shape == (2, K, 16, 16)
    lr = hrda.decode_head.head(feats[0])
    hr = hrda.decode_head.head(feats[1])
    a = hrda.decode_head.attention(feats[0])
    assert lr.shape == a.shape == (2, K, 16, 16) and torch.equal(hr, detail.logits)
    y1, y2, x1, x2 = box
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., y1 // 8 : y2 // 8, x1 // 8 : x2 // 8] = 1
    placed = torch.zeros(2, K, 32, 32)
    placed[..., y1 // 4 : y2 // 4, x1 // 4 : x2 // 4] = hr
    expected = up(a * mask, 32) * placed + up((1 - a * mask) * lr, 32)
    torch.testing.assert_close(fused.logits, expected)


@torch.no_grad()
def test_loss_is_0p9_fused_plus_0p1_detail_and_mic_scales_only_fused(hrda: HRDASegmentor) -> None:
    views, _, predictions = train_forward(hrda)
    fused, detail = (p.logits for p in predictions)
    g = torch.Generator().manual_seed(1)
    label = torch.randint(0, K, (2, 128, 128), generator=g)
    label[:, :20] = 255
    weight = torch.rand(2, 128, 128, generator=g)
    y1, y2, x1, x2 = views[1].box
    ce_fused = ce(fused, label, weight)
    ce_hr = ce(detail, label[:, y1:y2, x1:x2], weight[:, y1:y2, x1:x2])
    loss = seg_loss(predictions, label, weight)
    torch.testing.assert_close(loss, 0.9 * ce_fused + 0.1 * ce_hr)
    mic = seg_loss(predictions, label, weight, scale=0.25)
    torch.testing.assert_close(mic, 0.25 * 0.9 * ce_fused + 0.1 * ce_hr)


# ----------------------------------------------------------------------------- inference
@torch.no_grad()
def test_forward_runs_context_plus_nine_overlapping_detail_windows(hrda: HRDASegmentor) -> None:
    """A 128² input (1024² at /8): the context (B images of 64²) and the 3×3 detail windows of 64,
    stride 32 (9·B images, one backbone call); HR logits averaged with counts 1,2,2,1 per 8-cell
    band of the 32² canvas; logits bilinearly resized to the input."""
    assert window_spans(128, 64, 32) == [(0, 64), (32, 96), (64, 128)]
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))
    calls, out = input_shapes(hrda.backbone, lambda: hrda(x))
    assert calls == [(2, 3, 64, 64), (18, 3, 64, 64)]
    assert out.shape == (2, K, 128, 128)
    canvas = torch.zeros(2, K, 32, 32)
    for y0 in (0, 32, 64):
        for x0 in (0, 32, 64):
            logits = hrda.decode_head.head(hrda.features(x[:, :, y0 : y0 + 64, x0 : x0 + 64]))
            canvas[..., y0 // 4 : y0 // 4 + 16, x0 // 4 : x0 // 4 + 16] += logits
    band = torch.tensor([1.0, 2, 2, 1]).repeat_interleave(8)
    hr = canvas / (band[:, None] * band[None, :])
    lr_feats = hrda.features(down2(x))
    lr, a = hrda.decode_head.head(lr_feats), hrda.decode_head.attention(lr_feats)
    expected = up(up(a, 32) * hr + up((1 - a) * lr, 32), 128)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_forward_pads_sides_that_are_not_multiples_of_8(hrda: HRDASegmentor) -> None:
    """100×76 is padded to 104×80 at the bottom/right (context 52×40; detail windows 3 × 2) and
    the logits are cut back to 100×76."""
    x = torch.randn(1, 3, 100, 76, generator=torch.Generator().manual_seed(3))
    calls, out = input_shapes(hrda.backbone, lambda: hrda(x))
    assert calls == [(1, 3, 52, 40), (6, 3, 64, 64)]
    assert out.shape == (1, K, 100, 76)
    torch.testing.assert_close(out, hrda(F.pad(x, (0, 4, 0, 4)))[..., :100, :76])


@torch.no_grad()
def test_outer_test_protocol_slides_three_windows_over_a_wide_image(hrda: HRDASegmentor) -> None:
    """2048×1024 at /8 = 256×128: windows of 128, stride 64 → x ranges [0,128), [64,192),
    [128,256); column counts 1, 2, 2, 1 over the four 64-px bands; fused logits averaged."""
    inference = Inference(window_batch=2).for_model(hrda)
    assert window_spans(128, 128, 64) == [(0, 128)]
    assert window_spans(256, 128, 64) == [(0, 128), (64, 192), (128, 256)]
    img = torch.randn(1, 3, 128, 256, generator=torch.Generator().manual_seed(4))
    calls, logits = input_shapes(hrda, lambda: inference._slide(hrda, img))
    assert [shape[0] for shape in calls] == [2, 1]  # 3 windows, window_batch 2
    stitched = torch.zeros(1, K, 128, 256)
    for x0 in (0, 64, 128):
        stitched[..., x0 : x0 + 128] += hrda(img[..., x0 : x0 + 128])
    count = torch.tensor([1.0, 2, 2, 1]).repeat_interleave(64)
    torch.testing.assert_close(logits, stitched / count, rtol=1e-4, atol=1e-5)


def test_for_model_hrda_protocol_keeps_batching_and_tta(
    hrda: HRDASegmentor, tiny: tuple[object, Segmentor]
) -> None:
    configured = Inference("whole", (1024, 512), window_batch=3, ratios=(0.5, 1.0), flip=True)
    assert configured.for_model(tiny[1]) is configured  # DAFormer: the configured protocol
    inference = configured.for_model(hrda)
    assert (inference.mode, inference.resize) == ("slide", None)
    assert inference.crop_size == (128, 128) and inference.stride == (64, 64)
    assert (inference.window_batch, inference.ratios, inference.flip) == (3, (0.5, 1.0), True)
    assert stub_hrda().test_protocol == {
        "mode": "slide",
        "resize": None,
        "crop_size": (1024, 1024),
        "stride": (512, 512),
    }


def test_flip_tta_on_hrda_is_the_mean_of_two_protocol_passes(hrda: HRDASegmentor) -> None:
    """tta=flip on an HRDA model: the softmax of its own protocol (sliding windows at full
    resolution) on the image and on its mirror, averaged, as for DAFormer."""
    img = torch.randn(1, 3, 128, 256, generator=torch.Generator().manual_seed(3))
    inference = Inference("whole", (1024, 512), flip=True).for_model(hrda)
    plain = Inference("whole", (1024, 512)).for_model(hrda)
    with torch.inference_mode():
        probs = inference.probs(hrda, [img], (128, 256))
        one = plain.probs(hrda, [img], (128, 256))
        mirrored = plain.probs(hrda, [img.flip(-1)], (128, 256)).flip(-1)
    torch.testing.assert_close(probs, (one + mirrored) / 2, rtol=0, atol=1e-6)
    assert not torch.allclose(one, mirrored, atol=1e-3)  # the flip is not a no-op here
