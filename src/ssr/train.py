"""Training entry point: `python -m ssr.train experiment=<name> [overrides]` (also `ssr-train`).

The composition root: each config group builds one object, wired here in a few explicit lines.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from ssr import CONF_PATH
from ssr.errors import ConfigError, int_setting
from ssr.io import atomic_write_json
from ssr.metrics import iou_table
from ssr.run.cli import cli
from ssr.run.preemption import RunStopped
from ssr.run.resume import (
    ResumeError,
    StoreRunConfig,
    check_resume,
    has_hpc_checkpoint,
    hydra_overrides,
    newest_checkpoint,
    resolve_ckpt_path,
    restored_by_checkpoint,
)
from ssr.run.trainer import build_trainer
from ssr.uda.module import UDAModule

log = logging.getLogger(__name__)


def build_module(cfg: DictConfig) -> UDAModule:
    """The student segmentor (`model` group) inside the UDA module (`uda` group).

    The UDA parts (teacher, mixing, fd, masking, sam) are nodes of `uda`; those that need the
    student (its weights, its stage widths) are Hydra partials the module completes.
    """
    log.info(f"Instantiating segmentor <{cfg.model._target_}>")
    segmentor = instantiate(cfg.model)
    uda = cfg.uda
    if uda.get("sam") is not None and len(uda.sam.stages) == 0:
        log.info("uda.sam.stages=[]: no stage is fused, so no SAM (SSR Table I's plain DAFormer)")
        uda = OmegaConf.merge(uda, {"sam": None})
    log.info(f"Instantiating UDA module <{uda._target_}>")
    module = instantiate(
        uda, segmentor=segmentor, optim=cfg.optim, inference=instantiate(cfg.inference)
    )
    # Not a constructor argument: Hydra would instantiate the config's `_target_`.
    module.model_config = OmegaConf.to_container(cfg.model, resolve=True)
    return module


def train(cfg: DictConfig) -> dict[str, Any]:
    """Build data, model, UDA module and trainer from `cfg`, fit, then test the final student."""
    _check_run_settings(cfg)
    output_dir = Path(cfg.paths.output_dir)
    resume = _resume_path(cfg.ckpt_path, output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    config = OmegaConf.to_container(cfg, resolve=True)

    log.info(f"Instantiating datamodule <{cfg.data._target_}>")
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")  # scan the datasets first: a bad layout fails before any model is built
    module = build_module(cfg)
    if module.inference.resize != datamodule.test_resize:  # HRDA validates at full resolution
        log.info(f"Validation images at the model's test scale: {module.inference!r}")
        datamodule.test_resize, datamodule.val_set = module.inference.resize, None
        datamodule.setup("validate")
    module.configure_classes(datamodule.classes, datamodule.eval_subsets)
    _check_crop_rows(cfg, module)
    _check_detail_view(cfg, module)
    if resume is not None:  # before any logger or callback writes into the run folder
        _check_resume(resume, config, module)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    callbacks.append(StoreRunConfig(config))
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    for lg in loggers:  # the resolved config with the run (wandb config, CSV hparams.yaml)
        lg.log_hyperparams(config)
    trainer = build_trainer(cfg, callbacks, loggers)
    _print_summary(cfg, module, trainer, datamodule)
    # A signal (pre-emption, Ctrl-C) ends fit with RunStopped after saving; `main` reports it.
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    metrics: dict[str, Any] = {
        k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")
    }
    if cfg.test_after_fit:
        trainer.test(module, datamodule=datamodule, verbose=False)
        result = module.test_results
        if result is not None and trainer.is_global_zero:
            result = {**result, "num_images": len(datamodule.val_set)}
            atomic_write_json(output_dir / "metrics.json", result)
            Console().print(iou_table(result, title=f"{cfg.task_name}: final student, target val"))
            metrics["test/mIoU"] = result["mIoU"]
    return metrics


def _check_run_settings(cfg: DictConfig) -> None:
    """Top-level settings that would only fail (or silently do nothing) deep inside fit."""
    for key, minimum in (("seed", 0), ("trainer.max_steps", 1)):
        int_setting(OmegaConf.select(cfg, key), key, minimum)


def _check_crop_rows(cfg: DictConfig, module: UDAModule) -> None:
    """The pseudo-label crop must leave rows of the target crop to learn from, and HRDA's margin
    mask replaces it (the official HRDA ``dacs.py`` asserts that both are not used together)."""
    teacher, height = module.teacher, int(cfg.data.crop_size[0])
    if teacher is None:
        return
    top, bottom = teacher.ignore_top, teacher.ignore_bottom
    if top + bottom > 0 and cfg.data.get("pseudo_margins") is not None:
        raise ConfigError(
            f"data.pseudo_margins and uda.teacher.ignore_top / ignore_bottom = {top} / {bottom} "
            "crop rows exclude each other (HRDA); set both rows to 0 or data.pseudo_margins=null"
        )
    if top + bottom >= height:
        raise ConfigError(
            f"uda.teacher.ignore_top + ignore_bottom = {top} + {bottom} rows cover the whole "
            f"{height}-row target crop (data.crop_size): no pseudo-label would count; lower them"
        )


def _check_detail_view(cfg: DictConfig, module: UDAModule) -> None:
    """HRDA's detail view is a window of the training crop: it cannot be larger than the crop."""
    hr_crop = getattr(module.model, "hr_crop_size", None)
    crop = [int(c) for c in cfg.data.crop_size]
    if hr_crop is not None and any(h > c for h, c in zip(hr_crop, crop, strict=True)):
        raise ConfigError(
            f"model.hr_crop_size {list(hr_crop)} is larger than the training crop "
            f"data.crop_size {crop}: HRDA's detail view is a window of the crop (512 of 1024 in "
            "the paper); use data=gtaHR2csHR or a smaller model.hr_crop_size"
        )


