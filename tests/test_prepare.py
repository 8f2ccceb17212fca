"""The label preparation CLI (docs/method.md §4.2, §7.2, §7.4) on tiny GTA5/Cityscapes trees."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssr.data import prepare
from ssr.data.labels import TRAIN_ID_TO_LABEL_ID

from helpers import FIXTURES, exit_code, prepare_fails, run_cli

CS_FRAME = "frankfurt_000000_000294"


def gta_palette() -> list[int]:
    """GTA5's label palette (index = Cityscapes label id) as PIL's flat 768-value list."""
    flat = [0] * 768
    with open(FIXTURES / "gta5_label_palette.csv") as f:
        for row in csv.DictReader(f):
            i = int(row["gta_label_index"])
            flat[3 * i : 3 * i + 3] = [int(row[f"cityscapes_{c}"]) for c in "rgb"]
    return flat


def label_id_map(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Random label ids: road (7) background, blocks of car (26), static (4), person (24), 0."""
    ids = np.full(shape, 7, dtype=np.uint8)
    for label_id in (26, 4, 24, 0, 33):
        y, x = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
        ids[y : y + rng.integers(2, 8), x : x + rng.integers(2, 12)] = label_id
    return ids


def write_gta_raw(root: Path, palette: list[int], n: int = 4, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    id_maps = []
    for i in range(1, n + 1):
        ids = label_id_map(rng, (24, 40))
        lbl = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.tobytes())  # index = id
        lbl.putpalette(palette)
        lbl.save(root / "labels" / f"{i:05d}.png")
        Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(
            root / "images" / f"{i:05d}.png"
        )
        id_maps.append(ids)
    return id_maps


def expected_train_ids(ids: np.ndarray) -> np.ndarray:
    out = np.full_like(ids, 255)
    for train_id, label_id in enumerate(TRAIN_ID_TO_LABEL_ID):
        out[ids == label_id] = train_id
    return out


