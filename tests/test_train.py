"""`python -m ssr.train` end to end on tiny synthetic data, and its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run_train(*overrides: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, "-m", "ssr.train", *overrides],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_demo_trains_evaluates_and_checkpoints(synthetic_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = run_train(
        "experiment=demo_daformer",
        f"data.source_root={synthetic_root / 'gta'}",
        f"data.target_root={synthetic_root / 'cityscapes'}",
        "data.num_workers=0",
        "data.rcs.min_pixels=10",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"mIoU", "IoU", "aAcc", "num_images"}
    assert metrics["num_images"] == 2 and 0.0 <= metrics["mIoU"] <= 100.0
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["model_config"]["backbone"]["variant"] == "tiny"
    log = (out / "csv" / "metrics.csv").read_text()
    for key in ("train/src_ce", "train/mix_ce", "train/pl_weight", "train/lr", "val/mIoU"):
        assert key in log, key


def test_missing_dataset_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = run_train("experiment=demo", f"paths.data_dir={tmp_path / 'nowhere'}", cwd=tmp_path)
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "nowhere" in err[0], proc.stderr[-2000:]


def test_missing_imagenet_weights_say_where_to_put_them(
    synthetic_root: Path, tmp_path: Path
) -> None:
    proc = run_train(
        "experiment=daformer",
        f"paths.weights_dir={tmp_path}",
        f"data.source_root={synthetic_root / 'gta'}",
        f"data.target_root={synthetic_root / 'cityscapes'}",
        "data.rcs=null",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "mit_b5.pth" in err[0] and "README" in err[0], proc.stderr[-2000:]
