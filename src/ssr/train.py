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
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from ssr import CONF_DIR
from ssr.data.datasets import DatasetError
from ssr.metrics import iou_table
from ssr.model.checkpoint import CheckpointError
from ssr.uda.module import NonFiniteLossError, UDAConfigError
from ssr.uda.sam import SamCheckpointError

log = logging.getLogger(__name__)

# Errors a user can fix from the command line: one line on stderr, exit code 2.
USER_ERRORS = (
    DatasetError,
    CheckpointError,
    SamCheckpointError,
    NonFiniteLossError,
    UDAConfigError,
    FileNotFoundError,
)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build data, model, UDA module and trainer from `cfg`, fit, then test the final student."""
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)

    log.info(f"Instantiating datamodule <{cfg.data._target_}>")
    datamodule = instantiate(cfg.data)
    log.info(f"Instantiating segmentor <{cfg.model._target_}>")
    segmentor = instantiate(cfg.model)
    log.info(f"Instantiating UDA module <{cfg.uda._target_}>")
    module = instantiate(
        cfg.uda,
        segmentor=segmentor,
        optim=cfg.optim,
        model_config=OmegaConf.to_container(cfg.model, resolve=True),
        seed=cfg.seed,
        _recursive_=False,
    )
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    _print_summary(cfg, module, trainer)

    trainer.fit(module, datamodule=datamodule, ckpt_path=_resolve_ckpt(cfg.ckpt_path, output_dir))
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


def _resolve_ckpt(ckpt_path: str | None, output_dir: Path) -> str | None:
    """`last` means the run directory's last.ckpt; anything else must be an existing file."""
    if ckpt_path is None:
        return None
    path = output_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path {path} does not exist; pass an existing .ckpt file")
    return str(path)


def _print_summary(cfg: DictConfig, module: pl.LightningModule, trainer: pl.Trainer) -> None:
    """One table with what is about to run: the first thing to check in a job log."""
    if not trainer.is_global_zero:
        return
    student = sum(p.numel() for p in module.model.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    table = Table(title="ssr.train", show_header=False)
    rows = {
        "experiment": str(cfg.get("tags") or cfg.task_name),
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
        # Hydra wraps constructor errors (e.g. a missing weights file) in InstantiationException.
        cause = err.__cause__ if isinstance(err, InstantiationException) else err
        if not isinstance(cause, USER_ERRORS):
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)
    value = metrics.get(cfg.optimized_metric)
    return None if value is None else float(value)


if __name__ == "__main__":
    main()
