"""Training entry point: `python -m ssr.train experiment=<name> [overrides]` (also `ssr-train`).

The composition root: each config group builds one object, wired here in a few explicit lines.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from ssr import CONF_DIR
from ssr.callbacks import WandbConfigError
from ssr.checkpointing import (
    AtomicCheckpointIO,
    CheckpointOnSignal,
    RNGStateCallback,
    resolve_ckpt_path,
)
from ssr.data.datasets import DatasetError
from ssr.metrics import iou_table
from ssr.model.checkpoint import CheckpointError
from ssr.uda.module import NonFiniteLossError, UDAConfigError, UDAModule
from ssr.uda.sam import SamCheckpointError

log = logging.getLogger(__name__)


class TrainerConfigError(ValueError):
    """A trainer setting that cannot work for this launch (DDP sampler, DDP inside a sweep)."""


# Errors a user can fix from the command line: one line on stderr, exit code 2.
USER_ERRORS = (
    DatasetError,
    CheckpointError,
    SamCheckpointError,
    NonFiniteLossError,
    UDAConfigError,
    WandbConfigError,
    TrainerConfigError,
    FileNotFoundError,
)


def build_module(cfg: DictConfig) -> UDAModule:
    """The student segmentor (`model` group) inside the UDA module (`uda` group).

    The module builds its own training-only parts (teacher, SAM) from its config, with shapes
    taken from the student, hence `_recursive_=False`.
    """
    log.info(f"Instantiating segmentor <{cfg.model._target_}>")
    segmentor = instantiate(cfg.model)
    log.info(f"Instantiating UDA module <{cfg.uda._target_}>")
    return instantiate(
        cfg.uda,
        segmentor=segmentor,
        optim=cfg.optim,
        model_config=OmegaConf.to_container(cfg.model, resolve=True),
        seed=cfg.seed,
        _recursive_=False,
    )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build data, model, UDA module and trainer from `cfg`, fit, then test the final student."""
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)

    log.info(f"Instantiating datamodule <{cfg.data._target_}>")
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")  # scan the datasets first: a bad layout fails before any model is built
    module = build_module(cfg)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    for lg in loggers:  # the resolved config with the run (wandb config, CSV hparams.yaml)
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer = _build_trainer(cfg, callbacks, loggers)
    _print_summary(cfg, module, trainer, datamodule)

    trainer.fit(module, datamodule=datamodule, ckpt_path=_resolve_ckpt(cfg.ckpt_path, output_dir))
    if trainer.global_step < trainer.max_steps:  # pre-empted (SIGUSR1) or interrupted (Ctrl-C)
        log.warning(f"stopped at step {trainer.global_step}; resume with ckpt_path=auto or last")
        return {}
    metrics: dict[str, Any] = {
        k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")
    }
    if cfg.test_after_fit:
        trainer.test(module, datamodule=datamodule, verbose=False)
        result = module.test_results
        if result is not None and trainer.is_global_zero:
            result = {**result, "num_images": len(datamodule.val_set)}
            (output_dir / "metrics.json").write_text(json.dumps(result, indent=2))
            Console().print(iou_table(result, title=f"{cfg.task_name}: final student, target val"))
            metrics["test/mIoU"] = result["mIoU"]
    return metrics


def _build_trainer(cfg: DictConfig, callbacks: list[pl.Callback], loggers: list) -> pl.Trainer:
    """The trainer of `cfg.trainer` plus what exact resume needs in every run: atomic checkpoint
    files, the RNG states in them, a step-boundary checkpoint on SIGUSR1 (SLURM pre-emption);
    `precision: auto` resolved (`_auto_precision`)."""
    plugins = [instantiate(p) for p in cfg.trainer.get("plugins") or []]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        # SIGUSR1: SLURM's advance warning (--signal); SIGTERM: pre-emption / scancel.
        callbacks=[*callbacks, RNGStateCallback(), CheckpointOnSignal()],
        logger=loggers or False,
        plugins=plugins,
        precision=_auto_precision(cfg.trainer),
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


def _auto_precision(trainer_cfg: DictConfig) -> str | int | None:
    """`auto`: bf16-mixed on CUDA GPUs with bf16 (Ampere+), 16-mixed on older ones, else 32-true.

    Mixed precision is a deviation from the reference's fp32 (ALGORITHM.md §10.1).
    """
    value = trainer_cfg.get("precision")
    if value != "auto":
        return value
    if trainer_cfg.get("accelerator", "auto") in ("auto", "gpu", "cuda") and (
        torch.cuda.is_available()
    ):
        return "bf16-mixed" if torch.cuda.get_device_capability() >= (8, 0) else "16-mixed"
    return "32-true"


def _resolve_ckpt(ckpt_path: str | None, output_dir: Path) -> str | None:
    """`ssr.checkpointing.resolve_ckpt_path` with this run's Hydra overrides."""
    overrides, siblings = None, True
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        overrides = list(hydra_cfg.overrides.task)
        siblings = hydra_cfg.mode != RunMode.MULTIRUN  # a sweep's siblings are other jobs
    return resolve_ckpt_path(ckpt_path, output_dir, overrides, siblings)


def _print_summary(
    cfg: DictConfig, module: pl.LightningModule, trainer: pl.Trainer, datamodule: Any
) -> None:
    """One table with what is about to run: the first thing to check in a job log."""
    if not trainer.is_global_zero:
        return
    student = sum(p.numel() for p in module.model.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    table = Table(title="ssr.train", show_header=False)
    rows = {
        "experiment": f"{cfg.task_name} {list(cfg.get('tags') or [])}",
        "model": f"{cfg.model.backbone.variant} ({student:,} params shipped)",
        "trainable params": f"{trainable:,}",
        "uda": cfg.uda._target_.rsplit(".", 1)[-1]
        + (" + self-training" if cfg.uda.get("self_training") else " (source only)")
        + (" + MIC" if cfg.uda.get("masking") else "")
        + (
            f" + SSR ({cfg.uda.sam.variant}, stages {list(cfg.uda.sam.stages)})"
            if cfg.uda.get("sam")
            else ""
        ),
        "data": f"{datamodule.describe()}, batch {cfg.data.batch_size}",
        "steps": str(cfg.trainer.max_steps),
        "device": f"{trainer.accelerator.__class__.__name__} x{trainer.num_devices}",
        "precision": str(trainer.precision),
        "output": str(cfg.paths.output_dir),
    }
    for k, v in rows.items():
        table.add_row(k, v)
    Console().print(table)


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    torch.set_float32_matmul_precision("high")
    try:
        metrics = train(cfg)
    except Exception as err:
        # Hydra wraps constructor errors (e.g. a missing weights file) in InstantiationException,
        # once per nesting level (SAM is built inside the UDA module).
        cause: BaseException | None = err
        while isinstance(cause, InstantiationException) and cause.__cause__ is not None:
            cause = cause.__cause__
        if not isinstance(cause, USER_ERRORS):
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)
    value = metrics.get(cfg.optimized_metric)
    return None if value is None else float(value)


if __name__ == "__main__":
    main()
