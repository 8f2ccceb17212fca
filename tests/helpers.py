"""Test helpers used across the suite: configs, a CPU trainer, random UDA batches, CLI runs."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig
from PIL import Image

from ssr import CONF_MODULE
from ssr.data.labels import MEAN, STD
from ssr.data.stream import CropRecord

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"  # small tables that ship with the repo
# Real Cityscapes/GTA5-derived frames (research-only terms): read in place, never copied here.
SHARED_FIXTURES = PROJECT_ROOT.parent / "shared" / "fixtures"
# A tiny Cityscapes-format val tree (conftest `cs_root`): two frames in two cities, 128x64.
CS_FRAMES = ("aachen/aachen_000000_000019", "bochum/bochum_000000_000313")
CS_W, CS_H = 128, 64
CLI_ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "offline"}


def compose_cfg(config_name: str = "train", *overrides: str, hydra: bool = False) -> DictConfig:
    """A root config of the package (train, eval, predict, export) with command-line overrides."""
    with initialize_config_module(CONF_MODULE, version_base="1.3"):
        return compose(config_name, overrides=list(overrides), return_hydra_config=hydra)


def synthetic_data(root: Path) -> list[str]:
    """Overrides pointing `data=synthetic` at a generated and prepared synthetic root."""
    return [f"data.source_root={root / 'gta'}", f"data.target_root={root / 'cityscapes'}"]


def cpu_trainer(max_steps: int = 1, **kwargs: Any) -> pl.Trainer:
    """A quiet single-process CPU trainer: no logger, checkpoints, progress bar or summary."""
    options: dict[str, Any] = dict(
        accelerator="cpu",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return pl.Trainer(**(options | kwargs))


def uda_batch(
    batch: int = 2, size: int = 64, seed: int = 0, target: bool = True, block: int = 16
) -> dict[str, Any]:
    """A random training batch in the datamodule's layout (labels in blocks of `block` px, so a
    crop holds several classes of sensible size)."""
    g = torch.Generator().manual_seed(seed)
    cells = size // block
    lbl = torch.randint(0, 19, (batch, cells, cells), generator=g)
    lbl = lbl.repeat_interleave(block, 1).repeat_interleave(block, 2)
    box = torch.tensor([[size, size, 0, 0, 0]] * batch)
    out: dict[str, Any] = {
        "src_img": torch.randn(batch, 3, size, size, generator=g),
        "src_lbl": lbl,
        "src_crop": CropRecord([f"src{i}.png" for i in range(batch)], box),  # type: ignore[arg-type]
        "index": torch.arange(batch),
    }
    if target:
        out["tgt_img"] = torch.randn(batch, 3, size, size, generator=g)
        out["tgt_crop"] = CropRecord([f"tgt{i}.png" for i in range(batch)], box)  # type: ignore[arg-type]
    return out


def run_cli(module: str, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` as a user types it; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=CLI_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def call_hydra_main(
    main: Callable[[], Any],
    monkeypatch: pytest.MonkeyPatch,
    run_dir: Path,
    overrides: Sequence[str],
) -> int:
    """Run a Hydra CLI in-process; its exit code (0 when it returns normally)."""
    monkeypatch.setattr(sys, "argv", ["prog", *overrides, f"hydra.run.dir={run_dir}"])
    try:
        main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def exit_code(main: Callable[..., Any], *args: Any) -> int:
    """The exit code of an argparse CLI's `main(argv)` called in-process."""
    try:
        return int(main(*args) or 0)
    except SystemExit as exit_:
        return int(exit_.code or 0)


def synthetic_train(root: Path, batch_size: int = 2) -> list[str]:
    """`synthetic_data` plus what keeps a training run on the 8-frame synthetic source small and
    in one process: no loader workers, `batch_size` crops, RCS classes from 10 px on."""
    return [
        *synthetic_data(root),
        "data.num_workers=0",
        "data.rcs.min_pixels=10",
        f"data.batch_size={batch_size}",
    ]


