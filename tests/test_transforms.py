"""Labels, the real fixture frames and the paired transforms (docs/method.md §3.2, §4.1, §7)."""

from __future__ import annotations

import csv
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ssr.data import transforms as T
from ssr.data.datasets import CityscapesDataset, read_image, read_label
from ssr.data.labels import label_id_lut, label_ids_to_train_ids
from ssr.data.scaling import rescale_size

from helpers import FIXTURES, normalised

CS_FRAME = "frankfurt_000000_000294"
GTA_FRAME = "real_frame_1914x1052.png"


# --- labels and the real fixtures ---------------------------------------------------------------


def test_label_id_lut_matches_official_table() -> None:
    lut = label_id_lut()
    with open(FIXTURES / "cityscapes_labels.csv") as f:
        rows = [r for r in csv.DictReader(f) if int(r["id"]) >= 0]  # license plate has id -1
    assert len(rows) == 34
    for row in rows:
        train_id = int(row["trainId"])
        assert lut[int(row["id"])] == (train_id if 0 <= train_id < 19 else 255), row["name"]


def test_real_label_ids_map_to_real_train_ids(shared_fixtures: Path) -> None:
    folder = shared_fixtures / "cityscapes" / "gtFine" / "val" / "frankfurt"
    label_ids = np.asarray(Image.open(folder / f"{CS_FRAME}_gtFine_labelIds.png"))
    official = read_label(folder / f"{CS_FRAME}_gtFine_labelTrainIds.png")
    ours = label_ids_to_train_ids(label_ids)
    assert set(np.unique(ours)) == set(np.unique(official))
    assert (ours != official).sum() <= 77  # independent downscaling of the fixture files


def test_cityscapes_val_item_on_real_frame(shared_fixtures: Path) -> None:
    root = shared_fixtures / "cityscapes"
    ds = CityscapesDataset(root, "val", T.test_transform((128, 64)))
    assert len(ds) == 1
    item = ds[0]
    rgb = np.asarray(Image.open(ds.images[0]).convert("RGB"))
    assert rgb.shape == (128, 256, 3)
    expected = normalised(cv2.resize(rgb, (128, 64), interpolation=cv2.INTER_LINEAR))
    assert item["img"].dtype == torch.float32 and item["img"].shape == (3, 64, 128)
    np.testing.assert_allclose(item["img"].permute(1, 2, 0).numpy(), expected, atol=1e-4)
    # The label stays at full resolution for the metric (§3.2).
    assert item["label"].dtype == torch.int64 and item["label"].shape == (128, 256)
    np.testing.assert_array_equal(item["label"].numpy(), read_label(ds.labels[0]))
    assert item["ori_size"].tolist() == [128, 256]
    assert item["path"].endswith(f"{CS_FRAME}_leftImg8bit.png")


def test_real_gta_frame_resizes_to_1280x704(shared_fixtures: Path) -> None:
    img = read_image(shared_fixtures / "gta5" / "images" / GTA_FRAME)
    assert img.shape == (1052, 1914, 3)
    label = np.zeros(img.shape[:2], np.uint8)
    out = T.KeepRatioResize((1280, 720))(image=img, mask=label)
    assert out["image"].shape == (704, 1280, 3) and out["mask"].shape == (704, 1280)
    np.testing.assert_array_equal(
        out["image"], cv2.resize(img, (1280, 704), interpolation=cv2.INTER_LINEAR)
    )
    batch = T.source_train_transform()(image=img, mask=label)
    assert batch["image"].shape == (3, 512, 512) and batch["mask"].shape == (512, 512)


# --- transforms ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hw", "scale", "expected"),
    [
        ((1052, 1914), (1280, 720), (704, 1280)),  # GTA5: not 1280x720
        ((1024, 2048), (1024, 512), (512, 1024)),  # Cityscapes
        ((1024, 2048), (512, 1024), (512, 1024)),  # (long, short) order does not matter
        ((5, 10), (5, 5), (3, 5)),  # 2.5 rounds half up (int(x + 0.5)), not to even
        ((90, 160), (64, 32), (32, 57)),  # short side binds: 32/90
    ],
)
def test_rescale_size_uses_mmcv_rule(hw, scale, expected) -> None:
    assert rescale_size(*hw, scale) == expected
    # idempotent: what makes a pre-resized copy give the on-the-fly pixels (ssr.data.resized)
    assert rescale_size(*expected, scale) == expected