def _check_resume(path: str | Path, config: dict, module: UDAModule) -> None:
    """Refuse a checkpoint of another run; say which changed settings take effect and which not."""
    changed = check_resume(path, config, module)
    log.info(f"resuming from {path}")
    ignored = [c for c in changed if restored_by_checkpoint(c[0])]
    if ignored:
        log.warning(
            f"{_diff(ignored)}: ignored, the checkpoint restores the optimiser and learning-rate "
            "schedule state, the random streams and the data stream; start anew to change them"
        )
    rest = [c for c in changed if not restored_by_checkpoint(c[0])]
    if rest:
        log.warning(f"{_diff(rest)}: changed since the checkpoint, this run's values apply")


def _diff(changes: list[tuple[str, Any, Any]], shown: int = 8) -> str:
    text = ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes[:shown])
    return text + (f" (and {len(changes) - shown} more)" if len(changes) > shown else "")


def _resume_path(ckpt_path: str | None, output_dir: Path) -> str | Path | None:
    """The checkpoint `ckpt_path` names. Without one, a requeued job (a folder with a pre-emption
    `hpc_ckpt_<n>.ckpt`) resumes from the folder's newest checkpoint, and starting afresh over an
    earlier run's checkpoint is refused."""
    resume = resolve_ckpt_path(ckpt_path, output_dir, *hydra_overrides())
    earlier = newest_checkpoint(output_dir)
    if resume is None and has_hpc_checkpoint(output_dir):
        resume = earlier
    if resume is None and earlier is not None:
        raise ResumeError(
            f"{output_dir} holds the checkpoint of an earlier run ({earlier}); continue it with "
            "ckpt_path=auto, or start anew in another hydra.run.dir"
        )
    return resume


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
        "uda": _describe_uda(module),
        "data": f"{datamodule.describe()}, batch {cfg.data.batch_size}",
        "test protocol": repr(module.inference),
        "steps": str(cfg.trainer.max_steps),
        "device": f"{type(trainer.accelerator).__name__.removesuffix('Accelerator')} "
        f"x{trainer.num_devices}",
        "precision": str(trainer.precision),
        "output": str(cfg.paths.output_dir),
    }
    for k, v in rows.items():
        table.add_row(k, v)
    Console().print(table)


def _describe_uda(module: UDAModule) -> str:
    if module.teacher is None:
        return "source only"
    text = "DACS self-training" + (" + FD" if module.fd is not None else "")
    text += " + MIC" if module.masking is not None else ""
    if module.sam is not None:
        text += f" + SSR ({module.sam.encoder.variant}, stages {list(module.sam.stages)})"
    return text


@hydra.main(config_path=CONF_PATH, config_name="train", version_base="1.3")
@cli
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except RunStopped as stop:
        what = "requeued" if stop.requeued else f"exit status {stop.exit_code}"
        log.warning(
            f"stopped early ({what}): {stop}; resume with ckpt_path=auto and the same "
            f"hydra.run.dir={cfg.paths.output_dir}, or ckpt_path={stop.path}"
        )
        sys.exit(stop.exit_code)
    value = metrics.get(cfg.optimized_metric)
    return None if value is None else float(value)


if __name__ == "__main__":
    main()
