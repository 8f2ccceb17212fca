"""Pre-emption: save at a step boundary on SIGUSR1/SIGTERM, stop, and requeue the SLURM job."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from ssr.run.resume import next_hpc_path

log = logging.getLogger(__name__)


class CheckpointOnSignal(pl.Callback):
    """On any of `signums`: checkpoint at the next step boundary, stop, requeue the SLURM job.

    Submit with `sbatch --signal=SIGUSR1@120` (SLURM then signals 2 minutes before the time
    limit); outside SLURM `kill -USR1 <pid>` checkpoints and stops. The checkpoint is
    `<default_root_dir>/hpc_ckpt_<n>.ckpt`, where `ckpt_path=auto|last` look. Lightning's
    built-in SLURM handler saves inside the signal handler, i.e. possibly in the middle of a step
    (half-advanced RNGs, an optimiser step counted twice on resume); this one only sets a flag, so
    the saved state is a step boundary and resuming stays exact. Under DDP a signal on any rank
    stops all ranks at the same step.
    """

    def __init__(
        self, signums: Sequence[int] = (signal.SIGUSR1, signal.SIGTERM), requeue: bool = True
    ) -> None:
        self.signums, self.requeue = tuple(signal.Signals(s) for s in signums), requeue
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Installed after Lightning's signal connector, so this handler is the one that runs.
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.signums}

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        # One all-reduce per step for all signals: a signal on any rank stops every rank.
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        name = self.received.name if self.received is not None else "signal on another rank"
        self.received = None
        path = next_hpc_path(Path(trainer.default_root_dir))
        trainer.save_checkpoint(path)
        log.warning(f"{name}: saved {path} at step {trainer.global_step}; stopping")
        trainer.should_stop = True
        if self.requeue and trainer.is_global_zero:
            requeue_slurm_job()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous and threading.current_thread() is threading.main_thread():
            for s, handler in self._previous.items():
                signal.signal(s, handler)
            self._previous = {}


def requeue_slurm_job() -> None:
    """`scontrol requeue` this job (array task); nothing outside SLURM."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        log.warning("not a SLURM job: nothing requeued; resume with ckpt_path=auto or last")
        return
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        log.error(f"scontrol requeue {job} failed: {result.stderr.strip()}")
    else:
        log.warning(f"requeued SLURM job {job}")
