"""Crash-safe checkpoints and exact resume of long runs (issue 5; ALGORITHM.md §4.11, §10).

The reference saves one checkpoint at 40k iterations and re-initialises the EMA teacher on resume.
Here a resumed run continues bit-for-bit: Lightning restores the weights (student, EMA teacher,
SSR fusion layers), optimiser, LR schedule position and step; the datamodule restores its sample
stream (`UDADataModule.state_dict`); `UDAModule` restores its own augmentation RNGs; this module
adds the rest:

- `AtomicCheckpointIO` writes each checkpoint to a temporary file in the destination directory,
  fsyncs it and renames it over the old one, so a kill leaves either the old or the new file.
  (Lightning's own writer stages the file in the system temp dir, which on clusters is usually
  another filesystem than the run directory: the final move is then a copy, not a rename.)
- `RNGStateCallback` saves every rank's global RNG states (torch CPU/CUDA, NumPy, Python: dropout
  and drop-path draw from torch's) and restores them right before the first resumed step.
- `CheckpointOnSignal`: SIGUSR1 (SLURM's `--signal`, or `kill -USR1`) saves a checkpoint at the
  next step boundary, stops training and requeues the SLURM job.
- `resolve_ckpt_path` turns `ckpt_path=last|auto` into a file (see its docstring).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import signal
import subprocess
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import ListConfig, OmegaConf

log = logging.getLogger(__name__)

RNG_KEY = "global_rng"  # checkpoint key: one entry per rank
HPC_PREFIX = "hpc_ckpt_"  # Lightning's SLURM requeue checkpoints, in the run directory


class ResumeError(FileNotFoundError):
    """`ckpt_path` names no checkpoint that can be resumed from."""


# ---------------------------------------------------------------------------- atomic writes
def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """`torch.save` to a temp file next to `path`, fsync, then `os.replace` (atomic on POSIX).

    On any failure, including KeyboardInterrupt, the temp file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    # os.open applies the umask (mkstemp would create a 0600 file).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)
    _remove_stale_temps(path)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (the directory entry), where the OS allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_stale_temps(path: Path) -> None:
    """Delete temp files that killed writers of `path` left behind (their pid is gone)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        parts = tmp.name[len(path.name) + 2 :].split(".")
        if not parts[0].isdigit() or _pid_alive(int(parts[0])):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO with `atomic_torch_save` for local paths.

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


# ------------------------------------------------------------------------------- RNG states
def collect_rng_states() -> dict[str, Any]:
    """The process-global RNG states, as plain types (loadable with `weights_only=True`)."""
    np_state = np.random.get_state(legacy=False)
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Inverse of `collect_rng_states`; CUDA states are restored only for the same device count."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    key = n["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(states["python"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def rank_seed(seed: int, rank: int) -> int:
    """A 32-bit seed of rank `rank`'s own stream, independent of the other ranks' streams."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0])


def gather_from_ranks(obj: Any) -> list[Any]:
    """`[obj of rank 0, obj of rank 1, ...]`; `[obj]` outside torch.distributed.

    Collective: under DDP every rank must call it (checkpoint hooks run on every rank).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def for_this_rank(states: Sequence[Any] | None, rank: int, world_size: int) -> Any | None:
    """This rank's entry of a per-rank list saved with `gather_from_ranks`, or None.

    With a different world size only rank 0 gets its state back; the other ranks keep their
    freshly seeded streams (the run is then no longer bit-exact, which is logged).
    """
    if not states:
        return None
    if len(states) == world_size:
        return states[rank]
    log.warning(
        f"checkpoint holds RNG states of {len(states)} ranks, this run has {world_size}: "
        "only rank 0 resumes its random streams exactly"
    )
    return states[0] if rank == 0 else None


class RNGStateCallback(pl.Callback):
    """Global RNG states of every rank in checkpoints; restored before the first resumed step.

    Restoring at `on_train_batch_start` rather than at load time matters: between loading and the
    first step Lightning builds the data loader iterators, and nothing that happens there may
    shift the streams the training step draws from. Under DDP, ranks > 0 are also re-seeded with
    `rank_seed(seed, rank)` at setup, so that their dropout masks differ from rank 0's
    (`seed_everything` gives every rank the same seed).
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.global_rank > 0:
            seed = rank_seed(int(os.environ.get("PL_GLOBAL_SEED", 0)), trainer.global_rank)
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[RNG_KEY] = gather_from_ranks(collect_rng_states())

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        states = checkpoint.get(RNG_KEY)
        self._pending = for_this_rank(states, trainer.global_rank, trainer.world_size)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None