class torch_threads:
    """`with torch_threads(1): ...`: `n` torch intra-op threads inside the block (tiny tensors on
    a shared 2-core machine: extra threads only contend)."""

    def __init__(self, n: int = 1) -> None:
        self.n = n
        self.previous = torch.get_num_threads()

    def __enter__(self) -> None:
        self.previous = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc_info: object) -> None:
        torch.set_num_threads(self.previous)


def run_script(name: str, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """An installed console script (`ssr-eval`, `ssr-predict`, ...) as a user types it."""
    script = Path(sys.executable).with_name(name)
    assert script.is_file(), f"console script {script} not installed (pip install -e .)"
    return subprocess.run(
        [str(script), *args], cwd=cwd, env=CLI_ENV, capture_output=True, text=True, timeout=timeout
    )


def normalised(rgb: np.ndarray) -> np.ndarray:
    """What the pipelines feed the network: mmseg-normalised float32 RGB (H, W, 3)."""
    return (rgb.astype(np.float32) - np.float32(MEAN)) / np.float32(STD)


class SignalAtStep(pl.Callback):
    """Sends `signum` (`times` times) to this process when optimiser step `step` starts: a Ctrl-C,
    `scancel` or SLURM warning landing mid-step. `workers`: DataLoader workers get it too, as from
    `scancel` or a terminal's Ctrl-C. Used as `+callbacks.stop._target_=helpers.SignalAtStep`."""

    def __init__(self, signum: int, step: int, times: int = 1, workers: bool = False) -> None:
        self.signum, self.step, self.times, self.workers = signum, step, times, workers

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step != self.step:
            return
        if self.workers:  # sent by another process, as by scancel (PyTorch's workers exit
            # quietly on a signal from their parent, so os.kill from here would prove nothing)
            pids = [str(child.pid) for child in multiprocessing.active_children()]
            assert pids, "no DataLoader worker to signal"
            subprocess.run(["kill", f"-{int(self.signum)}", *pids], check=True)
        for _ in range(self.times):
            os.kill(os.getpid(), self.signum)


# SYNTHIA-RAND-CITYSCAPES class id (R channel) -> Cityscapes train id, from the dataset's README
# (written here, not imported from the code under test); every other id is ignore.
SYNTHIA_TABLE = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11, 17: 12, 8: 13,
    18: 14, 19: 15, 20: 16, 12: 17, 11: 18,
}  # fmt: skip


def mapped(ids: np.ndarray, table: dict[int, int]) -> np.ndarray:
    """Train ids of raw ids by a table, written out pixel by pixel (no lookup-table tricks)."""
    out = np.full(ids.shape, 255, np.uint8)
    for index, value in np.ndenumerate(ids):
        out[index] = table.get(int(value), 255)
    return out


def prepare_fails(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """The prepare CLI refuses `argv`: exit status 2 and one stderr line holding every needle."""
    from ssr.data import prepare

    capsys.readouterr()
    assert exit_code(prepare.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def prepare_ok(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The prepare CLI's stdout for `argv`, which must succeed."""
    from ssr.data import prepare

    capsys.readouterr()
    code = exit_code(prepare.main, argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_synthia_label(path: Path, ids: np.ndarray, instances: np.ndarray | None = None) -> Path:
    """A SYNTHIA GT/LABELS file: 16-bit, 3 channels; PNG R (OpenCV index 2) = class id, G =
    instance id, B = 777 (values above 255 everywhere Pillow would lose them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    bgr = np.empty((*ids.shape, 3), np.uint16)
    bgr[..., 2] = ids
    bgr[..., 1] = (
        1000 + np.arange(ids.size).reshape(ids.shape) * 3 if instances is None else instances
    )
    bgr[..., 0] = 777
    assert cv2.imwrite(str(path), bgr)
    return path
