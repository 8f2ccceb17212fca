"""Decoding raw label files into train ids, one routine per `RawLabels.encoding`.

``index``: palette or grayscale 8-bit PNGs read by index (GTA5's palette PNGs must never be read
by colour, docs/method.md §7.2). ``channel16``: 16-bit 3-channel PNGs (SYNTHIA): Pillow opens them
as 8-bit RGB keeping each value's high byte — class ids below 256 all read as 0, silently wrong —
so OpenCV reads them unchanged, and the class channel is taken by name (R = index 2 of OpenCV's
BGR array). ``color``: colour-coded RGB labels,
each colour looked up in the format's ``color_map``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from ssr.data.formats import RawLabels
from ssr.data.labels import IGNORE_INDEX
from ssr.errors import UserError


class RawLabelError(UserError, RuntimeError):
    """A raw label that cannot be converted; the message names the file and the fix."""


def decode(path: Path, raw: RawLabels) -> np.ndarray:
    """(H, W) uint8 train ids of the raw label at ``path`` (unmapped ids -> 255)."""
    if raw.encoding == "index":
        return _map_ids(read_index_png(path), raw, path)
    if raw.encoding == "channel16":
        return _map_ids(read_channel16(path, raw.channel_index), raw, path)
    return _map_colors(path, raw)


def read_index_png(path: Path) -> np.ndarray:
    """(H, W) ids of a palette ("P") or grayscale ("L") PNG, read by index."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            ids = np.asarray(im)
    except (OSError, UnidentifiedImageError) as err:
        raise RawLabelError(
            f"cannot read label {path} ({err}); restore it from the archive"
        ) from err
    if mode not in ("P", "L"):
        raise RawLabelError(
            f"label {path} has PNG mode {mode}; expected a palette (P) or 8-bit (L) PNG of "
            "label ids — colour-coded labels need encoding: color and a color_map"
        )
    return ids


def read_channel16(path: Path, channel: int) -> np.ndarray:
    """(H, W) uint16 ids from one channel (OpenCV BGR index) of a 16-bit 3-channel PNG."""
    array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise RawLabelError(f"cannot read label {path} (missing or truncated); restore it")
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint16:
        raise RawLabelError(
            f"label {path} is not a 16-bit 3-channel PNG (shape {array.shape}, {array.dtype}); "
            "is it a SYNTHIA GT/LABELS file? (GT/COLOR holds colour images)"
        )
    return array[..., channel]


def _map_ids(ids: np.ndarray, raw: RawLabels, path: Path) -> np.ndarray:
    lut = np.full(65536 if ids.dtype == np.uint16 else 256, IGNORE_INDEX, dtype=np.uint8)
    for raw_id, train_id in raw.id_map.items():
        if raw_id < lut.size:
            lut[raw_id] = train_id
    if raw.void_ids is not None:
        known = set(raw.id_map) | set(raw.void_ids)
        unknown = [int(v) for v in np.unique(ids) if int(v) not in known]
        if unknown:
            raise RawLabelError(
                f"label {path} holds id {unknown[0]}, which neither raw_labels.id_map nor "
                "void_ids lists; add it to one of them"
            )
    return lut[ids]


def _map_colors(path: Path, raw: RawLabels) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise RawLabelError(f"cannot read label {path} (missing or truncated); restore it")
    rgb = bgr[..., ::-1].astype(np.int64)
    codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    values, inverse = np.unique(codes, return_inverse=True)
    table = {(r << 16) | (g << 8) | b: t for (r, g, b), t in raw.color_map.items()}
    unknown = [v for v in values.tolist() if v not in table]
    if unknown:
        v = unknown[0]
        raise RawLabelError(
            f"label {path} holds colour {[v >> 16, (v >> 8) & 255, v & 255]}, which "
            "raw_labels.color_map does not list; add it (to 255 to ignore it)"
        )
    mapped = np.array([table[v] for v in values.tolist()], dtype=np.uint8)
    return mapped[inverse.reshape(codes.shape)]