# --------------------------------------------------------------------- pre-emption signals
class CheckpointOnSignal(pl.Callback):
    """On any of `signums`: checkpoint at the next step boundary, stop, requeue the SLURM job.

    Submit with `sbatch --signal=SIGUSR1@120` (SLURM then signals 2 minutes before the time
    limit); outside SLURM `kill -USR1 <pid>` checkpoints and stops. The checkpoint is
    `<default_root_dir>/hpc_ckpt_<n>.ckpt`, where `ckpt_path=auto|last` and Lightning's own SLURM
    resume look. Lightning's built-in SLURM handler saves inside the signal handler, i.e. possibly
    in the middle of a step (half-advanced RNGs, an optimiser step counted twice on resume); this
    one only sets a flag, so the saved state is a step boundary and resuming stays exact. Under
    DDP a signal on any rank stops all ranks at the same step.
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


def next_hpc_path(run_dir: Path) -> Path:
    """`hpc_ckpt_<n+1>.ckpt` after the highest existing `n` (Lightning's naming)."""
    pattern = re.compile(rf"{HPC_PREFIX}(\d+)\.ckpt")
    names = [p.name for p in run_dir.iterdir()] if run_dir.is_dir() else []
    numbers = [int(m.group(1)) for n in names if (m := pattern.fullmatch(n))]
    return run_dir / f"{HPC_PREFIX}{max(numbers, default=0) + 1}.ckpt"


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


# ------------------------------------------------------------------------- ckpt_path values
def resolve_ckpt_path(
    ckpt_path: str | None,
    output_dir: str | Path,
    overrides: Sequence[str] | None = None,
    search_siblings: bool = True,
) -> str | None:
    """The checkpoint file that `ckpt_path` names, or None to start from scratch.

    - a path: that file (it must exist);
    - `last`: the newest resumable checkpoint (`checkpoints/last.ckpt`, or a SLURM requeue
      `hpc_ckpt_*.ckpt`) of this run directory; if it has none (a new run directory, as Hydra
      creates one per launch), of the most recent earlier run directory next to it whose
      `.hydra/overrides.yaml` lists the same overrides as this run (`ckpt_path=` aside), i.e. the
      same experiment. Error if there is none.
    - `auto`: this run directory's newest checkpoint, else None (start fresh). For job scripts
      that fix `hydra.run.dir` (e.g. to the SLURM job id) and are requeued.

    Args:
        output_dir: this run's directory (`paths.output_dir`).
        overrides: this run's task overrides (`HydraConfig.get().overrides.task`); None matches
            only runs without overrides.
        search_siblings: look into earlier run directories for `last` (False for multirun jobs,
            whose siblings are other jobs of the sweep).
    """
    if ckpt_path is None:
        return None
    output_dir = Path(output_dir)
    if ckpt_path not in ("last", "auto"):
        path = Path(ckpt_path)
        if not path.is_file():
            raise ResumeError(f"ckpt_path {path} does not exist; pass an existing .ckpt file")
        return str(path)
    own = newest_checkpoint(output_dir)
    if own is not None or ckpt_path == "auto":
        if own is not None:
            log.info(f"resuming from {own}")
        return None if own is None else str(own)
    if search_siblings:
        wanted = _comparable(overrides or [])
        found = [
            ckpt
            for run in output_dir.parent.iterdir()
            if run.is_dir() and run != output_dir and _run_overrides(run) == wanted
            if (ckpt := newest_checkpoint(run)) is not None
        ]
        if found:
            path = max(found, key=lambda p: p.stat().st_mtime)
            log.info(f"resuming from {path} (the latest run with the same overrides)")
            return str(path)
    where = f"{output_dir} or an earlier run of it in {output_dir.parent}"
    raise ResumeError(
        f"ckpt_path=last: no checkpoints/last.ckpt in {where if search_siblings else output_dir}; "
        "pass hydra.run.dir=<old run dir> or ckpt_path=<file>"
    )


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The most recently written of `checkpoints/last.ckpt` and `hpc_ckpt_*.ckpt` in `run_dir`."""
    candidates = [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob(f"{HPC_PREFIX}*.ckpt")]
    files = [p for p in candidates if p.is_file()]
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def _comparable(overrides: Sequence[str]) -> list[str]:
    return sorted(o for o in overrides if not o.lstrip("+~").startswith("ckpt_path="))


def _run_overrides(run_dir: Path) -> list[str] | None:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    try:
        values = OmegaConf.load(path)
    except Exception:  # a damaged file: not a run to resume
        return None
    return _comparable([str(v) for v in values]) if isinstance(values, ListConfig) else None
