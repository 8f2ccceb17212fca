"""Reading one dataset file: an image, a train-id label, an image's size from its header.

Kept free of torch and the model, so ``ssr.data.prepare``'s worker processes start quickly.
Images are read with OpenCV (BGR -> RGB uint8), labels with Pillow unchanged (train ids, 255 =
ignore), as in mmseg (docs/method.md §4.1 step 1). Every problem raises ``DatasetError`` with one
line naming the path and the fix.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from ssr.data.labels import IGNORE_INDEX, NUM_CLASSES
from ssr.errors import UserError


class DatasetError(UserError, RuntimeError):
    """A dataset folder or file that cannot be used; the message names the path and the fix."""


def read_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB image; raises DatasetError for a missing or undecodable file.

    OpenCV refuses a truncated PNG but decodes a truncated JPEG with a grey lower part, so a JPEG
    must end with its end-of-image marker (looked for in the file's last kilobyte).
    """
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None or (Path(path).suffix.lower() in JPEG_SUFFIXES and not _jpeg_complete(path)):
        raise DatasetError(
            f"cannot read image {path} (missing, truncated or not an image); "
            "restore it from the dataset archive or delete it"
        )
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


JPEG_SUFFIXES = (".jpg", ".jpeg")


def _jpeg_complete(path: Path) -> bool:
    """Whether the JPEG's end-of-image marker FF D9 is there (entropy-coded data never holds
    it: 0xFF bytes in it are stuffed); trailing padding after it is allowed."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(f.tell() - 1024, 0))
        return b"\xff\xd9" in f.read()


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image from its header alone (a cheap start-up check)."""
    try:
        with Image.open(path) as im:
            return im.height, im.width
    except (OSError, UnidentifiedImageError) as err:
        raise DatasetError(f"cannot read image {path} ({type(err).__name__}); restore it") from err


def read_label(path: Path, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """(H, W) uint8 train-id label read unchanged; rejects files that are not train-id maps."""
    try:
        with Image.open(path) as im:
            label = np.array(im)  # a writable copy (torch warns on read-only arrays)
    except (OSError, UnidentifiedImageError) as err:
        raise DatasetError(
            f"cannot read label {path} ({err.__class__.__name__}); "
            "re-run the preparation CLI (python -m ssr.data.prepare) to rewrite it"
        ) from err
    if label.ndim != 2 or label.dtype != np.uint8:
        raise DatasetError(
            f"label {path} is not a single-channel 8-bit train-id PNG (shape {label.shape}, "
            f"{label.dtype}); write it with python -m ssr.data.prepare"
        )
    value = non_train_id(label, num_classes)
    if value is not None:
        raise DatasetError(
            f"label {path} holds value {value}, not a train id "
            f"(0..{num_classes - 1} or 255); "
            "was it converted from label ids? re-run python -m ssr.data.prepare"
        )
    return label


def non_train_id(array: np.ndarray, num_classes: int = NUM_CLASSES) -> int | None:
    """The first value of ``array`` that is neither a train id (0..num_classes-1) nor ignore."""
    bad = (array >= num_classes) & (array != IGNORE_INDEX)
    return int(array[bad][0]) if bad.any() else None
