"""Dataset formats (ssr.data.formats) and raw label decoding (ssr.data.raw_labels): the official
id tables, SYNTHIA's 16-bit labels, and the built-in ACDC / Dark Zurich layouts read by
`FolderDataset`. A user's own formats and the prepare CLI on them: tests/test_prepare_formats.py.

The official tables are written here (and in helpers.SYNTHIA_TABLE) from the datasets'
documentation, not imported from the code under test, so a wrong entry in the code fails them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from ssr.data.datasets import DatasetError, FolderDataset
from ssr.data.formats import (
    FormatError,
    builtin_formats,
    load_format,
    resolve_eval_subsets,
)
from ssr.data.raw_labels import RawLabelError, decode, read_channel16, read_index_png
from ssr.errors import ConfigError

from helpers import (
    SYNTHIA_TABLE,
    mapped,
    prepare_ok,
    write_png,
    write_synthia_label,
)

# --- the official tables -------------------------------------------------------------------------

SYNTHIA_IGNORED = (0, 13, 14, 22, 23, 300)  # void, parking slot, road work, lane marking, unknowns
# Cityscapes label id of train id t (cityscapesScripts' labels.py).
CS_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
CS_TABLE = {label_id: t for t, label_id in enumerate(CS_LABEL_IDS)}
MIOU16 = (0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 15, 17, 18)
MIOU13 = tuple(c for c in MIOU16 if c not in (3, 4, 5))
BUILTINS = ("gta5", "cityscapes", "synthia", "acdc", "acdc_flat", "darkzurich")
ACDC_CONDITIONS = ("fog", "night", "rain", "snow")


# --- 1. mappings against the official tables -----------------------------------------------------


def test_synthia_id_map_is_the_official_table() -> None:
    raw = load_format("synthia").raw_labels
    assert raw is not None
    assert dict(raw.id_map) == SYNTHIA_TABLE
    assert raw.encoding == "channel16" and raw.channel == "R" and raw.channel_index == 2
    assert sorted(SYNTHIA_TABLE.values()) == list(range(19))  # the table itself: a bijection


def test_synthia_decoding_gives_the_official_table(tmp_path: Path) -> None:
    ids = np.array(
        [list(SYNTHIA_TABLE)[:10], [*list(SYNTHIA_TABLE)[10:], 0], [*SYNTHIA_IGNORED, 3, 4, 2, 21]],
        np.uint16,
    )
    path = write_synthia_label(tmp_path / "label.png", ids)
    out = decode(path, load_format("synthia").raw_labels)
    assert out.dtype == np.uint8 and out.shape == ids.shape
    np.testing.assert_array_equal(out, mapped(ids, SYNTHIA_TABLE))
    for raw_id, train_id in SYNTHIA_TABLE.items():
        assert (out[ids == raw_id] == train_id).all(), raw_id
    for raw_id in SYNTHIA_IGNORED:  # 300 > 255: needs the 16-bit lookup, not a wrapped 44
        assert (out[ids == raw_id] == 255).all(), raw_id
    assert out[2, 5] == 255 and out[2, 6] == 0  # 300 and road (3)


@pytest.mark.parametrize("name", ["gta5", "cityscapes"])
def test_cityscapes_label_ids_to_train_ids(name: str, tmp_path: Path) -> None:
    raw = load_format(name).raw_labels
    assert raw is not None and raw.encoding == "index"
    assert dict(raw.id_map) == CS_TABLE
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    # GTA5 labels are palette PNGs (read by index, whatever the colours), Cityscapes' grayscale.
    if name == "gta5":
        im = Image.frombytes("P", (16, 16), ids.tobytes())
        im.putpalette([255 - (i % 256) for i in range(768)])
    else:
        im = Image.fromarray(ids)
    im.save(tmp_path / "label.png")
    out = decode(tmp_path / "label.png", raw)
    np.testing.assert_array_equal(out, mapped(ids, CS_TABLE))
    assert [int(out.flat[lid]) for lid in CS_LABEL_IDS] == list(range(19))
    assert int((out != 255).sum()) == 19


def test_synthia_eval_subsets() -> None:
    subsets = resolve_eval_subsets("synthia")
    assert subsets == {"mIoU16": MIOU16, "mIoU13": MIOU13}
    assert len(subsets["mIoU16"]) == 16 and len(subsets["mIoU13"]) == 13
    assert set(MIOU16) == set(range(19)) - {9, 14, 16}  # no terrain, truck, train
    assert resolve_eval_subsets(None) == {}
    assert resolve_eval_subsets({"mIoU2": [0, "13"]}) == {"mIoU2": (0, 13)}
    with pytest.raises(ConfigError, match="eval_subsets='cityscapes'"):
        resolve_eval_subsets("cityscapes")
    with pytest.raises(ConfigError, match=r"eval_subsets=\[1, 2\]"):  # a list, not a mapping
        resolve_eval_subsets([1, 2])


# --- 2. 16-bit decoding --------------------------------------------------------------------------


@pytest.fixture
def synthia_label(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    ids = np.array([[3, 3, 1, 1, 8, 8], [2, 2, 10, 0, 22, 11], [21, 5, 7, 15, 9, 6]], np.uint16)
    instances = (1000 + np.arange(ids.size) * 150).reshape(ids.shape).astype(np.uint16)
    assert instances.min() == 1000 and instances.max() <= 4000
    return write_synthia_label(tmp_path / "0000000.png", ids, instances), ids, instances


def test_channel16_decodes_the_r_channel(
    synthia_label: tuple[Path, np.ndarray, np.ndarray],
) -> None:
    path, ids, instances = synthia_label
    np.testing.assert_array_equal(read_channel16(path, 2), ids)  # PNG R = OpenCV index 2
    np.testing.assert_array_equal(read_channel16(path, 1), instances)
    assert read_channel16(path, 2).dtype == np.uint16
    out = decode(path, load_format("synthia").raw_labels)
    expected = np.array(
        [[0, 0, 10, 10, 13, 13], [2, 2, 11, 255, 255, 18], [3, 4, 5, 6, 7, 8]], np.uint8
    )
    np.testing.assert_array_equal(out, expected)


def test_pillow_cannot_read_synthia_labels(
    synthia_label: tuple[Path, np.ndarray, np.ndarray],
) -> None:
    """Why a 16-bit decoder: Pillow (on this machine) opens the file as 8-bit RGB keeping only
    each value's high byte, so the class ids (< 256) all read as 0."""
    path, ids, instances = synthia_label
    with Image.open(path) as im:
        mode = im.mode
        pixels = np.asarray(im)
    assert mode == "RGB" and mode != "I;16" and pixels.dtype == np.uint8
    assert not np.array_equal(pixels[..., 0], ids)
    assert (pixels[..., 0] == 0).all() and (ids > 0).sum() == 17  # every class id reads as 0
    np.testing.assert_array_equal(pixels[..., 0], ids >> 8)  # the high bytes
    np.testing.assert_array_equal(pixels[..., 1], instances >> 8)  # instance ids lost too
    with pytest.raises(RawLabelError, match="mode RGB"):  # the index decoder refuses it
        read_index_png(path)


