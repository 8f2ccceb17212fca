"""The 19 Cityscapes evaluation classes, their ids, palette and thing subset (docs/method.md §7.1).

Everything that names a class or maps a label id reads it from here.
"""

from __future__ import annotations

import re

import numpy as np

IGNORE_INDEX = 255
NUM_CLASSES = 19

CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip

PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip

# Cityscapes (and GTA5) label id of each train id, in train-id order.
TRAIN_ID_TO_LABEL_ID: tuple[int, ...] = (
    7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33,
)  # fmt: skip

# SYNTHIA-RAND-CITYSCAPES class id (the R channel of its 16-bit labels) -> train id; every other
# id (0 void, 13 parking slot, 14 road work, 22 lane marking) is ignored. Terrain (16), truck (18)
# and train (20) are listed but never occur, so only 16 classes are trained (docs/benchmarks.md).
SYNTHIA_ID_TO_TRAIN_ID: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12, 8: 13,
    18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}  # fmt: skip

# The class subsets SYNTHIA -> Cityscapes is reported on: the 16 classes SYNTHIA has (no terrain,
# truck, train) and those 16 without wall, fence and pole. Means over them are taken directly from
# the per-class IoUs (not as mIoU19 * 19 / 16).
SYNTHIA_EVAL_SUBSETS: dict[str, tuple[int, ...]] = {
    "mIoU16": (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18),
    "mIoU13": (0, 1, 2, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18),
}

# The key of a class-subset mean in results and metrics.json: "mIoU" plus a suffix (mIoU16).
SUBSET_KEY = re.compile(r"mIoU\w+")

# Classes whose ImageNet features the feature distance preserves (DAFormer "things").
THING_CLASSES: tuple[int, ...] = (6, 7, 11, 12, 13, 14, 15, 16, 17, 18)

# Normalisation of every network input (mmseg's ImageNet statistics, RGB, 0-255 scale).
# SAM's own pixel_mean / pixel_std are the same numbers; ssr.uda checks that rather than assuming.
MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
STD: tuple[float, float, float] = (58.395, 57.12, 57.375)


def label_id_lut() -> np.ndarray:
    """(256,) uint8 lookup table: Cityscapes label id -> train id, every other value -> 255."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for train_id, label_id in enumerate(TRAIN_ID_TO_LABEL_ID):
        lut[label_id] = train_id
    return lut


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map an integer array of Cityscapes label ids to uint8 train ids (255 = ignore)."""
    if label_ids.dtype != np.uint8:
        label_ids = np.where((label_ids >= 0) & (label_ids < 256), label_ids, 0).astype(np.uint8)
    return label_id_lut()[label_ids]


def train_ids_to_label_ids(train_ids: np.ndarray) -> np.ndarray:
    """(H, W) train ids -> uint8 Cityscapes label ids (what the official evaluator and test server
    read); ignore (255) and unknown ids become 0 ("unlabeled")."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[:NUM_CLASSES] = TRAIN_ID_TO_LABEL_ID
    return lut[train_ids.astype(np.uint8)]


def colorize(train_ids: np.ndarray) -> np.ndarray:
    """(H, W) train ids -> (H, W, 3) uint8 Cityscapes colours; ignore and unknown ids are black."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:NUM_CLASSES] = np.asarray(PALETTE, dtype=np.uint8)
    return lut[train_ids.astype(np.uint8)]
