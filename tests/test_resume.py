"""Exact resume and crash-safe checkpoints: atomic writes, `ckpt_path` resolution,
bit-exact continuation in-process and after a SIGKILL of `python -m ssr.train`."""

from __future__ import annotations

import errno
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf

from ssr.io import WriteError, atomic_torch_save
from ssr.run.resume import ResumeError, resolve_ckpt_path
from ssr.run.rng import RNGStateCallback
from ssr.run.trainer import AtomicCheckpointIO
from ssr.train import build_module

from helpers import (
    CLI_ENV,
    compose_cfg,
    cpu_trainer,
    run_cli,
    synthetic_data,
    synthetic_train,
    torch_threads,
)


def load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------ atomic writes
class FailsToPickle:
    """Stands for a write that dies half-way (disk full, kill): pickling it raises."""

    def __reduce__(self) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device (simulated)")


def test_failed_save_keeps_previous_checkpoint_and_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.full((1000,), 1.0)}, path)
    # The tensor is serialised before the failing entry: a direct write would leave a torn file.
    with pytest.raises(WriteError, match=r"no space left on device at .*last\.ckpt; the previous"):
        io.save_checkpoint({"w": torch.full((100_000,), 2.0), "boom": FailsToPickle()}, path)
    ckpt = load(path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.full((1000,), 1.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]


KILL_WRITER = textwrap.dedent(
    """
    import sys, torch
    from ssr.io import atomic_torch_save
    version = 0
    while True:
        version += 1
        atomic_torch_save({"version": version, "w": torch.full((4_000_000,), float(version))},
                          sys.argv[1])
        print(version, flush=True)
    """
)


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and int(proc.stdout.readline()) == 1  # v1 complete
        deadline = time.monotonic() + 60
        while not any(p.stat().st_size > 0 for p in tmp_path.glob(".last.ckpt.*.tmp")):
            assert time.monotonic() < deadline, "the writer never started a second save"
        proc.send_signal(signal.SIGKILL)  # 16 MB half written
    finally:
        proc.kill()
        proc.wait()
    stale = list(tmp_path.glob(".last.ckpt.*.tmp"))
    assert stale, "the kill did not land during a save"
    ckpt = load(path)  # the last complete version, whole
    assert ckpt["version"] >= 1 and torch.equal(
        ckpt["w"], torch.full_like(ckpt["w"], ckpt["version"])
    )
    assert ckpt["w"].numel() == 4_000_000
    atomic_torch_save({"version": 0}, path)  # the next save removes the dead writer's temp file
    assert not list(tmp_path.glob(".last.ckpt.*.tmp"))


# ----------------------------------------------------------------------------- ckpt_path=...
def make_run(parent: Path, name: str, overrides: list[str], ckpt: str | None) -> Path:
    run = parent / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides))
    if ckpt is not None:
        (run / ckpt).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"run": name}, run / ckpt)
        time.sleep(0.02)  # distinct mtimes
    return run


