"""HRDA: a multi-resolution segmentor with a learned scale attention; docs/hrda.md §2-§3.

HRDA (Hoyer, Dai, Van Gool, ECCV 2022) trains on 1024² crops through two 512² views of each crop,
both through the same MiT and the same DAFormer head in separate calls: the *context* view (the
whole crop downscaled ×0.5) and the *detail* view (a 512² window of the crop at full resolution,
one random box per batch). A second, SegFormer-style head on the context features predicts a
class-wise sigmoid attention that blends the two predictions:

    fused = Up2(a)·HR_placed + Up2((1 − a)·LR),   a = sigmoid(att(F_LR)) · 1[box]

Inference (the teacher's pseudo-labels and each test window) replaces the detail crop by
overlapping 512² windows covering the whole input. Module names give the official checkpoint keys
(`decode_head.head.*`, `decode_head.scale_attention.*`, docs/hrda.md §7). Reference quirks are
reproduced by default; `full_box_range` and `exact_box_attention` switch to the cleaner behaviour
(docs/hrda.md §9).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssr.errors import ConfigError, pair_setting
from ssr.model.inference import slide_windows
from ssr.model.segmentor import Box, Prediction, View, resize

HeadBuilder = nn.Module | Callable[..., nn.Module]


def down2(x: Tensor) -> Tensor:
    """The context view: bilinear ×0.5, align_corners=False, no anti-aliasing (a 2×2 mean on even
    sizes), as the reference's `resize(scale_factor=0.5)`."""
    return F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)


def draw_box(
    size: Sequence[int],
    crop: Sequence[int],
    divisible: int,
    rng: np.random.Generator | None = None,
    full_range: bool = False,
) -> Box:
    """A random (y1, y2, x1, x2) detail box of `crop` pixels in an image of `size` (docs/hrda.md
    §2.2): each offset is `divisible`·U{0, …, (m + 1)//divisible − 1} with m = size − crop, so
    with 1024/512/8 the offsets are 0..504 and the last 8 rows/columns never enter the box (the
    reference's range). `full_range` draws from 0..m instead. `rng` None: NumPy's global
    generator, as the reference (seeded by the run's seed)."""
    offsets = []
    for length, c in zip(size, crop, strict=True):
        margin = int(length) - int(c)
        if margin < 0:
            raise ValueError(f"detail crop {list(crop)} is larger than the image {list(size)}")
        high = margin // divisible + 1 if full_range else (margin + 1) // divisible
        draw = rng.integers(0, max(high, 1)) if rng is not None else np.random.randint(max(high, 1))
        offsets.append(int(draw) * divisible)
    (y1, x1), (ch, cw) = offsets, crop
    return y1, y1 + int(ch), x1, x1 + int(cw)


class HRDAHead(nn.Module):
    """The DAFormer head (`head`) and the scale-attention head (`scale_attention`) with HRDA's
    fusion (docs/hrda.md §3.2). Owns no parameters of its own."""

    def __init__(self, head: nn.Module, scale_attention: nn.Module) -> None:
        super().__init__()
        self.head = head
        self.scale_attention = scale_attention
        self.num_classes: int = head.num_classes

    def attention(self, lr_feats: list[Tensor]) -> Tensor:
        """Class-wise (or one-channel) sigmoid attention at LR-logit resolution."""
        return torch.sigmoid(self.scale_attention(lr_feats))

    @staticmethod
    def fuse(lr: Tensor, hr: Tensor, att: Tensor) -> Tensor:
        """Up2(a)·HR + Up2((1 − a)·LR), the product before the upsampling (§3.2 steps 5-8).
        `hr` is already at the fused resolution (placed in the box, or the window canvas)."""
        size = hr.shape[-2:]
        return resize(att, size) * hr + resize((1 - att) * lr, size)


