"""Which checkpoint `ckpt_path=<file>|last|auto` resumes from, and where SLURM requeues save.

The reference saves one checkpoint at 40k iterations and re-initialises the EMA teacher on resume;
here a run resumes bit-for-bit from the newest checkpoint of its run directory (or of an earlier
run directory with the same overrides).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from omegaconf import ListConfig, OmegaConf
from torch import nn

from ssr.errors import UserError
from ssr.io import load_torch_file, state_dict_problems

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
            return str(max(found, key=lambda p: p.stat().st_mtime))
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


def _hpc_numbers(run_dir: Path) -> list[int]:
    pattern = re.compile(rf"{HPC_PREFIX}(\d+)\.ckpt")
    names = [p.name for p in run_dir.iterdir()] if run_dir.is_dir() else []
    return [int(m.group(1)) for n in names if (m := pattern.fullmatch(n))]


def next_hpc_path(run_dir: Path) -> Path:
    """`hpc_ckpt_<n+1>.ckpt` after the highest existing `n` (Lightning's naming)."""
    return run_dir / f"{HPC_PREFIX}{max(_hpc_numbers(run_dir), default=0) + 1}.ckpt"


def has_hpc_checkpoint(run_dir: Path) -> bool:
    """Whether a pre-emption stop saved `hpc_ckpt_<n>.ckpt` here (the folder of a requeued job)."""
    return bool(_hpc_numbers(run_dir))


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


# ------------------------------------------------------------------- what a resume may change
RUN_CONFIG_KEY = "run_config"  # the resolved run config, in every checkpoint
# The experiment and the network: a checkpoint of another one is never resumed.
IDENTITY_KEYS = ("task_name", "model")
# Settings whose state a checkpoint restores: changing them on resume has no effect.
RESTORED_PREFIXES = ("optim.", "seed", "data.seed")


def restored_by_checkpoint(key: str) -> bool:
    """True for a dotted config key whose value a resume takes from the checkpoint's state
    (optimiser and schedule state, RNG states, the data stream's seed)."""
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in RESTORED_PREFIXES)


class StoreRunConfig(pl.Callback):
    """The resolved run config in every checkpoint, so a resume can compare it with its own."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[RUN_CONFIG_KEY] = self.config


def check_resume(
    path: str | Path, config: dict[str, Any], module: nn.Module
) -> list[tuple[str, Any, Any]]:
    """Refuse, in one line, a checkpoint this run cannot continue; list the settings that differ.

    Refused: an unreadable file, a file that is not a training checkpoint of ssr.train, one of
    another experiment or model (`IDENTITY_KEYS`; the ImageNet weight path aside), and one whose
    weights do not fit this run's networks. Returns the other differing settings as (dotted key,
    checkpoint's value, this run's value), run folders aside, for a warning: the optimiser and
    schedule state come from the checkpoint.
    """
    ckpt = load_torch_file(path, hint="expected a checkpoint of ssr.train", mmap=True)
    if not isinstance(ckpt, dict) or "pytorch-lightning_version" not in ckpt:
        raise ResumeError(
            f"{path} is not a training checkpoint of ssr.train (an export or an official "
            "file?); evaluate it with ssr.eval, or train from scratch"
        )
    stored = ckpt.get(RUN_CONFIG_KEY) or {}
    for key in IDENTITY_KEYS:
        if key in stored and _identity(stored, key) != _identity(config, key):
            raise ResumeError(
                f"{path} belongs to another run ({key} differs: {_short(stored[key])} there, "
                f"{_short(config.get(key))} here); resume it with its own experiment or start anew"
            )
    problems = state_dict_problems(module.state_dict(), ckpt.get("state_dict", {}))
    if problems:
        raise ResumeError(
            f"{path} does not fit this run's networks: {'; '.join(problems)} (another model or "
            "other UDA parts?)"
        )
    if not stored:
        return []
    # Run folders and resume settings differ between attempts by design.
    folders = {str(c.get("paths", {}).get("output_dir")) for c in (stored, config)}
    old, new = _flat(stored), _flat(config)
    return [
        (key, old.get(key), new.get(key))
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key)
        and not key.endswith("ckpt_path")
        and not any(f in str(v) for v in (old.get(key), new.get(key)) for f in folders)
    ]


def _identity(config: dict[str, Any], key: str) -> Any:
    value = config.get(key)
    if key == "model" and isinstance(value, dict):  # the weight file's location may move
        value = {**value, "backbone": {**value.get("backbone", {}), "pretrained": None}}
    return value


def _flat(config: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(config, dict):
        return {prefix: config}
    out: dict[str, Any] = {}
    for key, value in config.items():
        out |= _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value}
    return out


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."