def test_ckpt_path_last_and_auto_resolution(tmp_path: Path) -> None:
    exp = ["experiment=mic", "seed=1"]
    old = make_run(tmp_path, "a_old", [*exp, "ckpt_path=last"], "checkpoints/last.ckpt")
    newer = make_run(tmp_path, "b_newer", exp, "checkpoints/last.ckpt")
    make_run(tmp_path, "c_other_seed", ["experiment=mic", "seed=2"], "checkpoints/last.ckpt")
    make_run(tmp_path, "d_hpc", [*exp, "ckpt_path=auto"], "hpc_ckpt_1.ckpt")
    new = make_run(tmp_path, "e_new", [*exp, "ckpt_path=last"], None)
    wanted = [*exp, "ckpt_path=last"]

    assert resolve_ckpt_path(None, new, wanted) is None
    # `last` from a fresh run dir: the newest checkpoint of a run with the same overrides
    # (the requeue checkpoint of d_hpc is newer than b_newer's last.ckpt; c has another seed).
    assert resolve_ckpt_path("last", new, wanted) == str(tmp_path / "d_hpc" / "hpc_ckpt_1.ckpt")
    assert resolve_ckpt_path("last", new, list(reversed(wanted))) is not None  # order-free
    # A run's own checkpoint wins; `auto` only ever looks at its own run directory.
    assert resolve_ckpt_path("last", old, wanted) == str(old / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path("auto", newer, exp) == str(newer / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path("auto", new, wanted) is None
    with pytest.raises(ResumeError, match=r"no checkpoints/last\.ckpt"):
        resolve_ckpt_path("last", new, ["experiment=daformer"])
    with pytest.raises(ResumeError, match=r"no checkpoints/last\.ckpt"):
        resolve_ckpt_path("last", new, wanted, search_siblings=False)
    with pytest.raises(ResumeError, match=r"missing\.ckpt does not exist"):
        resolve_ckpt_path(str(tmp_path / "missing.ckpt"), new, wanted)


def test_ckpt_path_last_matches_runs_with_interpolation_overrides(tmp_path: Path) -> None:
    """An override like data.source_resize=${data.target_resize} stays text in the comparison
    (reading it as an interpolation used to fail)."""
    exp = ["experiment=demo", "data.source_resize=${data.target_resize}", "ckpt_path=last"]
    old = make_run(tmp_path, "a", exp, "checkpoints/last.ckpt")
    new = make_run(tmp_path, "b", exp, None)
    assert resolve_ckpt_path("last", new, exp) == str(old / "checkpoints" / "last.ckpt")


# ------------------------------------------------------------ in-process exact continuation
def build(synthetic_root: Path) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    cfg = compose_cfg(
        "train",
        "experiment=demo_mic",
        *synthetic_train(synthetic_root, batch_size=2),
        "data.crop_size=[32,32]",  # a quarter of the demo's compute per step
    )
    pl.seed_everything(cfg.seed, workers=True)  # what train() does first
    module = build_module(cfg)
    return module, instantiate(cfg.data)


def fit(
    synthetic_root: Path, out: Path, steps: int, ckpt_path: Path | None = None
) -> dict[str, Any]:
    module, datamodule = build(synthetic_root)
    trainer = cpu_trainer(
        max_steps=steps,
        enable_checkpointing=True,
        limit_val_batches=0,
        plugins=[AtomicCheckpointIO()],
        callbacks=[
            ModelCheckpoint(dirpath=out, save_top_k=-1, every_n_train_steps=1, save_last=False),
            RNGStateCallback(),
        ],
    )
    with torch_threads(1):
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    trainer.save_checkpoint(out / "final.ckpt")
    return load(out / "final.ckpt")


def assert_bit_equal(a: Any, b: Any, where: str) -> None:
    """Nested dicts / lists / tuples of tensors and plain values: equal, tensors bit for bit."""
    assert type(a) is type(b), where
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_bit_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bit_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_training_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Weights (student, EMA teacher), optimiser, LR schedule, data stream, RNGs: bit-equal."""
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), f"{k} differs"
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i, s in opt_a.items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt_b[i][k])), f"adam {i}.{k}"
    assert a["lr_schedulers"] == b["lr_schedulers"]
    # The sample stream (seed, next index). The RCS sampler's own generator is left out: it is
    # seeded from OS entropy and never drawn from (draws use a generator seeded by the index).
    dm_a, dm_b = a["UDADataModule"], b["UDADataModule"]
    assert (dm_a["seed"], dm_a["next_index"]) == (dm_b["seed"], dm_b["next_index"])
    # Global streams (torch, NumPy, Python) and the module's own (ClassMix, jitter, MIC masks).
    for rng in ("module_rng", "global_rng"):
        assert_bit_equal(a[rng], b[rng], rng)


def test_resume_in_process_is_bit_exact(synthetic_root: Path, tmp_path: Path) -> None:
    full = fit(synthetic_root, tmp_path / "full", steps=2)
    # Dropout, drop-path, ClassMix, jitter, blur and MIC masks all draw in every step, so a
    # stream that restarted anywhere would show up in the weights.
    resumed = fit(
        synthetic_root, tmp_path / "resumed", 2, ckpt_path=tmp_path / "full" / "epoch=0-step=1.ckpt"
    )
    assert_same_training_state(full, resumed)
    assert full["UDADataModule"]["next_index"] == 2 * 2
    # One entry per rank; the module's generators are those of its mixing part.
    assert len(full["global_rng"]) == len(full["module_rng"]) == 1
    assert set(full["module_rng"][0]["mixing"]) == {"numpy", "python", "torch"}
    step1 = load(tmp_path / "full" / "epoch=0-step=1.ckpt")["module_rng"][0]["mixing"]
    assert step1["numpy"] != full["module_rng"][0]["mixing"]["numpy"]  # step 2 drew from it


# ------------------------------------------------------ SIGKILL / SIGUSR1 of python -m ssr.train
def train_args(synthetic_root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        "experiment=demo_mic", *synthetic_data(synthetic_root),
        "data.num_workers=1", "data.batch_size=2", "data.rcs.min_pixels=10",
        "trainer.max_steps=6", "trainer.val_check_interval=3",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.debug_images.every_n_steps=2",
        "test_after_fit=false", f"hydra.run.dir={run_dir}", *extra,
    ]  # fmt: skip


def train(synthetic_root: Path, run_dir: Path, *extra: str) -> None:
    proc = run_cli("ssr.train", *train_args(synthetic_root, run_dir, *extra), cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]


def start_and_signal(synthetic_root: Path, run_dir: Path, signum: int, step: int) -> int:
    """Start a run, send `signum` once its last.ckpt has reached `step`; the exit code."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ssr.train", *train_args(synthetic_root, run_dir)],
        env=CLI_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        deadline = time.monotonic() + 300
        while not (last.is_file() and load(last)["global_step"] >= step):  # atomic: never torn
            assert proc.poll() is None, "the run ended before the signal"
            assert time.monotonic() < deadline
            time.sleep(0.2)
        proc.send_signal(signum)
        return proc.wait(timeout=300)
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.slow
def test_sigkill_or_sigusr1_then_resume_matches_uninterrupted_run(
    synthetic_root: Path, tmp_path: Path
) -> None:
    train(synthetic_root, tmp_path / "full")
    full = load(tmp_path / "full" / "checkpoints" / "last.ckpt")
    runs = tmp_path / "runs"

    assert start_and_signal(synthetic_root, runs / "1_killed", signal.SIGKILL, 3) == -signal.SIGKILL
    assert 3 <= load(runs / "1_killed" / "checkpoints" / "last.ckpt")["global_step"] < 6
    # A new run directory next to the killed one: `last` finds the killed run's checkpoint.
    train(synthetic_root, runs / "2_resumed", "ckpt_path=last")
    assert_same_training_state(full, load(runs / "2_resumed" / "checkpoints" / "last.ckpt"))

    # SIGUSR1 (SLURM's warning): checkpoint at the next step boundary, stop; outside SLURM nothing
    # requeues the job, so the exit status says it stopped (128 + 10). The requeued job (same run
    # directory) resumes from it with ckpt_path=auto.
    run = tmp_path / "signalled"
    assert start_and_signal(synthetic_root, run, signal.SIGUSR1, 2) == 128 + signal.SIGUSR1
    hpc = load(run / "hpc_ckpt_1.ckpt")
    assert 2 <= hpc["global_step"] < 6
    assert load(run / "checkpoints" / "last.ckpt")["global_step"] <= hpc["global_step"]
    train(synthetic_root, run, "ckpt_path=auto")
    assert_same_training_state(full, load(run / "checkpoints" / "last.ckpt"))
