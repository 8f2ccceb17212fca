"""Helpers shared by the parts of `benchmarks/ssr_cost.py`: configs, modules, fits, timing."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from ssr import CONF_MODULE
from ssr.data.stream import CropRecord
from ssr.train import build_module
from ssr.uda.module import UDAModule


def compose_cfg(config: str, overrides: Sequence[str]) -> DictConfig:
    """A root config of the `ssr.conf` package (train, sam_cache, ...) with overrides."""
    with initialize_config_module(CONF_MODULE, version_base="1.3"):
        return compose(config, overrides=list(overrides))


def seeded_module(cfg: DictConfig) -> UDAModule:
    """The UDA module of a composed train config, from a fixed torch seed (same init each time)."""
    torch.manual_seed(0)
    return build_module(cfg)


class StepTimer(pl.Callback):
    """Wall and process-CPU time of every training step (optimizer step included)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self._start = (0.0, 0.0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sync(pl_module.device)
        self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(pl_module.device)  # a GPU step has ended when its queued kernels have
        self.wall.append(1e3 * (time.perf_counter() - self._start[0]))
        self.cpu.append(1e3 * (time.process_time() - self._start[1]))


def sync(device: torch.device) -> None:
    """Wait for a GPU's queued kernels, so wall time covers them; nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Wall seconds of one call (a GPU's queued kernels included) and its result."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def fit(
    module: UDAModule, batches: Sequence[dict], callbacks: Sequence[pl.Callback] = ()
) -> pl.Trainer:
    """One CPU fit over `batches` (one step each), quiet, without validation or checkpoints."""
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=list(callbacks),
    )
    trainer.fit(module, DataLoader(list(batches), batch_size=None))
    return trainer


def random_batches(n: int, batch: int = 2, size: int = 64) -> list[dict[str, Any]]:
    """`n` random training batches in the datamodule's layout (crop records are placeholders:
    only a SAM feature cache reads them)."""
    gen = torch.Generator().manual_seed(0)
    box = torch.tensor([[size, size, 0, 0, 0]] * batch)
    return [
        {
            "src_img": torch.randn(batch, 3, size, size, generator=gen),
            "src_lbl": torch.randint(0, 19, (batch, size, size), generator=gen),
            "tgt_img": torch.randn(batch, 3, size, size, generator=gen),
            "src_crop": CropRecord([f"src{i}.png" for i in range(batch)], box),  # type: ignore[arg-type]
            "tgt_crop": CropRecord([f"tgt{i}.png" for i in range(batch)], box),  # type: ignore[arg-type]
        }
        for _ in range(n)
    ]


def median(values: Sequence[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
