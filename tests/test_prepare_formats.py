"""The prepare CLI on the new formats: SYNTHIA end to end, and a user's own format YAML with each
of its mistakes refused in one line (docs/benchmarks.md §4-§5)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image

from ssr.data.datasets import FolderDataset
from ssr.data.formats import (
    FormatError,
    check_num_classes,
    load_format,
    parse_format,
)
from ssr.data.raw_labels import decode

from helpers import (
    SYNTHIA_TABLE,
    mapped,
    prepare_fails,
    prepare_ok,
    write_png,
    write_synthia_label,
)

SYNTHIA_IGNORED = (0, 13, 14, 22, 23, 300)  # void, parking slot, road work, lane marking, unknowns
BUILTINS = ("gta5", "cityscapes", "synthia", "acdc", "acdc_flat", "darkzurich")


# --- 3. SYNTHIA end to end -----------------------------------------------------------------------

# Per frame: SYNTHIA ids as real frames have them (never 16/18/20: terrain, truck, train) with
# void (0), parking slot (13), road work (14) and lane marking (22) pixels.
SYNTHIA_FRAMES = (
    np.array([[3, 3, 3, 1], [1, 8, 8, 0], [3, 3, 13, 1]], np.uint16),
    np.array([[2, 2, 10, 22], [2, 2, 10, 1], [4, 4, 4, 14]], np.uint16),
    np.array([[11, 21, 5, 7], [15, 9, 6, 17], [19, 12, 0, 0]], np.uint16),
)


def make_synthia(root: Path) -> None:
    rng = np.random.default_rng(0)
    for i, ids in enumerate(SYNTHIA_FRAMES):
        write_png(root / "RGB" / f"{i:07d}.png", rng.integers(0, 255, (*ids.shape, 3), np.uint8))
        write_synthia_label(root / "GT" / "LABELS" / f"{i:07d}.png", ids)


def test_prepare_synthia_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "synthia"
    make_synthia(root)
    out = prepare_ok(["synthia", str(root), "--nproc", "1"], capsys)
    assert f"synthia: 3 label files ready in {root}" in out

    stats = json.loads((root / "sample_class_stats.json").read_text())
    stats_dict = json.loads((root / "sample_class_stats_dict.json").read_text())
    with_class = json.loads((root / "samples_with_class.json").read_text())
    present: set[str] = set()
    for i, ids in enumerate(SYNTHIA_FRAMES):
        rel = f"GT/LABELS/{i:07d}_labelTrainIds.png"
        with Image.open(root / rel) as im:
            assert im.mode == "L"
            train_ids = np.asarray(im)
        expected = mapped(ids, SYNTHIA_TABLE)
        np.testing.assert_array_equal(train_ids, expected)
        classes, counts = np.unique(expected[expected != 255], return_counts=True)
        counts_of = {str(c): int(n) for c, n in zip(classes, counts, strict=True)}
        assert stats[i] == {**counts_of, "file": rel}
        assert stats_dict[rel] == counts_of
        present |= set(counts_of)
    assert set(with_class) == present
    assert present.isdisjoint({"9", "14", "16", "255"})
    assert with_class["0"] == [["GT/LABELS/0000000_labelTrainIds.png", 5]]  # road: 5 px, frame 0

    # Rerun, then rerun from the labels alone: outputs are never taken for raw labels.
    written = {p: p.read_bytes() for p in (root / "GT" / "LABELS").glob("*_labelTrainIds.png")}
    assert f"synthia: 3 label files ready in {root}" in prepare_ok(["synthia", str(root)], capsys)
    for image in (root / "RGB").iterdir():
        image.unlink()
    (root / "RGB").rmdir()
    assert f"synthia: 3 label files ready in {root}" in prepare_ok(["synthia", str(root)], capsys)
    assert not list(root.rglob("*_labelTrainIds_labelTrainIds.png"))
    assert {p: p.read_bytes() for p in written} == written


def test_synthia_folder_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_synthia(tmp_path)
    prepare_ok(["synthia", str(tmp_path), "--nproc", "1"], capsys)
    ds = FolderDataset(tmp_path, "synthia")
    assert [p.name for p in ds.images] == ["0000000.png", "0000001.png", "0000002.png"]
    assert ds.labels is not None and ds.labels[2].name == "0000002_labelTrainIds.png"
    label = ds[2]["label"].numpy()
    np.testing.assert_array_equal(label, mapped(SYNTHIA_FRAMES[2], SYNTHIA_TABLE))


# --- 4. a user's own format ----------------------------------------------------------------------

CUSTOM_MAP = {10: 0, 20: 1, 30: 2}  # raw id -> train id; 0 is void
CUSTOM_NAMES = ["ground", "object", "sky"]


def custom_format(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "mine",
        "splits": {
            "train": {"images": "images/train", "labels": "labels/train"},
            "val": {"images": "images/val", "labels": "labels/val"},
        },
        "image_suffix": ".jpg",
        "label_suffix": "_trainIds.png",
        "classes": {
            "names": CUSTOM_NAMES,
            "palette": [[128, 64, 128], [0, 0, 142], [70, 130, 180]],
        },
        "raw_labels": {
            "suffix": ".png",
            "encoding": "index",
            "id_map": dict(CUSTOM_MAP),
            "void_ids": [0],
        },
        "rcs_split": "train",
        "label_size": "strict",
    }
    data.update(changes)
    return data


def write_format(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def make_custom(root: Path, n: int = 3, hw: tuple[int, int] = (10, 14)) -> dict[Path, np.ndarray]:
    """images/{split}/NNNN.jpg and labels/{split}/NNNN.png (grayscale raw ids 0, 10, 20, 30)."""
    rng = np.random.default_rng(3)
    raw = {}
    for split in ("train", "val"):
        for i in range(n):
            image = root / "images" / split / f"{i:04d}.jpg"
            image.parent.mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(image), rng.integers(0, 255, (*hw, 3), np.uint8))
            ids = rng.choice(np.array([0, 10, 20, 30], np.uint8), hw)
            raw[write_png(root / "labels" / split / f"{i:04d}.png", ids)] = ids
    return raw


@pytest.fixture
def custom(tmp_path: Path) -> tuple[Path, Path, dict[Path, np.ndarray]]:
    """(format YAML, dataset root, raw label -> raw ids) of a valid custom dataset."""
    root = tmp_path / "mine"
    raw = make_custom(root)
    return write_format(tmp_path / "mine.yaml", custom_format()), root, raw


def test_custom_format_prepares_and_reads(
    custom: tuple[Path, Path, dict[Path, np.ndarray]], capsys: pytest.CaptureFixture[str]
) -> None:
    fmt_path, root, raw = custom
    fmt = load_format(fmt_path)
    assert fmt.classes.names == tuple(CUSTOM_NAMES) and fmt.classes.num_classes == 3
    assert fmt.source == str(fmt_path) and fmt.rcs_split == "train"
    out = prepare_ok([str(fmt_path), str(root), "--num-classes", "3", "--nproc", "1"], capsys)
    assert f"mine: 6 label files ready in {root}" in out
    for src, ids in raw.items():
        converted = src.with_name(src.stem + "_trainIds.png")
        np.testing.assert_array_equal(np.asarray(Image.open(converted)), mapped(ids, CUSTOM_MAP))
    stats = json.loads((root / "sample_class_stats.json").read_text())
    assert [s["file"] for s in stats] == [f"labels/train/{i:04d}_trainIds.png" for i in range(3)]
    assert set(json.loads((root / "samples_with_class.json").read_text())) <= {"0", "1", "2"}

    for split in ("train", "val"):
        ds = FolderDataset(root, str(fmt_path), split)
        assert ds.num_classes == 3 and len(ds) == 3
        assert [p.name for p in ds.images] == ["0000.jpg", "0001.jpg", "0002.jpg"]
        item = ds[1]
        assert item["img"].shape == (3, 10, 14)
        ids = raw[root / "labels" / split / "0001.png"]
        np.testing.assert_array_equal(item["label"].numpy(), mapped(ids, CUSTOM_MAP))
        assert set(np.unique(item["label"].numpy())) <= {0, 1, 2, 255}


def _drop(*keys: str) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        for key in keys:
            del data[key]

    return edit


def _set(value: Any, *keys: str) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        node = data
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (_set("_x.png", "label_sufix"), ["unknown key", "label_sufix"]),
        (_drop("splits"), ["missing key 'splits'"]),
        (
            _set(
                {"images": ["images/train", "images/extra"], "labels": ["labels/train"]},
                "splits", "train",
            ),
            ["split 'train'", "2 image folders but 1 label folders"],
        ),
        (_set("png16", "raw_labels", "encoding"), ["raw_labels.encoding", "'png16'"]),
        (_set({10: 0, 20: 1, 30: 3}, "raw_labels", "id_map"), ["maps to 3", "0..2 or 255"]),
        (_set([[1, 2, 3], [4, 5, 6]], "classes", "palette"), ["classes.palette", "3 classes"]),
        (_set("R", "raw_labels", "chanel"), ["unknown raw_labels key", "chanel"]),
        (_set("val2", "rcs_split"), ["rcs_split 'val2'"]),
        (_set("align", "label_size"), ["label_size", "'align'"]),
    ],
    ids=[
        "unknown-key", "no-splits", "folder-counts", "encoding", "id-map-range", "palette-count",
        "unknown-raw-key", "rcs-split", "label-size",
    ],
)  # fmt: skip
def test_bad_format_yaml(
    edit: Callable[[dict[str, Any]], None],
    needles: list[str],
    custom: tuple[Path, Path, dict[Path, np.ndarray]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    fmt_path, root, _ = custom
    data = custom_format()
    edit(data)
    write_format(fmt_path, data)
    argv = [str(fmt_path), str(root), "--num-classes", "3", "--nproc", "1"]
    prepare_fails(argv, capsys, f"dataset format {fmt_path}:", *needles)
    assert not list(root.rglob("*_trainIds.png"))  # refused before touching the dataset


def test_unknown_label_value_with_void_ids(
    custom: tuple[Path, Path, dict[Path, np.ndarray]], capsys: pytest.CaptureFixture[str]
) -> None:
    fmt_path, root, raw = custom
    src = root / "labels" / "train" / "0001.png"
    ids = raw[src].copy()
    ids[0, 0] = 40
    write_png(src, ids)
    argv = [str(fmt_path), str(root), "--num-classes", "3", "--nproc", "1"]
    prepare_fails(argv, capsys, str(src), "holds id 40", "void_ids")
    # Without void_ids, unlisted ids are simply ignore.
    data = custom_format()
    del data["raw_labels"]["void_ids"]
    write_format(fmt_path, data)
    prepare_ok(argv, capsys)
    out = np.asarray(Image.open(src.with_name("0001_trainIds.png")))
    assert out[0, 0] == 255
    np.testing.assert_array_equal(out, mapped(ids, CUSTOM_MAP))


def test_size_mismatch_strict_names_both_files(
    custom: tuple[Path, Path, dict[Path, np.ndarray]], capsys: pytest.CaptureFixture[str]
) -> None:
    fmt_path, root, _ = custom
    image = root / "images" / "val" / "0002.jpg"
    assert cv2.imwrite(str(image), np.zeros((12, 14, 3), np.uint8))
    label = root / "labels" / "val" / "0002_trainIds.png"
    argv = [str(fmt_path), str(root), "--num-classes", "3", "--nproc", "1"]
    prepare_fails(
        argv, capsys, f"label {label} is 14x10", f"image {image} is 14x12", "label_size: keep"
    )
    write_format(fmt_path, custom_format(label_size="keep"))  # the same pair, allowed
    prepare_ok(argv, capsys)


def test_image_without_label_is_named(
    custom: tuple[Path, Path, dict[Path, np.ndarray]], capsys: pytest.CaptureFixture[str]
) -> None:
    fmt_path, root, _ = custom
    (root / "labels" / "train" / "0002.png").unlink()
    image = root / "images" / "train" / "0002.jpg"
    argv = [str(fmt_path), str(root), "--num-classes", "3", "--nproc", "1"]
    prepare_fails(argv, capsys, f"image {image} has no label")


def test_class_count_must_match_the_head(
    custom: tuple[Path, Path, dict[Path, np.ndarray]], capsys: pytest.CaptureFixture[str]
) -> None:
    fmt_path, root, _ = custom
    prepare_fails(
        [str(fmt_path), str(root), "--num-classes", "19"],
        capsys,
        "declares 3 classes",
        "head has 19",
        "model.decode_head.num_classes=3",
    )
    prepare_fails(
        [str(fmt_path), str(root)], capsys, "model.decode_head.num_classes=3"
    )  # default 19
    assert not list(root.rglob("*_trainIds.png"))
    check_num_classes(load_format(fmt_path), 3)
    check_num_classes(load_format("synthia"))  # 19 by default
    with pytest.raises(FormatError, match="declares 19 classes but the model's head has 16"):
        check_num_classes(load_format("synthia"), 16)


def test_duplicate_base_names_with_rcs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "nested"
    for sub in ("a", "b"):
        assert cv2.imwrite(
            str(_mkdir(root / "images" / "train" / sub) / "x.jpg"), np.zeros((4, 6, 3), np.uint8)
        )
        write_png(root / "labels" / "train" / sub / "x.png", np.full((4, 6), 10, np.uint8))
    splits = {"train": {"images": "images/train", "labels": "labels/train"}}
    fmt_path = write_format(tmp_path / "nested.yaml", custom_format(splits=splits))
    argv = [str(fmt_path), str(root), "--num-classes", "3", "--nproc", "1"]
    prepare_fails(
        argv, capsys, "labels/train/a/x_trainIds.png", "labels/train/b/x_trainIds.png", "base name"
    )
    assert not (root / "sample_class_stats.json").exists()
    data = custom_format(splits=splits)
    del data["rcs_split"]  # without statistics, the same names are fine
    write_format(fmt_path, data)
    prepare_ok(argv, capsys)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_format_names_and_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data").mkdir()
    missing = tmp_path / "nope.yaml"
    prepare_fails([str(missing), str(tmp_path / "data")], capsys, str(missing), "does not exist")
    err = prepare_fails(
        ["synthia2", str(tmp_path / "data")], capsys, "unknown dataset format 'synthia2'"
    )
    for name in BUILTINS:
        assert name in err
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: mine\nsplits: {train: [images\n")
    prepare_fails([str(broken), str(tmp_path / "data")], capsys, str(broken), "not valid YAML")
    listing = tmp_path / "list.yaml"
    listing.write_text("- name\n- splits\n")
    prepare_fails(
        [str(listing), str(tmp_path / "data")], capsys, str(listing), "must hold a mapping"
    )


COLOR_MAP = [[[128, 64, 128], 0], [[0, 0, 142], 1], [[70, 130, 180], 2], [[0, 0, 0], 255]]


def test_color_encoding(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw_spec = {"suffix": "_color.png", "encoding": "color", "color_map": COLOR_MAP}
    splits = {"train": {"images": "images", "labels": "labels"}}
    fmt_path = write_format(
        tmp_path / "color.yaml", custom_format(raw_labels=raw_spec, splits=splits)
    )
    fmt = load_format(fmt_path)
    colors = np.array([[128, 64, 128], [0, 0, 142], [70, 130, 180], [0, 0, 0]], np.uint8)
    pick = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [0, 0, 1, 1]])
    root = tmp_path / "data"
    assert cv2.imwrite(str(_mkdir(root / "images") / "f.jpg"), np.zeros((3, 4, 3), np.uint8))
    src = write_png(root / "labels" / "f_color.png", colors[pick])
    expected = np.array([0, 1, 2, 255], np.uint8)[pick]
    np.testing.assert_array_equal(decode(src, fmt.raw_labels), expected)
    argv = [str(fmt_path), str(root), "--num-classes", "3", "--nproc", "1"]
    prepare_ok(argv, capsys)
    np.testing.assert_array_equal(
        np.asarray(Image.open(root / "labels" / "f_trainIds.png")), expected
    )

    odd = colors[pick].copy()
    odd[2, 3] = (1, 2, 3)
    write_png(src, odd)
    (root / "labels" / "f_trainIds.png").unlink()
    prepare_fails(argv, capsys, str(src), "colour [1, 2, 3]", "color_map")


def test_color_encoding_needs_a_color_map(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="color needs color_map"):
        parse_format(custom_format(raw_labels={"suffix": ".png", "encoding": "color"}), "x")


# Malformed values: one line naming the key, never a traceback or silently wrong train ids.


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (_set([128, 64, 128], "classes", "palette"), "classes.palette"),
        (_set({10: "ground", 20: 1, 30: 2}, "raw_labels", "id_map"), "raw_labels.id_map"),
        (_set([10, 20, 30], "raw_labels", "id_map"), "raw_labels.id_map"),
    ],
    ids=["flat-palette", "id-map-names", "id-map-list"],
)
def test_malformed_values_are_one_line_errors(
    edit: Callable[[dict[str, Any]], None],
    needle: str,
    custom: tuple[Path, Path, dict[Path, np.ndarray]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    """parse_format's contract: "every mistake is one line naming the key" (exit 2, not a
    traceback)."""
    fmt_path, root, _ = custom
    data = custom_format()
    edit(data)
    write_format(fmt_path, data)
    prepare_fails([str(fmt_path), str(root), "--num-classes", "3", "--nproc", "1"], capsys, needle)


def test_color_map_entry_without_three_channels_is_refused() -> None:
    raw_spec = {"suffix": "_c.png", "encoding": "color", "color_map": [[[1, 2], 0]]}
    with pytest.raises(FormatError, match="color_map"):
        parse_format(custom_format(raw_labels=raw_spec), "x")


def test_negative_raw_id_is_refused() -> None:
    """id_map {-1: 0} (Cityscapes' table lists license plate as -1) would index the lookup table
    from its end and make raw id 255 class 0."""
    raw_spec = {"suffix": "_r.png", "encoding": "index", "id_map": {-1: 0, 10: 1}}
    with pytest.raises(FormatError, match=r"raw_labels.id_map id must be an integer in 0..65535"):
        parse_format(custom_format(raw_labels=raw_spec), "x")


def test_raw_suffix_equal_to_label_suffix_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Raw labels named like the outputs would be taken for converted ones (raw ids passed off as
    train ids) or overwritten in place."""
    raw_spec = {"suffix": "_trainIds.png", "encoding": "index", "id_map": {0: 2, 1: 0, 2: 1}}
    fmt_path = write_format(tmp_path / "same.yaml", custom_format(raw_labels=raw_spec))
    argv = [str(fmt_path), str(tmp_path / "data"), "--num-classes", "3"]
    prepare_fails(argv, capsys, "raw_labels.suffix '_trainIds.png' ends with label_suffix")


def test_statistics_of_another_format_are_not_replaced(
    custom: tuple[Path, Path, dict[Path, np.ndarray]], capsys: pytest.CaptureFixture[str]
) -> None:
    """Preparing a folder with a second format would replace the first one's RCS statistics (and
    break its training): refused before anything is written."""
    fmt_path, root, _ = custom
    foreign = [{"0": 5, "file": "labels/train/0000_labelTrainIds.png"}]
    (root / "sample_class_stats.json").write_text(json.dumps(foreign))
    argv = [str(fmt_path), str(root), "--num-classes", "3", "--nproc", "1"]
    prepare_fails(argv, capsys, "0000_labelTrainIds.png", "prepare a copy")
    assert not list(root.rglob("*_trainIds.png"))
    assert json.loads((root / "sample_class_stats.json").read_text()) == foreign
