"""Synthetic domain-shift dataset (ssr.data.synthetic): on-disk formats, class coverage,
determinism, a real appearance gap with an unchanged layout, and the CLI's handling of OUT."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssr.data import synthetic as syn
from ssr.data.labels import CLASSES, IGNORE_INDEX, NUM_CLASSES, label_ids_to_train_ids

from helpers import FIXTURES, exit_code, run_cli

SMALL = {"num_source": 4, "num_target_train": 3, "num_target_val": 2}
USED_IDS = {int(i) for i in syn.Lid}
NOT_EVALUATED = {0, 1, 3, 4}  # unlabeled, ego vehicle, out of roi, static
RARE = ("wall", "fence", "rider", "truck", "bus", "motorcycle", "bicycle")
CS_NAME = re.compile(r"^([a-z]+)_(\d{6})_(\d{6})_leftImg8bit\.png$")


@pytest.fixture(scope="module")
def small_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "data"
    assert syn.generate(out, seed=0, **SMALL)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_gta_raw_format(small_set: Path) -> None:
    images = sorted((small_set / "gta" / "images").iterdir())
    labels = sorted((small_set / "gta" / "labels").iterdir())
    names = [f"{i:05d}.png" for i in range(1, 5)]
    assert [p.name for p in images] == names and [p.name for p in labels] == names
    flat_palette = [c for rgb in syn.GTA_LABEL_PALETTE for c in rgb]
    for i, (img_path, lbl_path) in enumerate(zip(images, labels, strict=True)):
        img, lbl = Image.open(img_path), Image.open(lbl_path)
        assert img.mode == "RGB" and img.size == (320, 176)
        assert lbl.mode == "P" and lbl.size == img.size
        assert lbl.getpalette()[: len(flat_palette)] == flat_palette
        index = np.asarray(lbl)
        # The raw palette index is the Cityscapes label id, exactly what the scene was drawn with.
        np.testing.assert_array_equal(index, syn.make_sample("source", "train", i)[1])
        assert set(np.unique(index).tolist()) <= USED_IDS and 7 in index
    assert syn.GTA_LABEL_PALETTE[4] == (20, 20, 20)  # GTA5's "static", unlike cityscapesScripts


def test_palette_matches_the_real_gta5_palette() -> None:
    with open(FIXTURES / "gta5_label_palette.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    expected = [
        (int(r["cityscapes_r"]), int(r["cityscapes_g"]), int(r["cityscapes_b"]))
        for r in sorted(rows, key=lambda r: int(r["gta_label_index"]))
    ]
    assert list(syn.GTA_LABEL_PALETTE) == expected


def test_cityscapes_raw_format(small_set: Path) -> None:
    cs = small_set / "cityscapes"
    for split, count, cities in (("train", 3, syn.TRAIN_CITIES), ("val", 2, syn.VAL_CITIES)):
        images = sorted(
            (cs / "leftImg8bit" / split).rglob("*.png"), key=lambda p: p.name.split("_")[1]
        )
        assert len(images) == count
        for i, img_path in enumerate(images):
            match = CS_NAME.match(img_path.name)
            assert match and match[1] == img_path.parent.name and match[1] in cities
            assert int(match[2]) == i
            stem = img_path.name.removesuffix("_leftImg8bit.png")
            lbl_path = cs / "gtFine" / split / match[1] / f"{stem}_gtFine_labelIds.png"
            img, lbl = Image.open(img_path), Image.open(lbl_path)
            assert img.mode == "RGB" and img.size == (256, 128)
            assert lbl.mode == "L" and lbl.size == img.size
            np.testing.assert_array_equal(np.asarray(lbl), syn.make_sample("target", split, i)[1])
    # Raw format only: train ids are the preparation CLI's job.
    assert not list(cs.rglob("*labelTrainIds*"))
    leftovers = [p for p in small_set.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]
    assert leftovers == []
    marker = json.loads((small_set / syn.MARKER_NAME).read_text())
    assert marker["complete"] and marker["seed"] == 0 and marker["num_source"] == 4


def test_class_coverage_and_ignored_pixels() -> None:
    for domain in ("source", "target"):
        present: set[int] = set()
        raw: set[int] = set()
        for i in range(20):
            label = syn.make_sample(domain, "train", i)[1]
            raw |= set(np.unique(label).tolist())
            present |= set(np.unique(label_ids_to_train_ids(label)).tolist())
        train_classes = {CLASSES[c] for c in present if c < NUM_CLASSES}
        assert len(train_classes) >= 10, (domain, sorted(train_classes))
        assert len(train_classes & set(RARE)) >= 3, (domain, sorted(train_classes))
        assert IGNORE_INDEX in present and len(raw & NOT_EVALUATED) >= 2, (domain, sorted(raw))


def test_deterministic_by_seed(tmp_path: Path) -> None:
    counts = {"num_source": 2, "num_target_train": 2, "num_target_val": 1}
    syn.generate(tmp_path / "a", seed=3, **counts)
    syn.generate(tmp_path / "b", seed=3, **counts)
    syn.generate(tmp_path / "c", seed=4, **counts)
    a, b, c = (_files(tmp_path / k) for k in "abc")
    assert len(a) == 11 and a == b  # 5 images + 5 labels + the marker, byte for byte
    assert all(a[k] != c[k] for k in a if k.endswith(".png"))


def _class_means(images: list[np.ndarray], labels: list[np.ndarray]) -> dict[int, np.ndarray]:
    means = {}
    for c in range(NUM_CLASSES):
        pixels = [
            img[label_ids_to_train_ids(lbl) == c] for img, lbl in zip(images, labels, strict=True)
        ]
        pixels = np.concatenate(pixels).astype(np.float64)
        if len(pixels) > 500:
            means[c] = pixels.mean(0)
    return means


def test_domain_gap_is_appearance_not_layout() -> None:
    # Same scenes, two renderers: per-class colours must differ clearly.
    rng = np.random.default_rng(0)
    scenes = [syn.sample_scene(rng, 128, 256) for _ in range(8)]
    labels = [s.label for s in scenes]
    src = [syn.render(s, syn.SOURCE_STYLE, rng) for s in scenes]
    tgt = [syn.render(s, syn.TARGET_STYLE, rng) for s in scenes]
    src_means, tgt_means = _class_means(src, labels), _class_means(tgt, labels)
    shift = {CLASSES[c]: np.linalg.norm(src_means[c] - tgt_means[c]) for c in src_means}
    for name in ("sidewalk", "building", "vegetation", "sky"):
        assert shift[name] > 20, shift
    assert np.mean(list(shift.values())) > 25, shift
    # Texture and sensor noise: source sky is flat, target sky is not.
    sky = [lbl == syn.Lid.SKY for lbl in labels]
    src_std = np.median([img[m].std(0).mean() for img, m in zip(src, sky, strict=True)])
    tgt_std = np.median([img[m].std(0).mean() for img, m in zip(tgt, sky, strict=True)])
    assert src_std < 1.0 < 4.0 < tgt_std, (src_std, tgt_std)

    # Layout: class-area distributions at the two domains' image sizes match (a missing class
    # such as sky alone would move 0.2 of the mass).
    def area(size: tuple[int, int], seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        labels = [label_ids_to_train_ids(syn.sample_scene(rng, *size).label) for _ in range(48)]
        counts = np.bincount(np.concatenate([lbl.ravel() for lbl in labels]), minlength=256)
        return counts / counts.sum()

    total_variation = 0.5 * np.abs(area(syn.SOURCE_SIZE, 0) - area(syn.TARGET_SIZE, 1)).sum()
    assert total_variation < 0.08, total_variation


def _cli(out: Path, *extra: str) -> list[str]:
    counts = ["--num-source", "1", "--num-target-train", "1", "--num-target-val", "1"]
    return [str(out), *counts, *extra]


def test_cli_rejects_a_file_as_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    assert exit_code(syn.main, _cli(not_a_dir)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(not_a_dir) in err
    assert (
        exit_code(syn.main, _cli(not_a_dir / "sub")) == 2
    )  # parent is a file: cannot create the folder
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_cli_rerun_skips_refuses_and_forces(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "data"
    assert exit_code(syn.main, _cli(out)) == 0
    image = out / "gta" / "images" / "00001.png"
    stamp = image.stat().st_mtime_ns
    assert exit_code(syn.main, _cli(out)) == 0  # same settings: nothing to do
    assert "nothing to do" in capsys.readouterr().out and image.stat().st_mtime_ns == stamp
    assert exit_code(syn.main, _cli(out, "--seed", "1")) == 2  # other settings: refused
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--force" in err
    before = image.read_bytes()
    assert exit_code(syn.main, _cli(out, "--seed", "1", "--force")) == 0
    assert json.loads((out / syn.MARKER_NAME).read_text())["seed"] == 1
    assert image.read_bytes() != before


def test_a_set_from_an_older_generator_version_is_replaced(tmp_path: Path) -> None:
    """Same settings but another FORMAT_VERSION: regenerated without --force (the folder is ours
    and its images no longer match what the generator renders)."""
    out = tmp_path / "data"
    assert syn.generate(out, num_source=2, num_target_train=1, num_target_val=1)
    marker = out / syn.MARKER_NAME
    old = json.loads(marker.read_text())
    marker.write_text(json.dumps({**old, "version": syn.FORMAT_VERSION - 1}))
    assert syn.generate(out, num_source=2, num_target_train=1, num_target_val=1)
    assert json.loads(marker.read_text()) == old
    assert not syn.generate(out, num_source=2, num_target_train=1, num_target_val=1)


def test_cli_refuses_foreign_and_interrupted_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    foreign = tmp_path / "mine"
    (foreign / "gta").mkdir(parents=True)
    (foreign / "gta" / "keep.txt").write_text("real data")
    for extra in ((), ("--force",)):  # --force never deletes what the generator did not write
        assert exit_code(syn.main, _cli(foreign, *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(foreign / "gta") in err
    assert (foreign / "gta" / "keep.txt").read_text() == "real data"

    cluttered = tmp_path / "notes"
    cluttered.mkdir()
    (cluttered / "notes.txt").write_text("x")
    assert exit_code(syn.main, _cli(cluttered)) == 2
    assert "not empty" in capsys.readouterr().err
    assert exit_code(syn.main, _cli(cluttered, "--force")) == 0  # writes beside, deletes nothing
    assert (cluttered / "notes.txt").exists() and (cluttered / "gta" / "images").is_dir()

    interrupted = tmp_path / "half"
    assert exit_code(syn.main, _cli(interrupted)) == 0
    marker = interrupted / syn.MARKER_NAME
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "complete": False}))
    capsys.readouterr()
    assert exit_code(syn.main, _cli(interrupted)) == 2
    assert "interrupted" in capsys.readouterr().err
    assert exit_code(syn.main, _cli(interrupted, "--force")) == 0
    assert json.loads(marker.read_text())["complete"]


def test_counts_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(syn.SyntheticDataError, match="num_source"):
        syn.generate(tmp_path / "x", num_source=0)
    assert exit_code(syn.main, _cli(tmp_path / "x", "--num-target-val", "0")) == 2  # argparse
    assert not (tmp_path / "x").exists()


def test_module_cli_in_a_subprocess(tmp_path: Path) -> None:
    """`python -m ssr.data.synthetic`: a user error is exit status 2 and one line on stderr."""
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    proc = run_cli("ssr.data.synthetic", *_cli(not_a_dir), cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and str(not_a_dir) in err
    assert not_a_dir.read_text() == "x"