@pytest.mark.parametrize("kind", ["8-bit RGB", "16-bit gray", "missing"])
def test_channel16_refuses_other_files(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "GT" / "LABELS" / "0000000.png"
    path.parent.mkdir(parents=True)
    if kind == "8-bit RGB":
        Image.new("RGB", (6, 4), (3, 0, 0)).save(path)
    elif kind == "16-bit gray":
        assert cv2.imwrite(str(path), np.full((4, 6), 3, np.uint16))
    with pytest.raises(RawLabelError) as info:
        decode(path, load_format("synthia").raw_labels)
    message = str(info.value)
    assert str(path) in message and len(message.splitlines()) == 1
    assert ("16-bit 3-channel" if kind != "missing" else "cannot read") in message


# --- 5. built-in formats -------------------------------------------------------------------------


def test_builtin_formats_load() -> None:
    assert set(BUILTINS) <= set(builtin_formats())
    for name in BUILTINS:
        fmt = load_format(name)
        assert fmt.name == name and fmt.source == name
        assert fmt.classes.num_classes == 19 and fmt.classes.names[18] == "bicycle"
    assert {n: load_format(n).rcs_split for n in BUILTINS} == {
        "gta5": "train", "cityscapes": "train", "synthia": "train",
        "acdc": None, "acdc_flat": None, "darkzurich": None,
    }  # fmt: skip
    assert {n: load_format(n).label_size for n in BUILTINS} == {
        "gta5": "keep", "cityscapes": "strict", "synthia": "strict",
        "acdc": "strict", "acdc_flat": "strict", "darkzurich": "strict",
    }  # fmt: skip
    for name in ("acdc", "acdc_flat", "darkzurich"):  # labels already are train ids
        assert load_format(name).raw_labels is None
    synthia = load_format("synthia")
    assert synthia.splits["train"].images == ("RGB",)
    assert synthia.splits["train"].labels == ("GT/LABELS",)


def test_acdc_splits() -> None:
    fmt = load_format("acdc")
    assert set(fmt.splits) == {"train", "val", "test"}
    for split in ("train", "val", "test"):
        dirs = fmt.split(split)
        assert dirs.images == tuple(f"rgb_anon/{c}/{split}" for c in ACDC_CONDITIONS)
        if split == "test":
            assert dirs.labels is None
        else:
            assert dirs.labels == tuple(f"gt/{c}/{split}" for c in ACDC_CONDITIONS)
    assert (fmt.image_suffix, fmt.label_suffix) == ("_rgb_anon.png", "_gt_labelTrainIds.png")
    with pytest.raises(FormatError, match="has no split 'train_ref'; it has train, val, test"):
        fmt.split("train_ref")


def test_darkzurich_splits() -> None:
    fmt = load_format("darkzurich")
    assert fmt.split("train").images == ("rgb_anon/train/night",)
    assert fmt.split("train").labels is None
    assert (fmt.split("val").images, fmt.split("val").labels) == (("rgb_anon/val",), ("gt/val",))
    assert fmt.split("test").labels is None


@pytest.mark.parametrize(
    ("name", "split", "image", "label"),
    [
        (
            "acdc", "val",
            "rgb_anon/fog/val/GOPR0475/GOPR0475_frame_000041_rgb_anon.png",
            "gt/fog/val/GOPR0475/GOPR0475_frame_000041_gt_labelTrainIds.png",
        ),
        (
            "acdc", "train",
            "rgb_anon/snow/train/GOPR0122/GOPR0122_frame_000161_rgb_anon.png",
            "gt/snow/train/GOPR0122/GOPR0122_frame_000161_gt_labelTrainIds.png",
        ),
        (
            "darkzurich", "val",
            "rgb_anon/val/night/GOPR0356/GOPR0356_frame_000001_rgb_anon.png",
            "gt/val/night/GOPR0356/GOPR0356_frame_000001_gt_labelTrainIds.png",
        ),
        (
            "acdc_flat", "val",
            "rgb_anon/val/GOPR0475/GOPR0475_frame_000041_rgb_anon.png",
            "gt/val/GOPR0475/GOPR0475_frame_000041_gt_labelTrainIds.png",
        ),
        ("gta5", "train", "images/00001.png", "labels/00001_labelTrainIds.png"),
        ("synthia", "train", "RGB/0000042.png", "GT/LABELS/0000042_labelTrainIds.png"),
        (
            "cityscapes", "val",
            "leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png",
            "gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelTrainIds.png",
        ),
    ],
)  # fmt: skip
def test_label_path_pairing(name: str, split: str, image: str, label: str, tmp_path: Path) -> None:
    fmt = load_format(name)
    assert fmt.label_path(tmp_path, split, tmp_path / image) == tmp_path / label


def test_label_path_raw_suffix_and_outside_image() -> None:
    root = Path("/data/cs")
    cs = load_format("cityscapes")
    image = root / "leftImg8bit/train/bonn/bonn_000000_000019_leftImg8bit.png"
    assert cs.label_path(root, "train", image, "_gtFine_labelIds.png") == (
        root / "gtFine/train/bonn/bonn_000000_000019_gtFine_labelIds.png"
    )
    with pytest.raises(ValueError, match="none of the image folders of split val"):
        cs.label_path(root, "val", image)


# --- 6. FolderDataset on ACDC / Dark Zurich trees ------------------------------------------------


def make_acdc(root: Path) -> dict[str, list[tuple[Path, np.ndarray | None]]]:
    """The zips' layout (conditions written out of order) with distractors: reference images,
    label ids and colour labels next to the train ids. Returns split -> sorted (image, label)."""
    rng = np.random.default_rng(5)
    pairs: dict[str, list[tuple[Path, np.ndarray | None]]] = {"train": [], "val": [], "test": []}
    for k, cond in enumerate(("snow", "fog", "rain", "night")):
        for split in ("val", "train", "test"):
            for seq, frames in (
                (f"GOPR0{k}{len(split)}1", (7, 2)),
                (f"GOPR0{k}{len(split)}0", (5,)),
            ):
                for frame in frames:
                    stem = f"{seq}_frame_{frame:06d}"
                    image = root / "rgb_anon" / cond / split / seq / f"{stem}_rgb_anon.png"
                    write_png(image, rng.integers(0, 255, (6, 8, 3), np.uint8))
                    ref = (
                        root / "rgb_anon" / cond / f"{split}_ref" / seq / f"{stem}_rgb_ref_anon.png"
                    )
                    write_png(ref, np.zeros((6, 8, 3), np.uint8))
                    label = None
                    if split != "test":
                        label = rng.choice(np.array([0, 8, 10, 13, 255], np.uint8), (6, 8))
                        gt = root / "gt" / cond / split / seq
                        write_png(gt / f"{stem}_gt_labelTrainIds.png", label)
                        write_png(gt / f"{stem}_gt_labelIds.png", np.full((6, 8), 33, np.uint8))
                    pairs[split].append((image, label))
    return {s: sorted(p, key=lambda pair: str(pair[0])) for s, p in pairs.items()}


@pytest.fixture(scope="module")
def acdc(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[Any]]]:
    root = tmp_path_factory.mktemp("acdc")
    return root, make_acdc(root)


