"""`ssr.predict format=acdc|darkzurich`: the test servers' submission layout, checks and zip."""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image

from ssr import predict as ssr_predict
from ssr.data.labels import NUM_CLASSES, PALETTE
from ssr.model.checkpoint import load_segmentor
from ssr.submission import FLAT_PALETTE, SubmissionError, confidence_map

from helpers import call_hydra_main, compose_cfg

AT_TEST_SCALE = "inference.resize=[128,64]"  # the tiny images are at about the test scale
# ACDC and Dark Zurich images are 1920x1080; these keep the ratio, and two sizes tell them apart.
SIZES = ((96, 54), (112, 63))
ACDC_TEST = (
    "fog/test/GOPR0475/GOPR0475_frame_000041_rgb_anon.png",
    "night/test/GOPR0351/GOPR0351_frame_000159_rgb_anon.png",
)
# Not test images: a training image, a reference image, a test reference image.
ACDC_OTHER = (
    "fog/train/GOPR0475/GOPR0475_frame_000001_rgb_anon.png",
    "fog/train_ref/GOPR0475/GOPR0475_frame_000001_ref_rgb_anon.png",
    "night/test_ref/GOPR0351/GOPR0351_frame_000159_ref_rgb_anon.png",
)
DZ_TEST = (
    "test/night/GOPR0356/GOPR0356_frame_000321_rgb_anon.png",
    "test/night/GOPR0364/GOPR0364_frame_000001_rgb_anon.png",
)
DZ_OTHER = ("test_ref/day/GOPR0356_ref/GOPR0356_frame_000321_ref_rgb_anon.png",)


def _tree(root: Path, files: tuple[str, ...]) -> Path:
    rng = np.random.default_rng(len(files))
    for i, name in enumerate(files):
        w, h = SIZES[i % len(SIZES)]
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        img = cv2.resize(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8), (w, h))
        Image.fromarray(img).save(path)
    return root


def _cfg(ckpt: Path | str, input_path: Path, out: Path, *overrides: str):
    return compose_cfg(
        "predict",
        f"ckpt_path={ckpt}",
        f"input={input_path}",
        f"output_dir={out}",
        "device=cpu",
        AT_TEST_SCALE,
        *overrides,
    )


def _names(files: tuple[str, ...]) -> list[str]:
    return sorted(Path(f).name for f in files)


def _predictor(cfg) -> ssr_predict.Predictor:
    segmentor, _, _ = load_segmentor(cfg.ckpt_path, cfg.model, "cpu")
    inference = instantiate(cfg.inference).for_model(segmentor)
    return ssr_predict.Predictor(segmentor, inference, "cpu")


def test_acdc_export_from_the_rgb_anon_root(tiny, tmp_path, caplog) -> None:
    """input=<acdc>/rgb_anon: only `*/test/**` images; flat labelTrainIds/ palette PNGs; zip."""
    ckpt, _ = tiny
    rgb_anon = _tree(tmp_path / "acdc" / "rgb_anon", ACDC_TEST + ACDC_OTHER)
    out = tmp_path / "out"
    cfg = _cfg(ckpt, rgb_anon, out, "format=acdc")
    with caplog.at_level(logging.INFO, logger="ssr.submission"):
        written = ssr_predict.run(cfg)
    names = _names(ACDC_TEST)
    assert names[0] == "GOPR0351_frame_000159_rgb_anon.png"  # the stem keeps _rgb_anon
    zip_path = out / "acdc_submission.zip"
    assert written == [out / "labelTrainIds" / n for n in names] + [zip_path]
    assert sorted(p.name for p in out.iterdir()) == ["acdc_submission.zip", "labelTrainIds"]
    assert sorted(p.name for p in (out / "labelTrainIds").iterdir()) == names
    predictor = _predictor(cfg)
    for i, rel in enumerate(ACDC_TEST):
        pred = Image.open(out / "labelTrainIds" / Path(rel).name)
        assert pred.mode == "P" and pred.size == SIZES[i]  # the original image size
        palette = pred.getpalette()
        assert palette[: 3 * NUM_CLASSES] == [c for rgb in PALETTE for c in rgb]
        assert palette[: 3 * NUM_CLASSES] == FLAT_PALETTE[: 3 * NUM_CLASSES]
        ids = np.asarray(pred)  # the indices, not colours
        assert ids.max() < NUM_CLASSES
        rgb = np.asarray(Image.open(rgb_anon / rel).convert("RGB"))
        np.testing.assert_array_equal(ids, predictor(rgb))
    with zipfile.ZipFile(zip_path) as archive:
        assert archive.namelist() == [f"labelTrainIds/{n}" for n in names]
        assert (
            archive.read(f"labelTrainIds/{names[0]}")
            == (out / "labelTrainIds" / names[0]).read_bytes()
        )
    messages = [r.getMessage() for r in caplog.records]
    assert any("2 of the 5 images" in m and "'test' folders" in m for m in messages)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "2 images" in warning and "2000" in warning
    assert not list(tmp_path.glob("acdc/**/*_trainIds.png"))  # nothing written next to inputs


