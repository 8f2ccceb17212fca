"""mmcv's keep-ratio rescaling, shared by the training pipeline and pre-resized copies (torch-free,
so `ssr.data.prepare`'s workers start quickly)."""

from __future__ import annotations

import cv2
import numpy as np


def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """(new_height, new_width) of mmcv's keep-ratio ``imrescale`` for a (long, short) ``scale``.

    The factor fits the long side into max(scale) and the short side into min(scale); each side
    is then rounded half up, e.g. GTA5 1914x1052 with (1280, 720) -> 1280x704 (§4.1 step 2).
    """
    long_target, short_target = max(scale), min(scale)
    factor = min(long_target / max(height, width), short_target / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def keep_ratio_resize(arr: np.ndarray, scale: tuple[int, int], interpolation: int) -> np.ndarray:
    """``arr`` rescaled by `rescale_size` (OpenCV, the given interpolation); unchanged when it
    already has that size, so resizing a resized array again is the identity."""
    height, width = rescale_size(arr.shape[0], arr.shape[1], scale)
    if (height, width) == arr.shape[:2]:
        return arr
    return cv2.resize(arr, (width, height), interpolation=interpolation)
