"""Which checkpoint `ckpt_path=<file>|last|auto` resumes from, and where SLURM requeues save.

The reference saves one checkpoint at 40k iterations and re-initialises the EMA teacher on resume;
here a run resumes bit-for-bit from the newest checkpoint of its run directory (or of an earlier
run directory with the same overrides).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from omegaconf import ListConfig, OmegaConf

from ssr.errors import UserError

log = logging.getLogger(__name__)

HPC_PREFIX = "hpc_ckpt_"  # step-boundary checkpoints written on SIGUSR1/SIGTERM, in the run dir


class ResumeError(UserError, FileNotFoundError):
    """`ckpt_path` names no checkpoint that can be resumed from."""


def hydra_overrides() -> tuple[list[str] | None, bool]:
    """(this run's task overrides, whether `last` may look into earlier run directories).

    Outside Hydra: (None, True). In a multirun the siblings are other jobs of the sweep, so only
    the job's own directory counts.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None, True
    hydra_cfg = HydraConfig.get()
    return list(hydra_cfg.overrides.task), hydra_cfg.mode != RunMode.MULTIRUN


def resolve_ckpt_path(
    ckpt_path: str | None,
    output_dir: str | Path,
    overrides: Sequence[str] | None = None,
    search_siblings: bool = True,
) -> str | None:
    """The checkpoint file that `ckpt_path` names, or None to start from scratch.

    - a path: that file (it must exist);
    - `last`: the newest resumable checkpoint (`checkpoints/last.ckpt`, or a pre-emption
      `hpc_ckpt_*.ckpt`) of this run directory; if it has none (a new run directory, as Hydra
      creates one per launch), of the most recent earlier run directory next to it whose
      `.hydra/overrides.yaml` lists the same overrides as this run (`ckpt_path=` aside), i.e. the
      same experiment. Error if there is none.
    - `auto`: this run directory's newest checkpoint, else None (start fresh). For job scripts
      that fix `hydra.run.dir` (e.g. to the SLURM job id) and are requeued.

    Args:
        output_dir: this run's directory (`paths.output_dir`).
        overrides: this run's task overrides (`hydra_overrides()`); None matches only runs
            without overrides.
        search_siblings: look into earlier run directories for `last`.
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


def next_hpc_path(run_dir: Path) -> Path:
    """`hpc_ckpt_<n+1>.ckpt` after the highest existing `n` (Lightning's naming)."""
    pattern = re.compile(rf"{HPC_PREFIX}(\d+)\.ckpt")
    names = [p.name for p in run_dir.iterdir()] if run_dir.is_dir() else []
    numbers = [int(m.group(1)) for n in names if (m := pattern.fullmatch(n))]
    return run_dir / f"{HPC_PREFIX}{max(numbers, default=0) + 1}.ckpt"


def _comparable(overrides: Sequence[str]) -> list[str]:
    return sorted(o for o in overrides if not o.lstrip("+~").startswith("ckpt_path="))


def _run_overrides(run_dir: Path) -> list[str] | None:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    try:
        loaded = OmegaConf.load(path)
    except Exception:  # a damaged file: not a run to resume
        return None
    if not isinstance(loaded, ListConfig):
        return None
    # Unresolved: an override such as a=${b} is a string here, not an interpolation.
    return _comparable([str(v) for v in OmegaConf.to_container(loaded, resolve=False)])