def test_rescale_size_is_idempotent_for_any_size() -> None:
    """Resizing a resized image again changes nothing, whichever side binds: a pre-resized copy
    (prepare --resized) then trains on exactly the on-the-fly pixels."""
    rng = np.random.default_rng(0)
    for _ in range(2000):
        h, w, long, short = (int(v) for v in rng.integers(8, 3000, 4))
        once = rescale_size(h, w, (long, short))
        assert rescale_size(*once, (long, short)) == once, (h, w, long, short)


def test_label_resize_is_nearest() -> None:
    label = np.random.default_rng(0).choice(np.array([0, 13, 255], np.uint8), (45, 100))
    out = T.KeepRatioResize((64, 36))(image=np.zeros((45, 100, 3), np.uint8), mask=label)
    assert out["mask"].shape == (29, 64)  # factor min(64/100, 36/45) = 0.64; 28.8 -> 29
    assert set(np.unique(out["mask"])) <= {0, 13, 255}


def _good_crop(mask: np.ndarray) -> bool:
    counts = np.bincount(mask.ravel(), minlength=256)[:255]
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < 0.75


def test_cat_max_ratio_redraws_up_to_ten_times() -> None:
    # 10x100 label: class 0 in columns 0..89, class 1 in 90..99. 10x10 crops have 91 offsets,
    # of which 5 (83..87) satisfy the ratio: p = 5/91. With 10 checks and an unchecked 11th box,
    # P(good) = 1 - (86/91)^11 = 0.463; without the check it is p = 0.055.
    label = np.zeros((10, 100), np.uint8)
    label[:, 90:] = 1
    image = np.zeros((10, 100, 3), np.uint8)
    for ratio, expected in ((0.75, 1 - (86 / 91) ** 11), (1.0, 5 / 91)):
        crop = A.Compose([T.CatMaxRandomCrop(10, 10, cat_max_ratio=ratio)], seed=0)
        good = np.mean([_good_crop(crop(image=image, mask=label)["mask"]) for _ in range(800)])
        assert abs(good - expected) < 0.055


def test_cat_max_ratio_draws_exactly_eleven_boxes_when_nothing_fits() -> None:
    crop = T.CatMaxRandomCrop(4, 4, cat_max_ratio=0.75)
    crop.set_random_seed(3)
    crop(image=np.zeros((10, 20, 3), np.uint8), mask=np.zeros((10, 20), np.uint8))
    reference = np.random.default_rng(3)
    for _ in range(11):
        reference.integers(0, 7)
        reference.integers(0, 17)
    assert crop.random_generator.random() == reference.random()


def test_small_image_is_padded_after_normalisation() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (20, 30), dtype=np.uint8)
    out = T.train_transform(resize=(30, 20), crop_size=(32, 32), cat_max_ratio=1.0)(
        image=image, mask=label
    )
    img, lbl = out["image"], out["mask"]
    assert img.shape == (3, 32, 32) and lbl.shape == (32, 32)
    assert (img[:, 20:, :] == 0).all() and (img[:, :, 30:] == 0).all()  # 0 = the mean colour
    assert (lbl[20:, :] == 255).all() and (lbl[:, 30:] == 255).all()
    core = lbl[:20, :30].numpy()
    assert (core == label).all() or (core == label[:, ::-1]).all()


def test_flip_is_a_coin_toss_applied_to_both() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (8, 8), dtype=np.uint8)
    pipeline = T.train_transform(resize=(8, 8), crop_size=(8, 8))
    flips = 0
    for seed in range(200):
        pipeline.set_random_seed(seed)
        out = pipeline(image=image, mask=label)
        flipped = bool((out["mask"].numpy() == label[:, ::-1]).all())
        assert flipped or (out["mask"].numpy() == label).all()
        ref = normalised(image[:, ::-1] if flipped else image)
        np.testing.assert_allclose(out["image"].permute(1, 2, 0).numpy(), ref, atol=1e-4)
        flips += flipped
    assert 70 < flips < 130
