"""HRDA's high-resolution data pipeline: the valid-pseudo-label margin mask (``tgt_valid``), the
data=gtaHR2csHR and data=synthetic_hr configs and RCS at min_crop_ratio 2.0 (docs/configuration.md).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from ssr.data.datamodule import UDADataModule, _check_crop_fits
from ssr.data.datasets import image_size
from ssr.data.scaling import rescale_size
from ssr.data.stream import CropRecord
from ssr.data.transforms import margin_mask
from ssr.errors import ConfigError

from helpers import compose_cfg, synthetic_data

# Target files of 40x32 (W x H) resized by 0.5 to 20x16 (the mask nearest: pixel d <- 2d) and
# cropped to 16x16 at x offset 0..4. File margins [4, 10, 6, 6]: rows 0-3 -> resized rows 0-1,
# rows 22-31 -> 11-15, columns 0-5 -> 0-2, columns 34-39 -> 17-19. So every crop keeps rows 2-10,
# and its (invalid first, invalid last) columns before the flip are, per x offset:
MARGINS = [4, 10, 6, 6]
INVALID_COLUMNS = {0: (3, 0), 1: (2, 0), 2: (1, 1), 3: (0, 2), 4: (0, 3)}
TINY = {"source_resize": (40, 24), "target_resize": (20, 16), "crop_size": (16, 16)}


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def tiny_roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """GTA5 frames of 40x24 and Cityscapes frames of 40x32 (2 train, 1 val), random content."""
    root, rng = tmp_path_factory.mktemp("hr"), np.random.default_rng(0)
    for i in range(2):
        _png(root / "gta/images" / f"{i:05d}.png", rng.integers(0, 256, (24, 40, 3), np.uint8))
        _png(
            root / f"gta/labels/{i:05d}_labelTrainIds.png", rng.integers(0, 19, (24, 40), np.uint8)
        )
    for split, n in (("train", 2), ("val", 1)):
        for i in range(n):
            stem = f"bonn/bonn_000000_{i:06d}"
            image = rng.integers(0, 256, (32, 40, 3), np.uint8)
            _png(root / f"cityscapes/leftImg8bit/{split}/{stem}_leftImg8bit.png", image)
            label = rng.integers(0, 19, (32, 40), np.uint8)
            _png(root / f"cityscapes/gtFine/{split}/{stem}_gtFine_labelTrainIds.png", label)
    return root / "gta", root / "cityscapes"


def test_the_mask_follows_resize_crop_and_flip(tiny_roots: tuple[Path, Path]) -> None:
    dm = UDADataModule(*map(str, tiny_roots), **TINY, seed=0, pseudo_margins=MARGINS)
    dm.setup("fit")
    assert dm.train_set is not None
    seen = set()
    for i in range(40):
        item = dm.train_set[i]
        height, width, top, left, flip = item["tgt_crop"].box.tolist()
        assert (height, width, top) == (16, 20, 0)  # full-height crops of the resized image
        first, last = INVALID_COLUMNS[left]
        expected = torch.zeros(16, 16)
        expected[2:11, first : 16 - last] = 1.0
        expected = expected.flip(1) if flip else expected
        assert item["tgt_valid"].dtype == torch.float32
        assert torch.equal(item["tgt_valid"], expected), (left, flip)
        seen.add((left, flip))
    assert {left for left, _ in seen} == set(INVALID_COLUMNS) and {f for _, f in seen} == {0, 1}


def synthetic_hr(root: Path, **kwargs: object) -> UDADataModule:
    """data=synthetic_hr on the prepared synthetic root, in-process, seed 0."""
    cfg = compose_cfg("train", "data=synthetic_hr", *synthetic_data(root), "data.num_workers=0")
    dm = instantiate(cfg.data, seed=0, **kwargs)
    dm.setup("fit")
    return dm


def test_synthetic_hr_stream_is_bit_identical_with_and_without_margins(
    synthetic_root: Path,
) -> None:
    masked, plain = synthetic_hr(synthetic_root), synthetic_hr(synthetic_root, pseudo_margins=None)
    it_masked, it_plain = iter(masked.train_dataloader()), iter(plain.train_dataloader())
    for _ in range(2):
        a, b = next(it_masked), next(it_plain)
        assert "tgt_valid" not in b and set(a) == {*b, "tgt_valid"}
        for key, value in b.items():
            if isinstance(value, CropRecord):
                assert value.file == a[key].file and torch.equal(value.box, a[key].box), key
            else:
                assert torch.equal(value, a[key]), key  # same draws, same pixels
        valid = a["tgt_valid"]
        assert valid.shape == (4, 128, 128) and valid.dtype == torch.float32
        assert valid[:, :4].eq(0).all() and valid[:, 98:].eq(0).all()  # 4 / 30 rows of 128
        full = margin_mask(128, 256, (4, 30, 4, 4))  # the native 256x128 frame
        for mask, (_, _, top, left, flip) in zip(valid, a["tgt_crop"].box.tolist(), strict=True):
            crop = full[top : top + 128, left : left + 128]
            assert np.array_equal(mask.numpy(), crop[:, ::-1] if flip else crop)


def test_synthetic_hr_is_the_hr_pipeline_divided_by_8(synthetic_root: Path) -> None:
    dm = synthetic_hr(synthetic_root)  # setup ran `_check_crop_fits`: the 128 crops fit
    data = compose_cfg("train", "data=synthetic_hr").data
    assert (data.source_resize, data.target_resize, data.crop_size) == (
        [320, 180],
        [256, 128],
        [128, 128],
    )
    assert data.pseudo_margins == [4, 30, 4, 4] and data.test_resize is None
    assert (data.batch_size, data.num_workers) == (4, 1)
    assert dict(data.rcs) == {"temperature": 0.01, "min_pixels": 84, "min_crop_ratio": 2.0}
    assert dm.train_set is not None and dm.train_set.target is not None
    assert image_size(dm.train_set.source.images[0]) == (176, 320)  # native: resize keeps it
    assert image_size(dm.train_set.target.images[0]) == (128, 256)
    assert rescale_size(176, 320, (320, 180)) == (176, 320)
    # RCS at ratio 2.0: a crop needs strictly more than 84 * 2.0 = 168 pixels of the class.
    assert dm.rcs_sampler is not None and dm.rcs_sampler.crop_min_pixels == 168.0
    label = torch.full((128, 128), 255)
    label.view(-1)[:168] = 7
    assert not dm.rcs_sampler.accepts(label, 7)
    label.view(-1)[168] = 7
    assert dm.rcs_sampler.accepts(label, 7)


def test_gta_hr_config_values_and_crop_fit(tmp_path: Path) -> None:
    data = compose_cfg("train", "data=gtaHR2csHR").data
    assert (data.source_resize, data.target_resize, data.crop_size) == (
        [2560, 1440],
        [2048, 1024],
        [1024, 1024],
    )
    assert data.pseudo_margins == [30, 240, 30, 30] and data.test_resize is None
    assert (data.batch_size, data.num_workers, data.cat_max_ratio) == (2, 4, 0.75)
    assert dict(data.rcs) == {"temperature": 0.01, "min_pixels": 3000, "min_crop_ratio": 2.0}
    assert rescale_size(1052, 1914, (2560, 1440)) == (1407, 2560)  # not 1408
    assert rescale_size(1024, 2048, (2048, 1024)) == (1024, 2048)  # Cityscapes stays native
    frames = {
        "gta.png": ((1052, 1914), data.source_resize),
        "cs.png": ((1024, 2048), data.target_resize),
    }
    for name, (hw, resize) in frames.items():
        _png(tmp_path / name, np.zeros(hw, np.uint8))
        dataset = SimpleNamespace(images=[tmp_path / name], root=tmp_path)
        _check_crop_fits(dataset, tuple(resize), tuple(data.crop_size))  # no ConfigError
    gta = SimpleNamespace(images=[tmp_path / "gta.png"], root=tmp_path)
    with pytest.raises(ConfigError, match="2560x1407"):  # a 1408-row crop would not fit
        _check_crop_fits(gta, (2560, 1440), (1408, 1024))


@pytest.mark.parametrize(
    ("margins", "needle"),
    [
        ([30, 240, 30], "must be four integers >= 0"),
        ("30", "must be four integers >= 0"),
        ([30, -1, 30, 30], r"data.pseudo_margins\[1\]=-1 must be an integer >= 0"),
        ([30, 2.5, 30, 30], r"data.pseudo_margins\[1\]=2.5 must be an integer >= 0"),
    ],
)
def test_bad_margins_are_one_line_config_errors(margins: object, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        UDADataModule("gta", "cityscapes", pseudo_margins=margins)  # type: ignore[arg-type]


def test_margins_covering_the_image_are_refused(tiny_roots: tuple[Path, Path]) -> None:
    dm = UDADataModule(*map(str, tiny_roots), **TINY, pseudo_margins=[16, 16, 0, 0])
    with pytest.raises(ConfigError, match=r"cover the whole 40x32 image"):
        dm.setup("fit")
