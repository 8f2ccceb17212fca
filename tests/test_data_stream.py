"""The training data stream's speed levers change no number: loader workers (every sample's
randomness is seeded by its index) and pre-resized copies written by `prepare --resized`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ssr.data import prepare
from ssr.data.datamodule import UDADataModule
from ssr.errors import ConfigError

from helpers import exit_code, prepare_fails

# data=synthetic's sizes: the 320x176 source into (160, 90), the 256x128 target into (128, 64).
SOURCE_SCALE, TARGET_SCALE = (160, 90), (128, 64)


def datamodule(source: Path, target: Path, workers: int = 0) -> UDADataModule:
    dm = UDADataModule(
        str(source),
        str(target),
        source_resize=SOURCE_SCALE,
        target_resize=TARGET_SCALE,
        crop_size=(64, 64),
        test_resize=TARGET_SCALE,
        batch_size=2,
        num_workers=workers,
        rcs={"min_pixels": 10},
        seed=7,
    )
    dm.setup("fit")
    return dm


def assert_same_items(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        elif key.endswith("_crop"):
            assert value.file == b[key].file and torch.equal(value.box, b[key].box), key


def test_loader_workers_do_not_change_the_batches(synthetic_root: Path) -> None:
    """0 and 2 workers give the same first batches: sample i is a function of (seed, i)."""
    streams = []
    for workers in (0, 2):
        dm = datamodule(synthetic_root / "gta", synthetic_root / "cityscapes", workers)
        loader = iter(dm.train_dataloader())
        streams.append([next(loader) for _ in range(3)])
    for a, b in zip(*streams, strict=True):
        assert_same_items(a, b)


@pytest.fixture(scope="module")
def copies(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The synthetic sets (one GTA5 label of another size than its image, as in real GTA5) and
    their pre-resized copies at data=synthetic's scales."""
    tmp = tmp_path_factory.mktemp("resized")
    gta = tmp / "gta"
    shutil.copytree(synthetic_root / "gta", gta)
    raw = gta / "labels" / "00002.png"  # a palette PNG of label ids, resized by index
    with Image.open(raw) as im:
        im.resize((322, 179), Image.Resampling.NEAREST).save(raw)
    (gta / "labels" / "00002_labelTrainIds.png").unlink()  # prepare converts it again
    out = {"gta": gta, "cityscapes": synthetic_root / "cityscapes"}
    scales = {"gta": ("gta5", SOURCE_SCALE), "cityscapes": ("cityscapes", TARGET_SCALE)}
    for name, (fmt, scale) in scales.items():
        out[f"{name}_resized"] = tmp / f"{name}_resized"
        argv = [fmt, str(out[name]), "--resized", str(out[f"{name}_resized"]), "--nproc", "1"]
        assert exit_code(prepare.main, [*argv, "--scale", *map(str, scale)]) == 0
    return out


def test_a_resized_copy_gives_the_same_training_items(copies: dict[str, Path]) -> None:
    original = datamodule(copies["gta"], copies["cityscapes"])
    resized = datamodule(copies["gta_resized"], copies["cityscapes_resized"])
    assert original.train_set is not None and resized.train_set is not None
    for i in range(8):  # RCS draws, crops (cat_max_ratio retries), flips, the odd label
        assert_same_items(original.train_set[i], resized.train_set[i])
    for i in range(len(original.val_set)):  # val is linked, scored at full resolution
        assert_same_items(original.val_set[i], resized.val_set[i])


def test_the_copy_holds_small_files_and_links_the_rest(copies: dict[str, Path]) -> None:
    image = cv2.imread(str(copies["gta_resized"] / "images" / "00001.png"))
    assert image.shape[:2] == (88, 160)  # 320x176 -> 160x88
    odd = cv2.imread(str(copies["gta_resized"] / "labels" / "00002_labelTrainIds.png"), 0)
    assert odd.shape == (89, 160)  # the odd label, from its own 322x179
    cs = copies["cityscapes_resized"]
    assert (cs / "leftImg8bit" / "val").is_symlink() and (cs / "gtFine" / "val").is_symlink()
    assert (copies["gta_resized"] / "samples_with_class.json").is_symlink()
    marker = json.loads((copies["gta_resized"] / "resized.json").read_text())
    assert marker["scale"] == list(SOURCE_SCALE) and marker["complete"]
    assert not list(copies["gta_resized"].glob("labels/[0-9]*[0-9].png"))  # no raw labels


def test_a_copy_is_used_only_at_its_scale(copies: dict[str, Path]) -> None:
    dm = UDADataModule(
        str(copies["gta_resized"]), str(copies["cityscapes"]), source_resize=(320, 180),
        target_resize=TARGET_SCALE, crop_size=(64, 64), rcs={"min_pixels": 10}, seed=0,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"pre-resized to \[160, 90\] but data.source_resize"):
        dm.setup("fit")
    marker = copies["gta_resized"] / "resized.json"
    saved = marker.read_text()
    marker.write_text(json.dumps(json.loads(saved) | {"complete": False}))
    try:
        with pytest.raises(ConfigError, match="unfinished pre-resized copy"):
            datamodule(copies["gta_resized"], copies["cityscapes"])
    finally:
        marker.write_text(saved)


def test_resized_copy_mistakes_are_one_line(
    copies: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gta = str(copies["gta"])
    assert exit_code(prepare.main, ["gta5", gta, "--resized", str(tmp_path / "x")]) == 2
    assert "--resized OUT and --scale LONG SHORT go together" in capsys.readouterr().err
    inside = ["gta5", gta, "--resized", f"{gta}/small", "--scale", "160", "90"]
    prepare_fails(inside, capsys, "must lie outside the dataset root")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    full = ["gta5", gta, "--resized", str(tmp_path / "full"), "--scale", "160", "90"]
    prepare_fails(full, capsys, "is not empty and holds no resized.json")
    split = [
        "gta5",
        gta,
        "--resized",
        str(tmp_path / "y"),
        "--scale",
        "160",
        "90",
        "--splits",
        "val",
    ]
    prepare_fails(split, capsys, "--splits val is not a split of gta5")
    assert not (tmp_path / "y").exists()
    assert np.array_equal(  # the original is untouched
        cv2.imread(str(copies["gta"] / "images" / "00001.png")).shape[:2], (176, 320)
    )


def test_pixel_margins_refuse_a_resized_target(copies: dict[str, Path]) -> None:
    """HRDA's pseudo-label margins are pixels of the full image: not of a resized copy."""
    dm = UDADataModule(
        str(copies["gta"]), str(copies["cityscapes_resized"]), source_resize=SOURCE_SCALE,
        target_resize=TARGET_SCALE, crop_size=(64, 64), rcs={"min_pixels": 10}, seed=0,
        pseudo_margins=(4, 30, 4, 4),
    )  # fmt: skip
    with pytest.raises(ConfigError, match="pseudo_margins are pixels of the full target images"):
        dm.setup("fit")
