"""The Lightning trainer of a run, with what exact resume needs added to every configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from omegaconf import DictConfig

from ssr.errors import UserError
from ssr.io import atomic_torch_save
from ssr.run.preemption import CheckpointOnSignal
from ssr.run.rng import RNGStateCallback


class TrainerConfigError(UserError, ValueError):
    """A trainer setting that cannot work for this launch (DDP sampler, DDP inside a sweep)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO with `ssr.io.atomic_torch_save` for local paths.

    Lightning's own writer stages the file in the system temp dir, which on clusters is usually
    another filesystem than the run directory (the final move is then a copy, not a rename).
    Remote URLs (s3://, gs://, ...) keep Lightning's fsspec transaction, which the object stores
    already commit atomically.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options for local paths")
        atomic_torch_save(checkpoint, path)


def build_trainer(cfg: DictConfig, callbacks: list[pl.Callback], loggers: list) -> pl.Trainer:
    """The trainer of `cfg.trainer` plus atomic checkpoint files, the RNG states in them and a
    step-boundary checkpoint on SIGUSR1/SIGTERM (pre-emption); `precision: auto` resolved."""
    plugins = [instantiate(p) for p in cfg.trainer.get("plugins") or []]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=[*callbacks, RNGStateCallback(), CheckpointOnSignal()],
        logger=loggers or False,
        plugins=plugins,
        precision=auto_precision(cfg.trainer),
    )
    if trainer.world_size > 1 and cfg.trainer.get("use_distributed_sampler", True):
        raise TrainerConfigError(
            "multi-process training needs trainer.use_distributed_sampler=false (the datamodule "
            "shards its endless sample stream itself); use trainer=ddp"
        )
    launcher = trainer.strategy.launcher
    if (
        HydraConfig.initialized()
        and HydraConfig.get().mode == RunMode.MULTIRUN
        and isinstance(launcher, _SubprocessScriptLauncher)
        and not launcher.cluster_environment.creates_processes_externally
        and trainer.world_size > 1
    ):
        raise TrainerConfigError(
            "trainer=ddp inside a local -m sweep: Lightning re-runs this command line for every "
            "extra GPU and each copy would start the whole sweep; run the jobs one by one or "
            "with hydra/launcher=submitit_slurm"
        )
    return trainer


def auto_precision(trainer_cfg: DictConfig) -> str | int | None:
    """`auto`: bf16-mixed on CUDA GPUs with bf16 (Ampere+), 16-mixed on older ones, else 32-true.

    Mixed precision is a deviation from the reference's fp32 (docs/configuration.md, Precision).
    """
    value = trainer_cfg.get("precision")
    if value != "auto":
        return value
    if trainer_cfg.get("accelerator", "auto") in ("auto", "gpu", "cuda") and (
        torch.cuda.is_available()
    ):
        return "bf16-mixed" if torch.cuda.get_device_capability() >= (8, 0) else "16-mixed"
    return "32-true"
