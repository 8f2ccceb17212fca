"""Paired image/label pipelines of the DAFormer/MIC data flow, built on albumentations.

Training (docs/method.md §4.1): keep-ratio resize with mmcv's rounding -> random crop with
``cat_max_ratio`` -> horizontal flip 0.5 -> normalise -> pad (image 0 after normalisation,
label 255) -> tensors. Test (§3.2): keep-ratio resize of the image only -> normalise -> tensors;
the label stays at full resolution because the metric is computed there.

Every transform takes ``image`` (H, W, 3) uint8 RGB and ``mask`` (H, W) uint8 train ids. Image and
label are processed *independently* where mmseg does so (resize, flip, pad), so the few GTA5 pairs
whose image and label sizes differ behave as in the reference (§7.5).
"""

from __future__ import annotations

from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from ssr.data.labels import IGNORE_INDEX, MEAN, STD
from ssr.data.scaling import keep_ratio_resize
from ssr.errors import ConfigError, ints_setting


def pseudo_margins_setting(value: Any, name: str) -> tuple[int, int, int, int] | None:
    """None (no mask) or four integers >= 0 [top, bottom, left, right] (see `margin_mask`)."""
    if value is None:
        return None
    top, bottom, left, right = ints_setting(value, name, 4, 0, ": [top, bottom, left, right]")
    return top, bottom, left, right


def margin_mask(height: int, width: int, margins: tuple[int, int, int, int]) -> np.ndarray:
    """HRDA's valid-pseudo-label mask of a full image: uint8 1, 0 in the [top, bottom, left, right]
    margins (official HRDA ``mmseg/datasets/cityscapes.py``, ``crop_pseudo_margins``).

    Built before the training pipeline, so it is resized (nearest), cropped and flipped with the
    image: a crop at the periphery of the image loses those pixels' pseudo-labels, one inside
    keeps them.
    """
    top, bottom, left, right = margins
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[top : height - bottom, left : width - right] = 1
    return mask


class KeepRatioResize(A.DualTransform):
    """mmseg ``Resize(img_scale=scale, keep_ratio=True)``: image bilinear, label nearest.

    Each target is rescaled from its *own* size, as mmseg does; with ``resize_mask=False`` (test
    pipeline) the label is left at full resolution.
    """

    def __init__(self, scale: tuple[int, int], resize_mask: bool = True, p: float = 1.0):
        super().__init__(p=p)
        if len(scale) != 2 or min(scale) <= 0:
            raise ConfigError(f"resize scale must be two positive ints (long, short), got {scale}")
        self.scale = (int(scale[0]), int(scale[1]))
        self.resize_mask = resize_mask

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return keep_ratio_resize(img, self.scale, cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, **params: Any) -> np.ndarray:
        if not self.resize_mask:
            return mask
        return keep_ratio_resize(mask, self.scale, cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scale", "resize_mask")


class CatMaxRandomCrop(A.DualTransform):
    """mmseg ``RandomCrop(crop_size, cat_max_ratio)`` (§4.1 step 3).

    The box is drawn uniformly from the image size (offsets 0..max(side - crop, 0)). With
    ``cat_max_ratio < 1`` the box is redrawn up to ``max_tries`` times while its label has fewer
    than two non-ignore classes or its most frequent class covers >= ``cat_max_ratio`` of the
    non-ignore pixels; the box drawn after the last failed check is used unchecked. A crop larger
    than the image yields the whole image (padding comes later, after normalisation).
    """

    def __init__(
        self,
        height: int,
        width: int,
        cat_max_ratio: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        max_tries: int = 10,
        p: float = 1.0,
    ):
        super().__init__(p=p)
        if height <= 0 or width <= 0:
            raise ConfigError(f"crop size must be positive, got {(height, width)}")
        if not 0.0 < cat_max_ratio <= 1.0:
            raise ConfigError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
        self.height, self.width = height, width
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self.max_tries = max_tries

    def _draw_box(self, img_h: int, img_w: int) -> tuple[int, int, int, int]:
        top = int(self.random_generator.integers(0, max(img_h - self.height, 0) + 1))
        left = int(self.random_generator.integers(0, max(img_w - self.width, 0) + 1))
        return top, top + self.height, left, left + self.width

    def _acceptable(self, mask: np.ndarray, box: tuple[int, int, int, int]) -> bool:
        y1, y2, x1, x2 = box
        counts = np.bincount(mask[y1:y2, x1:x2].ravel(), minlength=256)
        counts[self.ignore_index] = 0
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def get_params_dependent_on_data(
        self, params: dict[str, Any], data: dict[str, Any]
    ) -> dict[str, Any]:
        img_h, img_w = params["shape"][:2]
        box = self._draw_box(img_h, img_w)
        mask = data.get("mask")
        if self.cat_max_ratio < 1.0 and mask is not None:
            for _ in range(self.max_tries):
                if self._acceptable(mask, box):
                    break
                box = self._draw_box(img_h, img_w)
        return {"crop_box": box}

    def apply(self, img: np.ndarray, crop_box: tuple[int, int, int, int], **params: Any):
        y1, y2, x1, x2 = crop_box
        return img[y1:y2, x1:x2]

    def apply_to_mask(self, mask: np.ndarray, crop_box: tuple[int, int, int, int], **params: Any):
        y1, y2, x1, x2 = crop_box
        return mask[y1:y2, x1:x2]

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "cat_max_ratio", "ignore_index", "max_tries")


