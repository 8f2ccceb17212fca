"""A run folder belongs to one live run at a time and keeps the records of earlier attempts.

Hydra writes a run's `.hydra/` records (config, overrides) before the run starts; two runs given
the same folder would overwrite each other's records, logs and checkpoints. `RunFolderGuard` (a
Hydra callback, conf/hydra/default.yaml) runs before that: it takes an exclusive lock on the
folder, which the operating system releases when the process ends however it ends (a killed run
leaves no stale lock), refuses with one line and exit status 2 if a live run holds it, and moves
the `.hydra/` of an earlier attempt to `.hydra.<n>` instead of letting it be overwritten (the CSV
log likewise goes to `csv.<n>/`, `csv_logger`). Default folder names carry the time and the
process id, so runs started together never share one. Under DDP only rank 0 guards; the other
ranks share its folder. On a filesystem without file locks the run goes ahead with a warning.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ssr import launch_rank

if TYPE_CHECKING:
    from lightning.pytorch.loggers import CSVLogger

log = logging.getLogger(__name__)

LOCK_FILE = ".ssr_run.lock"
RECORDS = ".hydra"

_held: dict[Path, IO[str]] = {}  # open lock files, kept for the life of the process


class RunFolderBusy(Exception):
    """Another live process holds the run folder."""


def is_rank_zero() -> bool:
    """True unless the environment says this process is rank > 0 of a distributed launch."""
    return launch_rank() == 0


def lock_folder(run_dir: Path) -> None:
    """Hold `run_dir`'s lock until this process ends; RunFolderBusy if another process holds it."""
    run_dir = run_dir.resolve()
    if run_dir in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = (run_dir / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as err:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise RunFolderBusy(f"run folder {run_dir} is in use by a live run ({owner})") from err
    except OSError as err:  # e.g. Lustre mounted without flock support: run, but say so
        handle.close()
        log.warning(
            f"cannot lock the run folder {run_dir} ({err.strerror or err}): this filesystem has "
            "no file locks, so nothing stops a second run from using the same folder"
        )
        return
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}: {' '.join(sys.argv)}\n")
    handle.flush()
    _held[run_dir] = handle


def release_folder(run_dir: Path) -> None:
    """Give up `run_dir`'s lock (a finished job of a long sweep: file handles are finite)."""
    handle = _held.pop(run_dir.resolve(), None)
    if handle is not None:
        handle.close()  # closing the file releases its lock


def keep_earlier_records(run_dir: Path) -> None:
    """Move an earlier attempt's `.hydra/` to `.hydra.<n>`."""
    if (run_dir / RECORDS / "config.yaml").is_file():
        keep_earlier(run_dir / RECORDS)


def keep_earlier(path: Path) -> None:
    """Move an earlier attempt's `path` (file or folder), if any, to `<path>.<n>` (first free n)."""
    if not path.exists():
        return
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    path.rename(path.with_name(f"{path.name}.{n}"))


def csv_logger(save_dir: str, name: str, **kwargs: Any) -> CSVLogger:
    """Lightning's CSV logger writing `<save_dir>/<name>/metrics.csv` (`kwargs`: its other
    options). Lightning deletes an existing metrics.csv there; a resumed attempt in the same folder
    keeps it as `<name>.<n>/`."""
    from lightning.pytorch.loggers import CSVLogger  # here: eval/predict load this module too

    if is_rank_zero():
        keep_earlier(Path(save_dir) / name)
    return CSVLogger(save_dir, name=name, version="", **kwargs)


def _refuse(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class RunFolderGuard(Callback):
    """Hydra callback: lock the run folder and keep earlier records, before Hydra writes any."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_rank_zero():
            self._guard(Path(config.hydra.run.dir), keep_records=True)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Multirun jobs: each job folder is new; only the lock matters (after Hydra's records).
        if is_rank_zero() and config.hydra.mode.name == "MULTIRUN":
            self._guard(Path(config.hydra.runtime.output_dir), keep_records=False)

    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None:
        release_folder(Path(config.hydra.runtime.output_dir))

    def _guard(self, run_dir: Path, keep_records: bool) -> None:
        try:
            lock_folder(run_dir)
        except RunFolderBusy as err:
            _refuse(f"{err}; wait for it to end or choose another hydra.run.dir")
        except OSError as err:
            _refuse(f"cannot create the run folder {run_dir}: {err.strerror or err}")
        if keep_records:
            keep_earlier_records(run_dir)
