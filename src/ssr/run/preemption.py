"""Stopping a run on a signal: save at a step boundary, stop at once, requeue on a cluster.

SIGUSR1 (SLURM's `--signal` warning), SIGTERM (pre-emption, `scancel`) and SIGINT (Ctrl-C) all
save `<run dir>/hpc_ckpt_<n>.ckpt` at the next step boundary and stop without the validation
Lightning would run on an early stop (it would eat the pre-emption grace time). A SLURM job is
requeued on SIGUSR1/SIGTERM; `ssr.train` then exits 0 so the scheduler sees a requeue, and
otherwise 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM), so a stop never looks like
a finished run. A second Ctrl-C while the step finishes aborts at once (exit 130, nothing saved).
DataLoader workers ignore these signals (`ssr.data.workers`): the main process handles them.
"""

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
import torch

from ssr.run.cli import Interrupted
from ssr.run.resume import next_hpc_path

log = logging.getLogger(__name__)

REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class RunStopped(Exception):
    """Raised at the step boundary after a signal's checkpoint was saved; ends `trainer.fit`."""

    def __init__(self, signum: signal.Signals, path: Path, step: int, requeued: bool):
        super().__init__(f"{signum.name} at step {step}: saved {path}")
        self.signum, self.path, self.requeued = signum, path, requeued

    @property
    def exit_code(self) -> int:
        """0 when the job was requeued, else 128 + the signal number (shell convention)."""
        return 0 if self.requeued else 128 + int(self.signum)


class CheckpointOnSignal(pl.Callback):
    """On any of `signums`: checkpoint at the next step boundary, stop, requeue a SLURM job.

    Submit with `sbatch --signal=SIGUSR1@120` (SLURM then signals 2 minutes before the time
    limit). Lightning's built-in SLURM handler saves inside the signal handler, i.e. possibly in
    the middle of a step (half-advanced RNGs, an optimiser step counted twice on resume); this one
    only sets a flag, so the saved state is a step boundary and resuming stays exact. Under DDP a
    signal on any rank stops all ranks at the same step.
    """

    def __init__(
        self,
        signums: Sequence[int] = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT),
        requeue: bool = True,
    ) -> None:
        self.signums, self.requeue = tuple(signal.Signals(s) for s in signums), requeue
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Installed after Lightning's signal connector, so this handler is the one that runs.
        if threading.current_thread() is not threading.main_thread():
            return
        for s in self.signums:
            if s == signal.SIGINT and signal.getsignal(s) is signal.SIG_IGN:
                continue  # started in the background (`&`): Ctrl-C is not meant for this run
            self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise Interrupted  # the second Ctrl-C: do not wait for the step to finish
        self.received = signal.Signals(signum)
        if signum == signal.SIGINT:
            log.warning("Ctrl-C: saving at the end of this step (press again to abort now)")

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        # One all-reduce per step for all signals: a signal on any rank stops every rank.
        received = int(self.received or 0)
        if not trainer.strategy.reduce_boolean_decision(received != 0, all=False):
            return
        self.received = None
        # Every rank stops for the same signal (the highest number any rank received) and
        # exits with the same status.
        mine = torch.tensor(received, device=trainer.strategy.root_device)
        signum = signal.Signals(int(trainer.strategy.reduce(mine, reduce_op="max")))
        path = next_hpc_path(Path(trainer.default_root_dir))
        trainer.save_checkpoint(path)
        requeued = False
        if self.requeue and signum in REQUEUE_SIGNALS and trainer.is_global_zero:
            requeued = requeue_slurm_job()
        requeued = bool(trainer.strategy.broadcast(requeued, src=0))
        raise RunStopped(signum, path, trainer.global_step, requeued)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous and threading.current_thread() is threading.main_thread():
            for s, handler in self._previous.items():
                signal.signal(s, handler)
            self._previous = {}


def requeue_slurm_job() -> bool:
    """`scontrol requeue` this job (array task); False outside SLURM or when it fails."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return False
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
        log.error(f"scontrol requeue {job} failed: {result.stderr.strip()}")
        return False
    log.warning(f"requeued SLURM job {job}")
    return True
