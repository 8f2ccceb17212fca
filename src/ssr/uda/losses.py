"""Training losses: mmseg-0.16 weighted cross-entropy (docs/method.md §2.4), the loss of a
segmentor's training predictions, and DAFormer's ImageNet feature distance on things (§4.8)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ssr.data.labels import IGNORE_INDEX, NUM_CLASSES
from ssr.model.segmentor import Box, Prediction
from ssr.uda.transfer import to_device


def _as_bhw(label: Tensor) -> Tensor:
    if label.dim() == 4 and label.shape[1] == 1:
        return label[:, 0]
    if label.dim() != 3:
        raise ValueError(f"label must be (B, H, W) or (B, 1, H, W), got {tuple(label.shape)}")
    return label


def weighted_ce(
    logits: Tensor,
    label: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Per-pixel cross-entropy times `weight`, averaged over **all** B·H·W label pixels (§2.4).

    Logits (B, K, h, w) are resized bilinearly (align_corners=False) to the label size. Ignored
    pixels contribute 0 but still count in the denominator (mmseg 0.16), unlike PyTorch's
    `reduction="mean"`, which divides by the non-ignored count.

    Args:
        label: (B, H, W) int64 train ids, `ignore_index` = ignore.
        weight: (B, H, W) per-pixel weight (pseudo-label confidence); None = 1.
    """
    label = _as_bhw(label)
    if logits.shape[-2:] != label.shape[-2:]:
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
    loss = F.cross_entropy(logits, label, ignore_index=ignore_index, reduction="none")
    if weight is not None:
        loss = loss * weight
    return loss.mean()


def seg_loss(
    predictions: Sequence[Prediction],
    label: Tensor,
    weight: Tensor | None = None,
    scale: float = 1.0,
) -> Tensor:
    """Σ_k w_k · CE(logits_k, label and weight inside box_k) over a training forward's outputs.

    One prediction of weight 1 over the whole crop (DAFormer) is exactly `weighted_ce`; a
    multi-resolution segmentor adds weighted terms on sub-regions of the crop. `scale` multiplies
    the whole-crop terms only: MIC's λ scales HRDA's fused loss, not its detail loss (the
    reference's `mask_lambda`, docs/hrda.md §5); with one prediction it scales the loss.
    """
    total: Tensor | None = None
    for p in predictions:
        term = weighted_ce(p.logits, _crop(label, p.box), _crop(weight, p.box))
        if p.weight != 1.0:
            term = p.weight * term
        if scale != 1.0 and p.box is None:
            term = scale * term
        total = term if total is None else total + term
    if total is None:
        raise ValueError("seg_loss needs at least one prediction")
    return total


def _crop(x: Tensor | None, box: Box | None) -> Tensor | None:
    if x is None or box is None:
        return x
    y1, y2, x1, x2 = box
    return x[..., y1:y2, x1:x2]


def downscale_label_ratio(
    label: Tensor,
    scale: int,
    min_ratio: float,
    num_classes: int = NUM_CLASSES,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Majority label of each `scale`×`scale` cell, (B, H/scale, W/scale) int64 (§4.8 step 2).

    Ignore gets its own one-hot channel; a cell is `ignore_index` if that channel wins or if the
    winning class covers less than `min_ratio` of the cell.
    """
    label = _as_bhw(label)
    if scale < 1:
        raise ValueError(
            f"label downscale factor {scale} must be >= 1 (label smaller than features?)"
        )
    bad = (label < 0) | ((label >= num_classes) & (label != ignore_index))
    if bool(bad.any()):
        raise ValueError(
            f"label values must be in [0, {num_classes}) or {ignore_index}; found "
            f"{label[bad].unique().tolist()[:5]}"
        )
    extra = num_classes  # the one-hot channel standing for ignore
    one_hot = F.one_hot(torch.where(label == ignore_index, extra, label), num_classes + 1)
    ratios = F.avg_pool2d(one_hot.permute(0, 3, 1, 2).float(), kernel_size=scale)  # (B, K+1, h, w)
    ratio, cls = ratios.max(dim=1)
    return torch.where((cls == extra) | (ratio < min_ratio), ignore_index, cls)


def feature_distance(
    f_student: Tensor,
    f_imnet: Tensor,
    label: Tensor,
    thing_classes: Sequence[int],
    min_ratio: float = 0.75,
    num_classes: int = NUM_CLASSES,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Mean L2 distance (over channels) between student and ImageNet features on thing cells (§4.8).

    The label (B, H, W) is downscaled to the feature grid with `downscale_label_ratio` (factor
    W // w); only cells whose label is in `thing_classes` count. `f_imnet` is treated as a constant.
    With no thing cell the result is a zero that is still connected to the student's graph (the
    reference's mean over an empty set would be NaN).

    Args:
        f_student, f_imnet: stage features (B, C, h, w) of the student and the ImageNet model.
    """
    if f_student.shape != f_imnet.shape:
        raise ValueError(
            f"student features {tuple(f_student.shape)} and ImageNet features "
            f"{tuple(f_imnet.shape)} must have the same shape"
        )
    scale = label.shape[-1] // f_student.shape[-1]
    cells = downscale_label_ratio(label, scale, min_ratio, num_classes, ignore_index)
    if cells.shape[-2:] != f_student.shape[-2:]:
        raise ValueError(
            f"label {tuple(label.shape[-2:])} does not downscale by {scale} to the feature grid "
            f"{tuple(f_student.shape[-2:])}; the label size must be a multiple of it"
        )
    things = to_device(torch.as_tensor(list(thing_classes), dtype=cells.dtype), cells.device)
    dist = torch.linalg.vector_norm(f_student - f_imnet.detach(), dim=1)  # (B, h, w)
    mask = torch.isin(cells, things).to(dist.dtype)
    return (dist * mask).sum() / mask.sum().clamp(min=1.0)