@pytest.fixture
def gta_raw(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    root = tmp_path / "gta"
    return root, write_gta_raw(root, gta_palette())


def test_palette_png_is_decoded_by_index(gta_raw: tuple[Path, list[np.ndarray]]) -> None:
    root, _ = gta_raw
    with Image.open(root / "labels" / "00001.png") as im:
        assert im.mode == "P"
        # GTA colours "static" (id 4) (20, 20, 20), unlike cityscapesScripts' black.
        assert im.getpalette()[12:15] == [20, 20, 20]


def test_gta5_conversion_and_rcs_statistics(gta_raw: tuple[Path, list[np.ndarray]]) -> None:
    root, id_maps = gta_raw
    (root / "labels" / "preview.png").write_bytes(b"not a label, and not NNNNN.png")
    assert exit_code(prepare.main, ["gta5", str(root), "--nproc", "1"]) == 0

    stats = json.loads((root / "sample_class_stats.json").read_text())
    stats_dict = json.loads((root / "sample_class_stats_dict.json").read_text())
    with_class = json.loads((root / "samples_with_class.json").read_text())
    assert len(stats) == len(id_maps)
    for i, ids in enumerate(id_maps, start=1):
        out = root / "labels" / f"{i:05d}_labelTrainIds.png"
        with Image.open(out) as im:
            assert im.mode == "L"
            train_ids = np.asarray(im)
        np.testing.assert_array_equal(train_ids, expected_train_ids(ids))
        classes, counts = np.unique(train_ids[train_ids != 255], return_counts=True)
        expected = {str(c): int(n) for c, n in zip(classes, counts, strict=True)}
        rel = f"labels/{i:05d}_labelTrainIds.png"
        assert stats[i - 1] == {**expected, "file": rel}
        assert stats_dict[rel] == expected
        for c, n in expected.items():
            assert [rel, n] in with_class[c]
    # Static (4), id 0 and bicycle-free maps: only mapped ids are counted, never 255.
    assert set(with_class) <= {str(c) for c in range(19)}
    assert not list(root.rglob("*.tmp"))
    assert not (root / "labels" / "preview_labelTrainIds.png").exists()


def test_rerun_skips_finished_files_and_repairs_missing_ones(
    gta_raw: tuple[Path, list[np.ndarray]],
) -> None:
    root, _ = gta_raw
    assert exit_code(prepare.main, ["gta5", str(root), "--nproc", "1"]) == 0
    done = root / "labels" / "00001_labelTrainIds.png"
    gone = root / "labels" / "00002_labelTrainIds.png"
    os.utime(done, ns=(1, 1))
    content = gone.read_bytes()
    stats = (root / "sample_class_stats.json").read_text()
    gone.unlink()
    assert exit_code(prepare.main, ["gta5", str(root), "--nproc", "1"]) == 0
    assert done.stat().st_mtime_ns == 1  # not rewritten
    assert gone.read_bytes() == content
    assert (root / "sample_class_stats.json").read_text() == stats


def test_pool_gives_the_same_result(tmp_path: Path) -> None:
    palette = gta_palette()
    one, two = tmp_path / "one", tmp_path / "two"
    write_gta_raw(one, palette, n=6)
    write_gta_raw(two, palette, n=6)
    assert exit_code(prepare.main, ["gta5", str(one), "--nproc", "1"]) == 0
    assert exit_code(prepare.main, ["gta5", str(two), "--nproc", "2"]) == 0
    for name in ("sample_class_stats.json", "samples_with_class.json"):
        assert (one / name).read_text() == (two / name).read_text()


def test_cityscapes_all_splits(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    written = {}
    for split in ("train", "val", "test"):
        folder = tmp_path / "gtFine" / split / "city"
        folder.mkdir(parents=True)
        ids = rng.integers(0, 34, (16, 32), dtype=np.uint8)
        Image.fromarray(ids).save(folder / f"city_000000_00000{len(written)}_gtFine_labelIds.png")
        written[split] = (folder, ids)
    assert exit_code(prepare.main, ["cityscapes", str(tmp_path), "--nproc", "1"]) == 0
    for folder, ids in written.values():
        (out,) = folder.glob("*_gtFine_labelTrainIds.png")
        np.testing.assert_array_equal(np.asarray(Image.open(out)), expected_train_ids(ids))


def test_cityscapes_real_fixture_matches_official_train_ids(
    tmp_path: Path, shared_fixtures: Path
) -> None:
    src = shared_fixtures / "cityscapes" / "gtFine" / "val" / "frankfurt"
    dst = tmp_path / "gtFine" / "val" / "frankfurt"
    dst.mkdir(parents=True)
    shutil.copy(src / f"{CS_FRAME}_gtFine_labelIds.png", dst)
    assert exit_code(prepare.main, ["cityscapes", str(tmp_path), "--nproc", "1"]) == 0
    ours = np.asarray(Image.open(dst / f"{CS_FRAME}_gtFine_labelTrainIds.png"))
    official = np.asarray(Image.open(src / f"{CS_FRAME}_gtFine_labelTrainIds.png"))
    # The fixture's two files were downscaled independently: 77 of 32768 pixels differ.
    assert ours.shape == official.shape == (128, 256)
    assert (ours != official).sum() <= 77


def test_bad_inputs_exit_2_with_one_line(
    tmp_path: Path, gta_raw: tuple[Path, list[np.ndarray]], capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope"
    prepare_fails(["gta5", str(missing), "--nproc", "1"], capsys, str(missing), "does not exist")
    (tmp_path / "empty").mkdir()
    prepare_fails(["gta5", str(tmp_path / "empty")], capsys, "labels", "does not exist")
    prepare_fails(["cityscapes", str(tmp_path / "empty")], capsys, "gtFine", "does not exist")
    (tmp_path / "empty" / "labels").mkdir()
    prepare_fails(["gta5", str(tmp_path / "empty")], capsys, "no label files")
    (tmp_path / "empty" / "gtFine" / "train" / "x").mkdir(parents=True)
    prepare_fails(["cityscapes", str(tmp_path / "empty")], capsys, "_gtFine_labelIds.png")

    root, _ = gta_raw
    corrupt = root / "labels" / "00003.png"
    corrupt.write_bytes(b"\x89PNG truncated")
    prepare_fails(["gta5", str(root), "--nproc", "1"], capsys, str(corrupt), "cannot read")
    Image.new("RGB", (40, 24), (128, 64, 128)).save(corrupt)  # a colour-coded label
    prepare_fails(["gta5", str(root), "--nproc", "2"], capsys, str(corrupt), "mode RGB")
    assert not list(root.rglob("*.tmp"))


def test_cli_prints_what_it_did(
    gta_raw: tuple[Path, list[np.ndarray]], capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = gta_raw
    assert exit_code(prepare.main, ["gta5", str(root), "--nproc", "1"]) == 0
    assert f"gta5: 4 label files ready in {root}" in capsys.readouterr().out
    assert (root / "samples_with_class.json").is_file()


def test_module_cli_in_a_subprocess(tmp_path: Path) -> None:
    """`python -m ssr.data.prepare`: a user error is exit status 2 and one line on stderr."""
    proc = run_cli(
        "ssr.data.prepare", "cityscapes", str(tmp_path / "absent"), cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "absent" in err
