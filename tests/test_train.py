"""`python -m ssr.train` end to end on tiny synthetic data, and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ssr.train

from helpers import call_hydra_main, run_cli, synthetic_data, synthetic_train

# Third-party console noise that `ssr.run.console.quiet_third_party` drops; the run below would
# show each of them without it.
NOISE = {
    "litlogger tip": "💡 Tip:",
    "accelerator lines": "GPU available:",
    "LeafSpec deprecation": "LeafSpec",
    "ModelCheckpoint lecture": "Using ModelCheckpoint with manual optimization",
    "frozen-module notice": "module(s) in eval mode",
}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_cli_trains_evaluates_checkpoints_quietly_and_reports_bad_input(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """The one run of the real command: output files, a clean console, a one-line user error."""
    out = tmp_path / "run"
    proc = run_cli(
        "ssr.train",
        "experiment=demo_ssr",  # SSR: a frozen SAM encoder in eval mode
        *synthetic_train(synthetic_root),
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.model_checkpoint.every_n_train_steps=1",  # Lightning lectures on manual optim
        f"hydra.run.dir={out}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    shown = [name for name, text in NOISE.items() if text in console]
    assert not shown, f"{shown} in:\n{console[-3000:]}"
    assert "ssr.train" in proc.stdout and "final student" in proc.stdout  # start-up + IoU tables
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"mIoU", "IoU", "aAcc", "num_images"}
    assert metrics["num_images"] == 2 and 0.0 <= metrics["mIoU"] <= 100.0
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["model_config"]["backbone"]["variant"] == "tiny"
    log = (out / "csv" / "metrics.csv").read_text()
    for key in ("train/src_ce", "train/mix_ce", "train/ssr_src_ce", "train/pl_weight"):
        assert key in log, key
    assert "train/lr" in log and "val/mIoU" in log

    # A user error (no dataset there): one line on stderr, no traceback, exit status 2.
    proc = run_cli(
        "ssr.train", "experiment=demo", f"paths.data_dir={tmp_path / 'nowhere'}", cwd=tmp_path
    )
    assert proc.returncode == 2
    err = error_lines(proc.stderr)
    assert len(err) == 1 and "nowhere" in err[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_missing_imagenet_weights_say_where_to_put_them(
    synthetic_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    overrides = [
        "experiment=daformer",
        f"paths.weights_dir={tmp_path}",
        *synthetic_data(synthetic_root),
        "data.rcs=null",
    ]
    assert call_hydra_main(ssr.train.main, monkeypatch, tmp_path / "run", overrides) == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "mit_b5.pth" in err[0] and "README" in err[0], err