def test_acdc_val_reads_all_conditions_sorted(acdc: tuple[Path, dict[str, list[Any]]]) -> None:
    root, pairs = acdc
    ds = FolderDataset(root, "acdc", "val")
    assert ds.images == [image for image, _ in pairs["val"]] and len(ds) == 12
    assert [p.parts[-4] for p in ds.images[::3]] == ["fog", "night", "rain", "snow"]
    assert ds.images == sorted(ds.images)
    assert ds.labels is not None
    for i, (image, label) in enumerate(pairs["val"]):
        rel = image.relative_to(root / "rgb_anon").as_posix().replace("_rgb_anon.png", "")
        assert ds.labels[i] == root / "gt" / f"{rel}_gt_labelTrainIds.png"
        np.testing.assert_array_equal(ds[i]["label"].numpy(), label)
    ds.check_pairs()


def test_acdc_train_and_test(acdc: tuple[Path, dict[str, list[Any]]]) -> None:
    root, pairs = acdc
    train = FolderDataset(root, "acdc", "train", label=False)
    assert train.images == [image for image, _ in pairs["train"]] and train.labels is None
    assert not any("_ref" in str(p) for p in train.images)
    assert "label" not in train[0]
    with pytest.raises(DatasetError) as info:
        FolderDataset(root, "acdc", "test")
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert "split test of dataset format acdc has no labels" in message
    test = FolderDataset(root, "acdc", "test", label=False)
    assert test.images == [image for image, _ in pairs["test"]]
    assert {p.parts[-4] for p in test.images} == set(ACDC_CONDITIONS)


