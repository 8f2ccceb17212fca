"""DAFormer's thing-class ImageNet feature distance (FD); docs/method.md §4.8.

The student's last-stage features of the clean source crop are pulled towards those of a frozen
copy of the ImageNet-initialised backbone, on cells whose downscaled label is a thing class.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ssr.data.labels import NUM_CLASSES, THING_CLASSES
from ssr.errors import UserError
from ssr.uda.losses import feature_distance


class FeatureDistanceConfigError(UserError, ValueError):
    """FD asked for without ImageNet weights to preserve."""


class FeatureDistance(nn.Module):
    """λ_FD · FD between the student and a frozen ImageNet copy (config node `uda.fd`, a Hydra
    partial: the UDA module passes the student's backbone, copied before the first step).

    Args:
        backbone: the student's backbone, ImageNet-initialised (`pretrained_path` set).
        weight: λ_FD (0.005).
        classes: train ids whose cells count (the thing classes).
        min_ratio: a downscaled label cell keeps its majority class only above this fraction.
    """

    def __init__(
        self,
        backbone: nn.Module,
        weight: float = 0.005,
        classes: Sequence[int] = THING_CLASSES,
        min_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        if getattr(backbone, "pretrained_path", None) is None:
            raise FeatureDistanceConfigError(
                "ImageNet feature distance needs an ImageNet-initialised backbone "
                "(model.backbone.pretrained=<mit_bX.pth>); set uda.fd=null to train without FD"
            )
        self.weight = weight
        self.classes = list(classes)
        self.num_classes = NUM_CLASSES  # the label's classes; the module sets the data's
        self.min_ratio = min_ratio
        self.imnet_backbone = copy.deepcopy(backbone).eval()
        self.imnet_backbone.requires_grad_(False)

    def train(self, mode: bool = True) -> FeatureDistance:
        """The ImageNet copy stays in eval mode whatever the parent does (§4.3)."""
        super().train(mode)
        self.imnet_backbone.eval()
        return self

    def forward(self, student_feat: Tensor, image: Tensor, label: Tensor) -> Tensor:
        """FD (unweighted) of the student's last-stage map (B, C, h, w) of `image` (B, 3, H, W)."""
        with torch.no_grad():
            imnet_feat = self.imnet_backbone(image)[-1]
        return feature_distance(
            student_feat,
            imnet_feat,
            label,
            self.classes,
            min_ratio=self.min_ratio,
            num_classes=self.num_classes,
        )
