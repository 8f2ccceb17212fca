"""Encoder-decoder segmentor and the interface the UDA loop trains it through; docs/method.md §3.

This is the only network that ships: training-only machinery (teacher, SAM regulariser, feature
distance) lives on the UDA module, so `Segmentor.state_dict()` holds only `backbone.*` and
`decode_head.*`.

The UDA loop never calls the backbone or the head directly. A training forward is
`views = train_views(x)`, `feats = [features(v.image) for v in views]`,
`predictions = decode_train(feats, views)`: each view is one image the backbone sees and the part of
the crop it shows, each prediction one supervised output with its loss weight and label region.
For this segmentor that is one view (the crop) and one prediction. The multi-resolution
`ssr.model.hrda.HRDASegmentor` (a downscaled context view and a full-resolution detail crop, fused
by a scale-attention head) returns two views and two predictions (fused 0.9, detail 0.1) through
the same methods, so the teacher, FD, MIC and SSR work with either. `forward(x)` returns logits
at the size of `x`: the teacher's pseudo-label pass and the window model of
`ssr.model.inference.Inference`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

Box = tuple[int, int, int, int]  # (y1, y2, x1, x2) in pixels of the training crop


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize with align_corners=False (mmseg's convention everywhere in §2-§3)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class View(NamedTuple):
    """One image the backbone sees in a training forward, and the region of the crop it shows."""

    image: Tensor  # (B, 3, h, w) normalised
    box: Box | None = None  # None: the whole crop


class Prediction(NamedTuple):
    """One supervised output of a training forward: logits, their loss weight, their region."""

    logits: Tensor  # (B, K, h', w'), resized to the label region by the loss
    weight: float = 1.0
    box: Box | None = None  # the label region it predicts; None: the whole crop


class Segmentor(nn.Module):
    """Backbone + decode head. Input images are mmseg-normalised (B, 3, H, W) tensors.

    Args:
        backbone: a MiT (anything with `embed_dims` returning one map per stage).
        decode_head: the head, or a callable that builds it from `in_channels` (the backbone's
            `embed_dims`; a Hydra `_partial_` node), so the channels are never restated.
    """

    def __init__(
        self, backbone: nn.Module, decode_head: nn.Module | Callable[..., nn.Module]
    ) -> None:
        super().__init__()
        self.backbone = backbone
        if not isinstance(decode_head, nn.Module):
            decode_head = decode_head(in_channels=list(backbone.embed_dims))
        self.decode_head = decode_head
        self.num_classes: int = decode_head.num_classes

    def features(self, x: Tensor) -> list[Tensor]:
        """The backbone's stage maps (strides 4, 8, 16, 32), also used by FD and SSR."""
        return self.backbone(x)

    def decode(self, feats: list[Tensor]) -> Tensor:
        """Stage maps -> logits (B, K, H/4, W/4)."""
        return self.decode_head(feats)

    def forward(self, x: Tensor) -> Tensor:
        """Logits resized to the input size (mmseg's `encode_decode`): (B, K, H, W)."""
        return resize(self.decode(self.features(x)), x.shape[-2:])

    def train_views(self, x: Tensor, rng: np.random.Generator | None = None) -> list[View]:
        """The images of one training forward: here the crop itself (`rng`: for segmentors that
        draw random views, unused here)."""
        return [View(x)]

    def decode_train(
        self, feats: Sequence[list[Tensor]], views: Sequence[View]
    ) -> list[Prediction]:
        """The supervised outputs of one training forward: here the logits of the one view."""
        return [Prediction(self.decode(feats[0]))]