class PadBottomRight(A.DualTransform):
    """mmseg ``Pad(size)``: pad image (with 0) and label (with 255) at the bottom/right.

    It runs after normalisation, so the image pad value 0 is the mean colour, as in mmseg. Each
    target is padded from its own size, which re-aligns a label whose size differed (§7.5).
    """

    def __init__(self, height: int, width: int, img_fill: float = 0.0, mask_fill: int = 255):
        super().__init__(p=1.0)
        self.height, self.width = height, width
        self.img_fill, self.mask_fill = img_fill, mask_fill

    def _pad(self, arr: np.ndarray, fill: float) -> np.ndarray:
        pad_h, pad_w = max(self.height - arr.shape[0], 0), max(self.width - arr.shape[1], 0)
        if pad_h == 0 and pad_w == 0:
            return arr
        widths = ((0, pad_h), (0, pad_w)) + ((0, 0),) * (arr.ndim - 2)
        return np.pad(arr, widths, mode="constant", constant_values=fill)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return self._pad(img, self.img_fill)

    def apply_to_mask(self, mask: np.ndarray, **params: Any) -> np.ndarray:
        return self._pad(mask, self.mask_fill)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "img_fill", "mask_fill")


def _normalize() -> A.Normalize:
    # MEAN/STD are on the 0-255 scale, so no division by max_pixel_value.
    return A.Normalize(mean=MEAN, std=STD, max_pixel_value=1.0, p=1.0)


def train_transform(
    resize: tuple[int, int], crop_size: tuple[int, int], cat_max_ratio: float = 1.0
) -> A.Compose:
    """The §4.1 training pipeline; ``crop_size`` is (height, width), ``resize`` (long, short)."""
    crop_h, crop_w = crop_size
    return A.Compose(
        [
            KeepRatioResize(resize),
            CatMaxRandomCrop(crop_h, crop_w, cat_max_ratio=cat_max_ratio),
            A.HorizontalFlip(p=0.5),
            _normalize(),
            PadBottomRight(crop_h, crop_w, img_fill=0.0, mask_fill=IGNORE_INDEX),
            ToTensorV2(),
        ],
        is_check_shapes=False,  # GTA5 image/label sizes may differ; handled per target (§7.5)
    )


def source_train_transform(
    resize: tuple[int, int] = (1280, 720),
    crop_size: tuple[int, int] = (512, 512),
    cat_max_ratio: float = 0.75,
) -> A.Compose:
    """GTA5 pipeline: resize to fit (1280, 720) -> 1280x704, 512x512 crop with cat_max_ratio."""
    return train_transform(resize, crop_size, cat_max_ratio)


def target_train_transform(
    resize: tuple[int, int] = (1024, 512), crop_size: tuple[int, int] = (512, 512)
) -> A.Compose:
    """Cityscapes pipeline: 1024x512, plain random crop (cat_max_ratio would leak target GT)."""
    return train_transform(resize, crop_size, cat_max_ratio=1.0)


def test_transform(resize: tuple[int, int] | None = (1024, 512)) -> A.Compose:
    """§3.2: keep-ratio resize of the image (None: keep its size), normalise; label untouched."""
    steps: list[A.BasicTransform] = []
    if resize is not None:
        steps.append(KeepRatioResize(resize, resize_mask=False))
    steps += [_normalize(), ToTensorV2()]
    return A.Compose(steps, is_check_shapes=False)


test_transform.__test__ = False  # type: ignore[attr-defined]  # not a pytest test despite its name
