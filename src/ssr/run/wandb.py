"""The wandb logger: offline without an API key, and a resumed run continues its wandb run id."""

from __future__ import annotations

import logging
import netrc
import os
import secrets
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from ssr.errors import UserError
from ssr.io import CheckpointError, atomic_write_text, load_torch_file
from ssr.run.resume import HPC_PREFIX, ResumeError, hydra_overrides, resolve_ckpt_path

log = logging.getLogger(__name__)


def wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


WANDB_ID_FILE = "wandb_run_id.txt"  # in the run directory: SLURM requeues and `ckpt_path=last`
WANDB_ID_KEY = "wandb_run_id"  # in checkpoints: a resume from a checkpoint of another directory


class WandbConfigError(UserError, ValueError):
    """An impossible wandb setting (e.g. uploading checkpoints from an offline run)."""


def wandb_api_key_configured() -> bool:
    """True if WANDB_API_KEY is set or `wandb login` stored a key (netrc) for the wandb host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(offline: bool | None) -> tuple[str, str]:
    """(wandb.init mode, why): explicit setting > WANDB_MODE > online iff an API key exists."""
    if offline is not None:
        return ("offline" if offline else "online"), "logger.wandb.offline"
    env = os.environ.get("WANDB_MODE")
    if env:
        return env, "WANDB_MODE"
    if wandb_api_key_configured():
        return "online", "API key configured"
    return "offline", "no API key configured (WANDB_API_KEY / wandb login)"


def previous_wandb_id(
    run_dir: Path,
    ckpt_path: str | None,
    overrides: Sequence[str] | None = None,
    search_siblings: bool = True,
) -> str | None:
    """The wandb run id of the run being resumed, or None for a fresh run.

    The checkpoint is the one `ssr.train` will resume from: `ckpt_path` (a file, `last`, `auto`;
    resolved by `ssr.run.resume.resolve_ckpt_path` with this run's Hydra `overrides`), or with
    no `ckpt_path` a SLURM requeue checkpoint (`hpc_ckpt_*.ckpt`) that Lightning restores itself.
    Its stored id (`WandbRunId`) wins; else the `wandb_run_id.txt` of the run that wrote it.
    """
    path: Path | None = None
    if ckpt_path is not None:
        try:
            resolved = resolve_ckpt_path(ckpt_path, run_dir, overrides, search_siblings)
        except ResumeError:  # ssr.train reports it when it resumes
            resolved = None
        path = None if resolved is None else Path(resolved)
    else:
        hpc = list(run_dir.glob(f"{HPC_PREFIX}*.ckpt"))
        path = max(hpc, key=lambda f: f.stat().st_mtime) if hpc else None
    if path is None:
        return None
    try:
        ckpt = load_torch_file(path, mmap=True)
    except CheckpointError as err:
        # ssr.train reports unreadable checkpoint files itself
        log.warning(f"wandb: cannot read the run id from {path}: {err}")
        ckpt = {}
    if isinstance(ckpt, dict) and ckpt.get(WANDB_ID_KEY):
        return str(ckpt[WANDB_ID_KEY])
    owner = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    sidecar = owner / WANDB_ID_FILE  # the run directory that wrote the checkpoint
    return (sidecar.read_text().strip() or None) if sidecar.is_file() else None


def new_wandb_id() -> str:
    """8 random lower-case letters and digits, the form of wandb's own run ids."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def wandb_logger(
    project: str = "ssr",
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    entity: str | None = None,
    save_dir: str = ".",
    run_dir: str | None = None,
    offline: bool | None = None,
    ckpt_path: str | None = None,
    log_model: bool | str = False,
) -> WandbLogger:
    """A `WandbLogger` that is offline without an API key and continues the resumed run's id.

    Args:
        project / name / group / tags / entity: wandb run metadata (conf/logger/wandb.yaml derives
            them from `task_name`, `seed` and `tags`).
        save_dir: where wandb writes `wandb/<run>` (offline runs: `wandb sync` that folder).
        run_dir: the Hydra run directory: holds `wandb_run_id.txt` and `checkpoints/`.
        offline: True / False force the mode; None = WANDB_MODE if set, else online iff an API
            key is configured.
        ckpt_path: the run's `ckpt_path` (a resume continues that run's wandb id).
        log_model: upload checkpoints as artifacts (online only).
    """
    mode, why = wandb_mode(offline)
    if log_model and mode != "online":
        raise WandbConfigError(
            f"logger.wandb.log_model={log_model} needs an online run, but wandb mode is {mode} "
            f"({why}); set logger.wandb.log_model=false or logger.wandb.offline=false"
        )
    run_path = Path(run_dir) if run_dir is not None else Path(save_dir)
    run_id = previous_wandb_id(run_path, ckpt_path, *hydra_overrides())
    resumed = run_id is not None
    run_id = run_id or new_wandb_id()
    if rank_zero_only.rank == 0:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        run_path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_path / WANDB_ID_FILE, run_id + "\n")
        sync = f"; upload later: wandb sync {Path(save_dir) / 'wandb'}" if mode == "offline" else ""
        state = "resuming" if resumed else "new"
        log.info(f"wandb: {mode} ({why}), {state} run {run_id} in {save_dir}{sync}")
    return WandbLogger(
        name=name,
        save_dir=save_dir,
        id=run_id,
        project=project,
        log_model=log_model,
        group=group,
        tags=[str(t) for t in tags],
        entity=entity,
        mode=mode,
    )


class WandbRunId(Callback):
    """Stores the wandb run id in every checkpoint, so a resume from it continues the same run."""

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        for lg in wandb_loggers(trainer):
            if lg.version:
                checkpoint[WANDB_ID_KEY] = lg.version
