"""Faults a user can cause, each answered by one line and a non-zero exit before any work is lost:
settings, contradictory crops, broken files in loader workers and in the val set, symlinked
dataset folders, label-id predictions, re-run and interrupted preparation, odd images."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import ssr.train
from ssr import eval as ssr_eval
from ssr import export as ssr_export
from ssr import predict as ssr_predict
from ssr import report
from ssr.data import prepare
from ssr.data.datasets import CityscapesDataset

from helpers import (
    CS_FRAMES,
    CS_H,
    CS_W,
    call_hydra_main,
    compose_cfg,
    exit_code,
    synthetic_train,
)

AT_TEST_SCALE = "inference.resize=[128,64]"


def one_error_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """The one `error:` line on stderr (a progress bar may precede it), holding `needles`."""
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in stderr, stderr
    assert all(n in err[0] for n in needles), err[0]
    return err[0]


def train_exit(root: Path, run: Path, monkeypatch: pytest.MonkeyPatch, *extra: str) -> int:
    args = ["experiment=demo_mic", *synthetic_train(root), "trainer.max_steps=1", *extra]
    return call_hydra_main(ssr.train.main, monkeypatch, run, args)


# ------------------------------------------------------------------------------- settings
@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("data.batch_size=two", "data.batch_size='two' must be an integer >= 1"),
        ("data.batch_size=0", "data.batch_size=0 must be an integer >= 1"),
        ("data.num_workers=-1", "data.num_workers=-1 must be an integer >= 0"),
        ("optim.lr=-1", "optim.lr=-1 must be a number >= 0"),
        ("seed=abc", "seed='abc' must be an integer >= 0"),
        ("trainer.max_steps=0", "trainer.max_steps=0 must be an integer >= 1"),
        ("data.crop_size=[600,600]", "larger than the resized images"),
        ("uda.teacher.ignore_bottom=64", "cover the whole 64-row target crop"),
        ("data.pseudo_margins=[4,30,4]", "data.pseudo_margins=[4, 30, 4] must be four integers"),
        ("data.pseudo_margins=[4,30,4,4]", "crop rows exclude each other"),  # HRDA asserts it
        ("uda.masking.ratio=1.5", "MIC mask ratio=1.5 must be in [0, 1]"),  # a constructor's
        ("float32_matmul_precision=fast", "choose one of highest, high, medium"),
        ("model=hrda_tiny model.hr_crop_size=[96,96]", "larger than the training crop"),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_2_before_training(
    override: str,
    needle: str,
    synthetic_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert train_exit(synthetic_root, tmp_path / "run", monkeypatch, *override.split()) == 2
    one_error_line(capsys, needle)
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------ data files
@pytest.fixture
def damaged_root(synthetic_root: Path, tmp_path: Path) -> Path:
    """A copy of the synthetic dataset to break."""
    return Path(shutil.copytree(synthetic_root, tmp_path / "data"))


def test_a_loader_worker_error_is_the_workers_own_line(
    damaged_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for image in (damaged_root / "gta" / "images").glob("*.png"):  # headers intact: setup passes
        image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    code = train_exit(damaged_root, tmp_path / "run", monkeypatch, "data.num_workers=1")
    assert code == 2
    line = one_error_line(capsys, "cannot read image", str(damaged_root / "gta" / "images"))
    assert "Original Traceback" not in line and "DataLoader worker" not in line


@pytest.mark.parametrize("fault", ["wrong_size", "truncated"])
def test_val_labels_are_checked_at_start_up(
    fault: str,
    damaged_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    (label, *_) = sorted((damaged_root / "cityscapes" / "gtFine" / "val").rglob("*TrainIds.png"))
    if fault == "wrong_size":
        Image.open(label).resize((50, 30)).save(label)
        needles = ["is 50x30 but image", "re-extract the pair"]
    else:
        label.write_bytes(label.read_bytes()[:-40])
        needles = ["cannot read label", "truncated or damaged"]
    assert train_exit(damaged_root, tmp_path / "run", monkeypatch) == 2
    one_error_line(capsys, str(label), *needles)
    assert not (tmp_path / "run" / "csv").exists()  # no training step ran


# -------------------------------------------------------------------------- linked folders
def linked_tree(cs_root: Path, tmp_path: Path) -> Path:
    """The Cityscapes val tree assembled from symbolic links to its city folders, plus a link
    loop (a folder linking to its parent) that a scan must not follow forever."""
    root = tmp_path / "linked"
    for kind in ("leftImg8bit", "gtFine"):
        split = root / kind / "val"
        split.mkdir(parents=True)
        for city in (cs_root / kind / "val").iterdir():
            (split / city.name).symlink_to(city, target_is_directory=True)
        (split / "loop").symlink_to(split, target_is_directory=True)
    return root


def test_symlinked_city_folders_are_followed(tiny, cs_root: Path, tmp_path: Path) -> None:
    ckpt, _ = tiny
    root = linked_tree(cs_root, tmp_path)
    assert len(CityscapesDataset(root, "val")) == len(CS_FRAMES)

    def evaluate(source: str, gt_root: Path, out: str) -> dict:
        protocol = ("num_workers=0", "device=cpu", AT_TEST_SCALE)
        output = f"output_dir={tmp_path / out}"
        return ssr_eval.run(compose_cfg("eval", source, f"gt_root={gt_root}", output, *protocol))

    direct = evaluate(f"ckpt_path={ckpt}", cs_root, "a")
    assert evaluate(f"ckpt_path={ckpt}", root, "b") == direct
    assert direct["num_images"] == len(CS_FRAMES)

    # ssr.predict mirrors the linked folders; ssr.eval pred_dir= finds predictions through links.
    preds, linked_preds = tmp_path / "preds", tmp_path / "linked_preds"
    inputs = (f"ckpt_path={ckpt}", f"input={root / 'leftImg8bit' / 'val'}", "device=cpu")
    written = ssr_predict.run(compose_cfg("predict", *inputs, f"output_dir={preds}", AT_TEST_SCALE))
    assert len(written) == 3 * len(CS_FRAMES)
    linked_preds.mkdir()
    for city in preds.iterdir():
        (linked_preds / city.name).symlink_to(city, target_is_directory=True)
    assert evaluate(f"pred_dir={linked_preds}", root, "c") == direct


def test_report_follows_linked_run_folders(tmp_path: Path) -> None:
    sweep, elsewhere = tmp_path / "sweep", tmp_path / "elsewhere"
    for seed, miou in ((0, 60.0), (1, 62.0)):
        job = elsewhere / str(seed)
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- experiment=mic\n- seed={seed}\n")
        metrics = {"mIoU": miou, "IoU": {}, "aAcc": 90.0, "num_images": 500}
        (job / "metrics.json").write_text(json.dumps(metrics))
    sweep.mkdir()
    (sweep / "0").symlink_to(elsewhere / "0", target_is_directory=True)
    (sweep / "1").symlink_to(elsewhere / "1", target_is_directory=True)
    (group,) = report.collect(sweep)
    assert group.seeds == "0,1" and group.stat("mIoU") == pytest.approx((61.0, 2**0.5, 2))


# -------------------------------------------------------------------------- predictions
def test_label_id_predictions_are_refused(
    cs_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    preds = tmp_path / "preds"
    for frame in CS_FRAMES:
        path = preds / f"{frame}_leftImg8bit_trainIds.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        ids = np.full((CS_H, CS_W), 7, np.uint8)  # road as a Cityscapes label id
        ids[: CS_H // 3] = 23  # sky
        Image.fromarray(ids).save(path)
    overrides = [f"pred_dir={preds}", f"gt_root={cs_root}", f"output_dir={tmp_path / 'out'}"]
    assert call_hydra_main(ssr_eval.main, monkeypatch, tmp_path / "run", overrides) == 2
    one_error_line(capsys, "holds value 23, not a train id", "looks like Cityscapes label ids")
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("fault", ["truncated_jpeg", "thin"])
def test_predict_refuses_a_truncated_jpeg_and_a_thin_image(
    fault: str, tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    ckpt, _ = tiny
    rng = np.random.default_rng(0)
    if fault == "truncated_jpeg":
        image = tmp_path / "frame.jpg"
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), np.uint8)).save(image, quality=90)
        image.write_bytes(image.read_bytes()[: image.stat().st_size * 2 // 3])
        needles = ["cannot read image", "truncated"]
    else:
        image = tmp_path / "strip.png"
        Image.fromarray(rng.integers(0, 255, (3, 2000, 3), np.uint8)).save(image)
        needles = ["a 2000x3 image becomes", "too small for the network"]
    out = tmp_path / "out"
    overrides = [f"ckpt_path={ckpt}", f"input={image}", f"output_dir={out}", "device=cpu"]
    assert call_hydra_main(ssr_predict.main, monkeypatch, tmp_path / "run", overrides) == 2
    one_error_line(capsys, *needles)
    assert not out.exists() or not any(out.rglob("*.png"))


@pytest.mark.parametrize("target", ["folder", "below_a_file"])
def test_export_to_a_folder_or_an_unwritable_path_is_one_line(
    target: str, tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    ckpt, _ = tiny
    (tmp_path / "a_file").write_text("")
    out = {"folder": tmp_path, "below_a_file": tmp_path / "a_file" / "model.pt"}[target]
    overrides = [f"ckpt_path={ckpt}", f"out={out}"]
    assert call_hydra_main(ssr_export.main, monkeypatch, tmp_path / "run", overrides) == 2
    one_error_line(capsys, str(out), "is a folder" if target == "folder" else "cannot write")


# ---------------------------------------------------------------------------- preparation
def gta_labels(root: Path, n: int = 3) -> None:
    """GTA5-style label-id PNGs: road (7) with a car (26) block; the last one all void (0)."""
    (root / "labels").mkdir(parents=True)
    for i in range(1, n + 1):
        ids = np.full((24, 40), 7 if i < n else 0, np.uint8)
        if i < n:
            ids[8:16, 10:30] = 26
        Image.fromarray(ids).save(root / "labels" / f"{i:05d}.png")


def test_prepare_rewrites_bad_outputs_and_warns_about_all_ignore_labels(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "gta"
    gta_labels(root)
    assert exit_code(prepare.main, ["gta5", str(root), "--nproc", "1"]) == 0
    captured = capsys.readouterr()
    assert "warning: 1 labels map every pixel to ignore" in captured.err
    assert "00003_labelTrainIds.png" in captured.err
    good = {p.name: p.read_bytes() for p in (root / "labels").glob("*_labelTrainIds.png")}
    stats = (root / "sample_class_stats.json").read_text()

    out = root / "labels"
    Image.fromarray(np.full((24, 40), 77, np.uint8)).save(out / "00001_labelTrainIds.png")
    Image.new("RGB", (40, 24)).save(out / "00002_labelTrainIds.png")
    Image.fromarray(np.zeros((24, 40), np.uint16)).save(out / "00003_labelTrainIds.png")
    assert exit_code(prepare.main, ["gta5", str(root), "--nproc", "1"]) == 0
    assert "rewrote 3 unusable earlier outputs" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.glob("*_labelTrainIds.png")} == good
    assert (root / "sample_class_stats.json").read_text() == stats


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_prepare_ctrl_c_is_one_line_and_the_next_run_sweeps_its_leftovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "gta"
    gta_labels(root, n=4)
    convert = prepare.decode
    calls = []

    def interrupted_at_the_second_file(path: Path, raw: Any) -> np.ndarray:
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered mid-run
        return convert(path, raw)

    monkeypatch.setattr(prepare, "decode", interrupted_at_the_second_file)
    assert exit_code(prepare.main, ["gta5", str(root), "--nproc", "1"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: interrupted (Ctrl-C); finished outputs are kept"
    ]
    assert not (root / "samples_with_class.json").exists()
    stale = root / "labels" / f".00004_labelTrainIds.png.{dead_pid()}.0badc0de.tmp"
    stale.write_bytes(b"half a png")  # what a kill during a write leaves

    monkeypatch.setattr(prepare, "decode", convert)
    assert exit_code(prepare.main, ["gta5", str(root), "--nproc", "1"]) == 0
    assert not list(root.rglob("*.tmp"))
    assert len(list((root / "labels").glob("*_labelTrainIds.png"))) == 4