def test_darkzurich_export_three_folders_and_rerun(tiny, tmp_path, caplog) -> None:
    """labelTrainIds/, labelTrainIds_invalid/ (a copy), confidence/ (uint16) at the zip root."""
    ckpt, _ = tiny
    rgb_anon = _tree(tmp_path / "dz" / "rgb_anon", DZ_TEST + DZ_OTHER)
    out = tmp_path / "out"
    cfg = _cfg(ckpt, rgb_anon, out, "format=darkzurich")
    with caplog.at_level(logging.WARNING, logger="ssr.submission"):
        ssr_predict.run(cfg)
    assert "151" in caplog.records[0].getMessage()
    folders = ["confidence", "labelTrainIds", "labelTrainIds_invalid"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["darkzurich_submission.zip", *folders])
    names = _names(DZ_TEST)
    for folder in folders:
        assert sorted(p.name for p in (out / folder).iterdir()) == names
    predictor = _predictor(cfg)
    for i, rel in enumerate(DZ_TEST):
        name = Path(rel).name
        labels = out / "labelTrainIds" / name
        assert (out / "labelTrainIds_invalid" / name).read_bytes() == labels.read_bytes()
        assert Image.open(labels).mode == "P"
        conf = cv2.imread(str(out / "confidence" / name), cv2.IMREAD_UNCHANGED)
        assert conf.dtype == np.uint16 and conf.shape == SIZES[i][::-1]
        rgb = np.asarray(Image.open(rgb_anon / rel).convert("RGB"))
        ids, probability = predictor.predict(rgb, confidence=True)
        np.testing.assert_array_equal(np.asarray(Image.open(labels)), ids)
        np.testing.assert_array_equal(conf, confidence_map(probability))
        assert conf.min() >= round(65535 / NUM_CLASSES)  # a max softmax probability
    zip_path = out / "darkzurich_submission.zip"
    zipped = ("labelTrainIds", "labelTrainIds_invalid", "confidence")
    expected = [f"{folder}/{n}" for folder in zipped for n in names]
    with zipfile.ZipFile(zip_path) as archive:
        assert archive.namelist() == expected
    # A rerun into the same output_dir overwrites its own files and the zip.
    zip_path.write_bytes(b"stale")
    ssr_predict.run(_cfg(ckpt, rgb_anon / "test", out, "format=darkzurich", "confidence=true"))
    with zipfile.ZipFile(zip_path) as archive:
        assert archive.namelist() == expected


def test_default_format_keeps_per_image_files(tiny, tmp_path) -> None:
    ckpt, _ = tiny
    rgb_anon = _tree(tmp_path / "dz" / "rgb_anon", DZ_TEST)
    out = tmp_path / "out"
    cfg = _cfg(ckpt, rgb_anon, out)
    assert cfg.format is None
    written = ssr_predict.run(cfg)
    stem = out / "test" / "night" / "GOPR0356" / "GOPR0356_frame_000321_rgb_anon"
    assert {p.name for p in written if p.parent == stem.parent} == {
        f"{stem.name}_{kind}.png" for kind in ("trainIds", "color", "overlay")
    }
    assert sorted(p.name for p in out.iterdir()) == ["test"]  # no submission folders, no zip


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("collision", r"GOPR0475_frame_000041_rgb_anon.png .* would both be labelTrainIds/"),
        ("leftovers", r"labelTrainIds already holds 1 files .* \[GOPR9999_old.png\]"),
        ("video", r"a video has no submission"),
        ("encoding", r"drop encoding=cityscapes"),
        ("unknown", r"format=cityscapes is not a test-server format; choose one of acdc, darkz"),
        ("confidence", r"format=acdc submits labelTrainIds/ only; drop confidence=true"),
        ("only_reference", r"no test images under"),
    ],
)
def test_refusals_come_before_the_model_is_loaded(case, pattern, tmp_path) -> None:
    """Each is one SubmissionError line; the checkpoint does not exist, so none was read."""
    root = tmp_path / "rgb_anon"
    out = tmp_path / "out"
    fmt, extra = "format=acdc", []
    if case == "collision":  # same stem in two sequences: one flat file name
        _tree(root, (ACDC_TEST[0], ACDC_TEST[0].replace("GOPR0475/", "GOPR0476/")))
    elif case == "leftovers":  # an earlier export of another input
        _tree(root, ACDC_TEST)
        _tree(out, ("labelTrainIds/GOPR9999_old.png",))
    elif case == "video":
        root = tmp_path / "clip.mp4"
        root.write_bytes(b"not opened before the check")
    elif case == "only_reference":
        _tree(root, DZ_OTHER)
    else:
        _tree(root, ACDC_TEST)
        extra = {
            "encoding": ["encoding=cityscapes"],
            "unknown": [],
            "confidence": ["confidence=true"],
        }[case]
        fmt = "format=cityscapes" if case == "unknown" else fmt
    cfg = _cfg(tmp_path / "missing.pt", root, out, fmt, *extra)
    with pytest.raises(SubmissionError, match=pattern) as err:
        ssr_predict.run(cfg)
    assert "\n" not in str(err.value)
    assert not (out / "acdc_submission.zip").exists()


def test_cli_refusal_is_one_line_exit_2(tmp_path, monkeypatch, capsys) -> None:
    root = _tree(tmp_path / "rgb_anon", ACDC_TEST)
    out = tmp_path / "out"
    overrides = [f"ckpt_path={tmp_path / 'x.pt'}", f"input={root}", f"output_dir={out}"]
    code = call_hydra_main(
        ssr_predict.main, monkeypatch, tmp_path / "run", [*overrides, "format=kitti"]
    )
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: format=kitti") and len(err.splitlines()) == 1
    assert not out.exists()
