"""Extra raw formats of the synthetic generator (ssr.data.synthetic.formats): SYNTHIA's 16-bit
labels, ACDC's and Dark Zurich's nested layouts, determinism, an unchanged default set, adding
formats to an existing set, and the CLI flag."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from ssr.data import synthetic as syn
from ssr.data.labels import (
    IGNORE_INDEX,
    NUM_CLASSES,
    SYNTHIA_ID_TO_TRAIN_ID,
    label_ids_to_train_ids,
)
from ssr.data.synthetic.formats import ACDC_CONDITIONS, SYNTHIA_VOID_TRAIN_IDS

from helpers import exit_code

COUNTS = {"num_source": 3, "num_target_train": 4, "num_target_val": 4}
OLD_MARKER_KEYS = {
    "version", "seed", "num_source", "num_target_train", "num_target_val", "source_size_hw",
    "target_size_hw", "complete",
}  # fmt: skip
FRAME = re.compile(r"^(GOPR\d{4})_frame_(\d{6})_rgb_anon\.png$")
TRAIN_IDS = set(range(NUM_CLASSES)) | {IGNORE_INDEX}


@pytest.fixture(scope="module")
def full_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("formats") / "data"
    assert syn.generate(out, seed=0, **COUNTS, benchmarks=syn.BENCHMARKS)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _synthia_to_train(classes: np.ndarray) -> np.ndarray:
    lut = np.full(65536, IGNORE_INDEX, dtype=np.uint8)
    for synthia_id, train_id in SYNTHIA_ID_TO_TRAIN_ID.items():
        lut[synthia_id] = train_id
    return lut[classes]


def test_synthia_raw_format(full_set: Path) -> None:
    root = full_set / "synthia"
    names = [f"{i:07d}.png" for i in range(3)]
    assert sorted(p.name for p in (root / "RGB").iterdir()) == names
    assert sorted(p.name for p in (root / "GT" / "LABELS").iterdir()) == names
    allowed = set(SYNTHIA_ID_TO_TRAIN_ID) | {0, 13, 22}
    max_instance, lane_pixels = 0, 0
    for i, name in enumerate(names):
        image = Image.open(root / "RGB" / name)
        assert image.mode == "RGB" and image.size == (160, 95)
        expected_image, scene = syn.make_format_sample("synthia", "source", "train", i)
        np.testing.assert_array_equal(np.asarray(image), expected_image)
        raw = cv2.imread(str(root / "GT" / "LABELS" / name), cv2.IMREAD_UNCHANGED)
        assert raw.dtype == np.uint16 and raw.shape == (95, 160, 3)
        classes, instances = raw[..., 2], raw[..., 1]
        assert set(np.unique(classes).tolist()) <= allowed and not raw[..., 0].any()
        max_instance = max(max_instance, int(instances.max()))
        assert not instances[classes == 0].any()
        lane_pixels += int((classes == 22).sum())
        # Through the SYNTHIA mapping: the scene's train ids, minus what SYNTHIA has no class for.
        expected = label_ids_to_train_ids(scene.label)
        expected[np.isin(expected, SYNTHIA_VOID_TRAIN_IDS)] = IGNORE_INDEX
        expected[scene.material == syn.Mat.LANE] = IGNORE_INDEX
        np.testing.assert_array_equal(_synthia_to_train(classes), expected)
        terrain = label_ids_to_train_ids(scene.label) == 9
        assert not classes[terrain].any()
    assert max_instance > 255 and lane_pixels > 0  # 16-bit decoding matters


def _frames(root: Path) -> list[Path]:
    return sorted(root.rglob("*_rgb_anon.png"))


def _check_frames(rgb: Path, gt: Path | None, count: int) -> list[str]:
    """The frames under `rgb` (GOPRxxxx/ folders), their size and labels; returns their stems."""
    frames = _frames(rgb)
    assert len(frames) == count
    stems = []
    for frame in frames:
        match = FRAME.match(frame.name)
        assert match and match[1] == frame.parent.name and frame.parent.parent == rgb
        image = Image.open(frame)
        assert image.mode == "RGB" and image.size == (240, 135)
        stem = frame.name.removesuffix("_rgb_anon.png")
        stems.append(stem)
        if gt is None:
            continue
        label = Image.open(gt / match[1] / f"{stem}_gt_labelTrainIds.png")
        assert label.mode == "L" and label.size == image.size
        assert set(np.unique(np.asarray(label)).tolist()) <= TRAIN_IDS
    return stems


def test_acdc_raw_layout(full_set: Path) -> None:
    root = full_set / "acdc"
    assert sorted(p.name for p in (root / "rgb_anon").iterdir()) == sorted(ACDC_CONDITIONS)
    stems = []
    for cond in ACDC_CONDITIONS:
        for split in ("train", "val", "test"):
            gt = None if split == "test" else root / "gt" / cond / split
            stems += _check_frames(root / "rgb_anon" / cond / split, gt, 1)
        assert not (root / "gt" / cond / "test").exists()
    assert len(set(stems)) == len(stems)  # the test-server export flattens the folders
    # Labels are the train ids of the scene the image shows.
    image, scene = syn.make_format_sample("acdc", "night", "val", 0)
    (val,) = _frames(root / "rgb_anon" / "night" / "val")
    np.testing.assert_array_equal(np.asarray(Image.open(val)), image)
    gt_name = val.name.replace("rgb_anon", "gt_labelTrainIds")
    gt = root / "gt" / "night" / "val" / val.parent.name / gt_name
    np.testing.assert_array_equal(np.asarray(Image.open(gt)), label_ids_to_train_ids(scene.label))


def test_dark_zurich_raw_layout(full_set: Path) -> None:
    root = full_set / "dark_zurich"
    night = _check_frames(root / "rgb_anon" / "train" / "night", None, 4)
    day = _check_frames(root / "rgb_anon" / "train" / "day", None, 1)
    val_gt = root / "gt" / "val" / "night"
    val = _check_frames(root / "rgb_anon" / "val" / "night", val_gt, 4)
    test = _check_frames(root / "rgb_anon" / "test" / "night", None, 1)
    assert {s[:8] for s in val} == {"GOPR0356"} and {s[:8] for s in test} == {"GOPR0364"}
    assert len(set(night + day + val + test)) == 4 + 1 + 4 + 1
    assert sorted(p.name for p in (root / "gt").iterdir()) == ["val"]  # no train or test labels


def test_condition_looks_differ() -> None:
    def mean(benchmark: str, look: str) -> float:
        images = [syn.make_format_sample(benchmark, look, "train", i)[0] for i in range(3)]
        return float(np.mean(images))

    day = mean("darkzurich", "day")
    assert mean("darkzurich", "night") < 0.4 * day and mean("acdc", "night") < 0.4 * day
    assert mean("acdc", "snow") > day and mean("acdc", "fog") > day
    fog = syn.make_format_sample("acdc", "fog", "train", 0)[0].astype(np.float64)
    plain = syn.make_format_sample("darkzurich", "day", "train", 0)[0].astype(np.float64)
    assert fog.std() < 0.7 * plain.std()  # hazed: less contrast


def test_deterministic_and_separate_streams(full_set: Path, tmp_path: Path) -> None:
    assert syn.generate(tmp_path / "a", seed=0, **COUNTS, benchmarks=syn.BENCHMARKS)
    assert _files(tmp_path / "a") == _files(full_set)
    # The extra formats leave the GTA5 and Cityscapes images of the same settings as they were.
    assert syn.generate(tmp_path / "b", seed=0, **COUNTS)
    b = _files(tmp_path / "b")
    assert {k: v for k, v in _files(full_set).items() if k in b and k != syn.MARKER_NAME} == {
        k: v for k, v in b.items() if k != syn.MARKER_NAME
    }
    assert syn.generate(tmp_path / "c", seed=1, **COUNTS, benchmarks=["synthia"])
    c = _files(tmp_path / "c")
    assert all(c[k] != v for k, v in _files(full_set).items() if k.startswith("synthia/RGB"))


def test_default_marker_is_unchanged(tmp_path: Path) -> None:
    assert syn.generate(tmp_path / "d", **COUNTS)
    marker = json.loads((tmp_path / "d" / syn.MARKER_NAME).read_text())
    assert set(marker) == OLD_MARKER_KEYS
    assert not any((tmp_path / "d" / sub).exists() for sub in syn.BENCHMARK_DIRS.values())


def test_benchmarks_are_added_to_a_complete_set(tmp_path: Path) -> None:
    out = tmp_path / "data"
    marker = out / syn.MARKER_NAME
    assert syn.generate(out, **COUNTS)
    image = out / "gta" / "images" / "00001.png"
    stamp = image.stat().st_mtime_ns
    assert syn.generate(out, **COUNTS, benchmarks=["synthia"])
    assert image.stat().st_mtime_ns == stamp and (out / "synthia" / "RGB").is_dir()
    assert syn.generate(out, **COUNTS, benchmarks=["acdc", "synthia"])
    assert json.loads(marker.read_text())["benchmarks"] == ["synthia", "acdc"]
    assert not syn.generate(out, **COUNTS, benchmarks=["acdc"])  # already there
    assert not syn.generate(out, **COUNTS)
    # A folder no run recorded is never written into nor deleted.
    (out / "dark_zurich").mkdir()
    (out / "dark_zurich" / "keep.txt").write_text("real data")
    with pytest.raises(syn.SyntheticDataError, match="dark_zurich"):
        syn.generate(out, **COUNTS, benchmarks=["darkzurich"])
    # --force deletes what the marker records, also formats no longer asked for.
    assert syn.generate(out, **COUNTS, force=True)
    assert not (out / "synthia").exists() and not (out / "acdc").exists()
    assert (out / "dark_zurich" / "keep.txt").read_text() == "real data"
    assert set(json.loads(marker.read_text())) == OLD_MARKER_KEYS
    with pytest.raises(syn.SyntheticDataError, match="benchmarks"):
        syn.generate(out, **COUNTS, benchmarks=["cityscapes"])


def test_cli_benchmarks_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data"
    counts = ["--num-source", "1", "--num-target-train", "1", "--num-target-val", "1"]
    assert exit_code(syn.main, [str(out), *counts, "--benchmarks", "acdc", "darkzurich"]) == 0
    assert "dark_zurich" in capsys.readouterr().out
    assert (out / "acdc" / "rgb_anon" / "fog").is_dir() and not (out / "synthia").exists()
    assert json.loads((out / syn.MARKER_NAME).read_text())["benchmarks"] == ["acdc", "darkzurich"]
    assert exit_code(syn.main, [str(out), *counts, "--benchmarks", "synthia"]) == 0
    assert (out / "synthia" / "GT" / "LABELS" / "0000000.png").is_file()
    assert exit_code(syn.main, [str(out), *counts, "--benchmarks", "gta"]) == 2  # argparse choices