class HRDASegmentor(nn.Module):
    """Shared MiT + `HRDAHead`; `forward(x)` is HRDA's full inference on one window.

    Args:
        backbone: a MiT (`embed_dims` per stage).
        decode_head / scale_attention: the DAFormer head and the attention head (modules, or Hydra
            partials that receive `in_channels` = the backbone's `embed_dims`).
        hr_crop_size: (h, w) of the detail view in crop pixels (512²).
        crop_coord_divisible: detail-box offsets are multiples of it (8 = output stride 4 × 2).
        hr_loss_weight: weight of the detail-crop loss; the fused loss gets 1 − it (0.9 / 0.1).
        hr_slide_stride: step of the overlapping detail windows at inference (hr crop / 2).
        test_crop_size / test_stride: the outer sliding window of the test protocol (1024², 512):
            `test_protocol` hands them to `ssr.model.inference.Inference`.
        full_box_range: deviation: detail-box offsets over the whole range 0..m (the reference
            never reaches the last `crop_coord_divisible` rows/columns).
        exact_box_attention: deviation: mask the attention after upsampling, so no fused pixel
            outside the box is shrunk by the bilinear ring of the masked attention.
    """

    def __init__(
        self,
        backbone: nn.Module,
        decode_head: HeadBuilder,
        scale_attention: HeadBuilder,
        hr_crop_size: Sequence[int] = (512, 512),
        crop_coord_divisible: int = 8,
        hr_loss_weight: float = 0.1,
        hr_slide_stride: Sequence[int] = (256, 256),
        test_crop_size: Sequence[int] = (1024, 1024),
        test_stride: Sequence[int] = (512, 512),
        full_box_range: bool = False,
        exact_box_attention: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= hr_loss_weight < 1.0:
            raise ConfigError(f"model.hr_loss_weight={hr_loss_weight} must be in [0, 1)")
        if crop_coord_divisible < 1 or crop_coord_divisible % 2:
            raise ConfigError(
                f"model.crop_coord_divisible={crop_coord_divisible} must be a positive even "
                "number (the box maps to whole logit cells of both views)"
            )
        self.backbone = backbone
        channels = list(backbone.embed_dims)
        head = (
            decode_head(in_channels=channels)
            if not isinstance(decode_head, nn.Module)
            else decode_head
        )
        att = (
            scale_attention(in_channels=channels)
            if not isinstance(scale_attention, nn.Module)
            else scale_attention
        )
        if att.num_classes not in (1, head.num_classes):
            raise ConfigError(
                f"model.scale_attention.num_classes={att.num_classes}: use {head.num_classes} "
                "(class-wise attention, the paper's) or 1"
            )
        self.decode_head = HRDAHead(head, att)
        self.num_classes: int = head.num_classes
        self.hr_crop_size = pair_setting(hr_crop_size, "model.hr_crop_size")
        self.hr_slide_stride = pair_setting(hr_slide_stride, "model.hr_slide_stride")
        self.test_crop_size = pair_setting(test_crop_size, "model.test_crop_size")
        self.test_stride = pair_setting(test_stride, "model.test_stride")
        self.divisible = crop_coord_divisible
        self.hr_loss_weight = hr_loss_weight
        self.full_box_range = full_box_range
        self.exact_box_attention = exact_box_attention

    @property
    def test_protocol(self) -> dict[str, Any]:
        """HRDA's test protocol (docs/hrda.md §2.4): no resize, sliding windows of the training
        crop. `Inference.for_model` applies it whenever this segmentor is evaluated."""
        return {
            "mode": "slide",
            "resize": None,
            "crop_size": self.test_crop_size,
            "stride": self.test_stride,
        }

    def features(self, x: Tensor) -> list[Tensor]:
        """The backbone's stage maps of one view (FD reads the context view's last one)."""
        return self.backbone(x)

    # ------------------------------------------------------------------ training
    def train_views(self, x: Tensor, rng: np.random.Generator | None = None) -> list[View]:
        """[context view (crop ×0.5), detail view (a random box of the crop at scale 1)]: one box
        for the whole batch, drawn at every call (docs/hrda.md §2.2)."""
        box = draw_box(
            x.shape[-2:], self.hr_crop_size, self.divisible, rng, full_range=self.full_box_range
        )
        y1, y2, x1, x2 = box
        return [View(down2(x)), View(x[:, :, y1:y2, x1:x2], box)]

    def decode_train(
        self, feats: Sequence[list[Tensor]], views: Sequence[View]
    ) -> list[Prediction]:
        """[fused (weight 0.9, the whole crop), detail (0.1, its box)] (docs/hrda.md §3.2-§3.3).

        Head calls in the reference's order (LR, HR, attention), each view a separate call so
        that BatchNorm normalises each with its own batch statistics.
        """
        lr_feats, hr_feats = feats
        box = views[1].box
        assert box is not None, "the detail view carries its box"
        head = self.decode_head
        lr = head.head(lr_feats)  # (B, K, H/8, W/8) of the crop
        hr = head.head(hr_feats)  # (B, K, h/4, w/4) of the box
        att = head.attention(lr_feats)
        fused_size = (2 * lr.shape[-2], 2 * lr.shape[-1])  # stride 4 of the crop
        if self.exact_box_attention:
            up_att = resize(att, fused_size) * _box_mask(att, fused_size, box, 4)
            placed = _place(hr, fused_size, box, 4)
            fused = up_att * placed + (1 - up_att) * resize(lr, fused_size)
        else:
            att = att * _box_mask(att, lr.shape[-2:], box, 2 * 4)  # LR logits: stride 8
            fused = head.fuse(lr, _place(hr, fused_size, box, 4), att)
        return [
            Prediction(fused, 1.0 - self.hr_loss_weight),
            Prediction(hr, self.hr_loss_weight, box),
        ]

    # ------------------------------------------------------------------ inference
    def forward(self, x: Tensor) -> Tensor:
        """HRDA's `encode_decode` (docs/hrda.md §2.3): the context view plus overlapping detail
        windows (all windows in one backbone and one head call), fused without a box mask;
        logits (B, K, H, W) at the input size. Inputs whose sides are not multiples of 8 are
        padded at the bottom/right and the logits cut back (the reference never sees them)."""
        h, w = x.shape[-2:]
        ph, pw = -h % self.divisible, -w % self.divisible
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        lr_feats = self.features(down2(x))
        lr = self.decode_head.head(lr_feats)
        hr = self._slide_hr(x)
        att = self.decode_head.attention(lr_feats)
        fused = self.decode_head.fuse(lr, hr, att)
        return resize(fused, x.shape[-2:])[..., :h, :w]

    def _slide_hr(self, x: Tensor) -> Tensor:
        """Averaged detail logits (B, K, H/4, W/4) of overlapping `hr_crop_size` windows, all in
        one backbone and one head call, window-major as in the reference."""
        return slide_windows(
            lambda crops: self.decode_head.head(self.features(crops)),
            x,
            self.hr_crop_size,
            self.hr_slide_stride,
            out_stride=4,
        )


def _box_mask(like: Tensor, size: Sequence[int], box: Box, stride: int) -> Tensor:
    """(1, 1, *size) mask, 1 on the box's cells at `stride` pixels per cell."""
    y1, y2, x1, x2 = box
    mask = like.new_zeros((1, 1, *size))
    mask[:, :, y1 // stride : y2 // stride, x1 // stride : x2 // stride] = 1
    return mask


def _place(hr: Tensor, size: Sequence[int], box: Box, stride: int) -> Tensor:
    """The detail logits written into a zero canvas of the fused size at the box."""
    y1, y2, x1, x2 = box
    placed = hr.new_zeros((*hr.shape[:2], *size))
    placed[:, :, y1 // stride : y2 // stride, x1 // stride : x2 // stride] = hr
    return placed