def test_prepare_checks_acdc(
    acdc: tuple[Path, dict[str, list[Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    root, pairs = acdc
    out = prepare_ok(["acdc", str(root), "--nproc", "1"], capsys)
    assert f"acdc: {len(pairs['train']) + len(pairs['val'])} label files ready in {root}" in out
    assert not (root / "sample_class_stats.json").exists()  # no rcs_split: no statistics


def test_darkzurich_train_is_night_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    written: dict[str, list[Path]] = {}
    for time, seq in (("day", "GOPR0351"), ("night", "GOPR0348"), ("twilight", "GOPR0353")):
        for frame in (3, 1):
            image = (
                tmp_path / "rgb_anon/train" / time / seq / f"{seq}_frame_{frame:06d}_rgb_anon.png"
            )
            written.setdefault(time, []).append(
                write_png(image, rng.integers(0, 255, (4, 6, 3), np.uint8))
            )
    val = tmp_path / "rgb_anon/val/night/GOPR0356/GOPR0356_frame_000001_rgb_anon.png"
    write_png(val, np.zeros((4, 6, 3), np.uint8))
    label = np.array([[0, 1, 2, 255, 18, 0]] * 4, np.uint8)
    write_png(tmp_path / "gt/val/night/GOPR0356/GOPR0356_frame_000001_gt_labelTrainIds.png", label)

    train = FolderDataset(tmp_path, "darkzurich", "train", label=False)
    assert train.images == sorted(written["night"])
    with pytest.raises(
        DatasetError, match="split train of dataset format darkzurich has no labels"
    ):
        FolderDataset(tmp_path, "darkzurich", "train")
    ds = FolderDataset(tmp_path, "darkzurich", "val")
    assert ds.images == [val]
    np.testing.assert_array_equal(ds[0]["label"].numpy(), label)


def test_folder_dataset_missing_label_names_the_image(
    acdc: tuple[Path, dict[str, list[Any]]], tmp_path: Path
) -> None:
    root, pairs = acdc
    image, _ = pairs["val"][5]
    copy = tmp_path / "acdc"
    for src, _ in pairs["val"]:
        write_png(copy / src.relative_to(root), np.asarray(Image.open(src)))
        rel = src.relative_to(root / "rgb_anon").as_posix().replace("_rgb_anon.png", "")
        if src != image:
            gt = root / "gt" / f"{rel}_gt_labelTrainIds.png"
            write_png(copy / gt.relative_to(root), np.asarray(Image.open(gt)))
    with pytest.raises(DatasetError) as info:
        FolderDataset(copy, "acdc", "val")
    message = str(info.value)
    assert len(message.splitlines()) == 1
    assert f"image {copy / image.relative_to(root)} has no label" in message
