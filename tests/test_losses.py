"""Weighted CE over all pixels (docs/method.md §2.4) and the thing-class feature distance (§4.8)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssr.data.labels import THING_CLASSES
from ssr.model.segmentor import Prediction
from ssr.uda.losses import downscale_label_ratio, feature_distance, seg_loss, weighted_ce


def test_weighted_ce_by_hand_counts_ignored_pixels() -> None:
    # pixel 0: logits (0, 0), label 0 -> ln 2; pixel 1: (ln 3, 0), label 1 -> -ln(1/4) = ln 4;
    # pixel 2: ignored -> 0 but still in the denominator of 3.
    logits = torch.tensor([[0.0, math.log(3.0), 5.0], [0.0, 0.0, -5.0]]).reshape(1, 2, 1, 3)
    label = torch.tensor([[[0, 1, 255]]])
    assert weighted_ce(logits, label).item() == pytest.approx((math.log(2) + math.log(4)) / 3)
    # PyTorch's default mean would divide by the 2 valid pixels instead
    assert F.cross_entropy(logits, label, ignore_index=255).item() == pytest.approx(
        1.5 * math.log(2)
    )
    weight = torch.tensor([[[0.5, 2.0, 7.0]]])
    expected = (0.5 * math.log(2) + 2.0 * math.log(4)) / 3  # = 1.5 ln 2
    assert weighted_ce(logits, label, weight).item() == pytest.approx(expected)
    assert weighted_ce(logits, label[:, None], weight).item() == pytest.approx(expected)


def test_weighted_ce_resizes_logits_and_backpropagates() -> None:
    # spatially constant logits stay constant under bilinear resizing: every pixel has p(0) = 3/4
    logits = torch.tensor([math.log(3.0), 0.0]).reshape(1, 2, 1, 1).expand(2, 2, 4, 4).clone()
    logits.requires_grad_(True)
    label = torch.zeros(2, 16, 16, dtype=torch.long)
    label[:, :4] = 255  # a quarter of the pixels ignored
    loss = weighted_ce(logits, label)
    assert loss.item() == pytest.approx(0.75 * -math.log(0.75))
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="label must be"):
        weighted_ce(logits, torch.zeros(2, 3, 16, 16, dtype=torch.long))


def hand_label() -> torch.Tensor:
    """4x4 label, 2x2 cells: car / 3 person + 1 road / 2 car + road + sidewalk / 3 ignore + car."""
    return torch.tensor(
        [
            [13, 13, 11, 11],
            [13, 13, 11, 0],
            [13, 13, 255, 255],
            [0, 1, 255, 13],
        ]
    )[None]


def test_seg_loss_of_one_prediction_is_exactly_weighted_ce() -> None:
    g = torch.Generator().manual_seed(0)
    logits, label = (
        torch.randn(2, 19, 4, 4, generator=g),
        torch.randint(0, 19, (2, 8, 8), generator=g),
    )
    weight = torch.rand(2, 8, 8, generator=g)
    assert torch.equal(
        seg_loss([Prediction(logits)], label, weight), weighted_ce(logits, label, weight)
    )


def test_seg_loss_weights_and_crops_each_prediction_by_hand() -> None:
    """0.9 · CE(whole crop) + 0.1 · CE(detail box), labels and weights cut at the box."""
    label = torch.zeros(1, 4, 4, dtype=torch.long)
    label[:, :2, :2] = 1  # the box (0, 2, 0, 2) holds class 1
    weight = torch.ones(1, 4, 4)
    weight[:, 0, 0] = 0.0
    # Two classes, logit 0 for class 0 and log(3) for class 1: p(1) = 3/4 everywhere.
    whole = torch.stack([torch.zeros(4, 4), torch.full((4, 4), math.log(3.0))])[None]
    detail = whole[:, :, :2, :2]
    loss = seg_loss([Prediction(whole, 0.9), Prediction(detail, 0.1, (0, 2, 0, 2))], label, weight)
    ce0, ce1 = -math.log(0.25), -math.log(0.75)
    whole_ce = (3 * ce1 + 12 * ce0) / 16  # one class-1 pixel has weight 0
    detail_ce = 3 * ce1 / 4
    assert loss.item() == pytest.approx(0.9 * whole_ce + 0.1 * detail_ce, rel=1e-6)


def test_downscale_label_ratio_by_hand() -> None:
    out = downscale_label_ratio(hand_label(), scale=2, min_ratio=0.75, num_classes=19)
    assert out.dtype == torch.int64
    # (1,0): car has 2/4 = 0.5 < 0.75 -> ignore; (1,1): the ignore channel wins -> ignore;
    # (0,1): person 3/4 = 0.75 is not below the threshold -> person
    assert out.tolist() == [[[13, 11], [255, 255]]]
    relaxed = downscale_label_ratio(hand_label(), scale=2, min_ratio=0.5, num_classes=19)
    assert relaxed.tolist() == [[[13, 11], [13, 255]]]
    with pytest.raises(ValueError, match="label values"):
        downscale_label_ratio(torch.full((1, 4, 4), 19), 2, 0.75, num_classes=19)


def test_feature_distance_by_hand_with_gradient() -> None:
    f_s = torch.full((1, 2, 2, 2), 100.0)
    f_s[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # car cell: |.| = 5
    f_s[0, :, 0, 1] = torch.tensor([6.0, 8.0])  # person cell: |.| = 10
    f_s.requires_grad_(True)
    f_i = torch.zeros(1, 2, 2, 2, requires_grad=True)
    fd = feature_distance(f_s, f_i, hand_label(), THING_CLASSES, min_ratio=0.75)
    assert fd.item() == pytest.approx(7.5)  # mean over the 2 thing cells; ignore cells excluded
    fd.backward()
    torch.testing.assert_close(f_s.grad[0, :, 0, 0], torch.tensor([0.3, 0.4]))  # (1/2) · (3, 4)/5
    assert f_s.grad[0, :, 1].abs().sum() == 0
    assert f_i.grad is None  # the ImageNet features are a constant
    stuff_only = feature_distance(f_s, f_i, hand_label(), thing_classes=(11,), min_ratio=0.75)
    assert stuff_only.item() == pytest.approx(10.0)


def test_feature_distance_empty_mask_is_a_connected_zero() -> None:
    f_s = torch.randn(2, 8, 4, 4, requires_grad=True)
    label = torch.zeros(2, 16, 16, dtype=torch.long)  # road only: no thing class anywhere
    fd = feature_distance(f_s, torch.randn(2, 8, 4, 4), label, THING_CLASSES)
    assert fd.item() == 0.0 and fd.requires_grad
    fd.backward()
    assert f_s.grad is not None and torch.isfinite(f_s.grad).all() and f_s.grad.abs().sum() == 0
    with pytest.raises(ValueError, match="same shape"):
        feature_distance(f_s, torch.randn(2, 8, 2, 2), label, THING_CLASSES)
