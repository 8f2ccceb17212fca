"""Running on a shared cluster: run folders that never collide, resumes that refuse another run's
checkpoint, stops that never look like finishes (docs/cluster.md)."""

from __future__ import annotations

import csv
import errno
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import ssr.train
from ssr.model.checkpoint import export_segmentor
from ssr.run import folder
from ssr.run.folder import LOCK_FILE, lock_folder
from ssr.run.preemption import RunStopped
from ssr.run.resume import ResumeError, check_resume, restored_by_checkpoint
from ssr.train import build_module

from helpers import CLI_ENV, call_hydra_main, compose_cfg, synthetic_train


def run_args(root: Path, *extra: str, steps: int = 2, test: bool = False) -> list[str]:
    """A MIC run of `steps` steps on the synthetic data (small crops), validated at its end."""
    return [
        "experiment=demo_mic",
        *synthetic_train(root),
        "data.crop_size=[32,32]",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        f"test_after_fit={test}",
        *extra,
    ]


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(autouse=True)
def outside_slurm(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run as outside any SLURM job (a developer's allocation must not be requeued by a test)."""
    for name in [v for v in os.environ if v.startswith("SLURM_")]:
        monkeypatch.delenv(name)


# ---------------------------------------------------------------------------------- folders
def test_default_run_folders_carry_the_process_id(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = compose_cfg("train", "experiment=demo", hydra=True)
    run_dir, sweep_dir = cfg.hydra.run.dir, cfg.hydra.sweep.dir
    assert run_dir.startswith(f"{cfg.paths.log_dir}/demo/runs/")
    for name in (run_dir, sweep_dir):
        assert name.endswith(f"_{os.getpid()}"), name
    assert cfg.hydra.output_subdir == ".hydra"
    # A SLURM job and its requeues share one folder (ckpt_path=auto finds its checkpoints); its
    # ranks > 0 write no records of their own.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_PROCID", "1")
    cfg = compose_cfg("train", hydra=True)
    assert cfg.hydra.run.dir.endswith("/runs/4242") and cfg.hydra.output_subdir is None


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from ssr.run.folder import lock_folder
    lock_folder(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(120)
    """
)


def test_a_live_run_holds_its_folder_and_a_killed_one_leaves_no_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True, env=CLI_ENV
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        code = call_hydra_main(ssr.train.main, monkeypatch, run, ["experiment=demo"])
        assert code == 2
        err = one_error_line(capsys)
        assert str(run) in err and f"pid {holder.pid}" in err and "hydra.run.dir" in err
        assert not (run / ".hydra").exists()  # nothing written into the other run's folder
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs
        holder.wait()
    assert (run / LOCK_FILE).is_file()
    lock_folder(run)  # the kernel released the dead run's lock


def test_a_filesystem_without_locks_warns_and_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_locks(*args: object) -> None:  # what flock gives on Lustre mounted without -o flock
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock_folder(tmp_path / "run")
    assert "has no file locks" in caplog.text


def test_unwritable_run_folder_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a folder below a file: fails even for root
    code = call_hydra_main(ssr.train.main, monkeypatch, blocker / "run", ["experiment=demo"])
    assert code == 2
    assert "cannot create the run folder" in one_error_line(capsys)


@pytest.mark.slow
def test_runs_started_together_get_their_own_folders(synthetic_root: Path, tmp_path: Path) -> None:
    """A seed loop with `&`: every run keeps its own folder, records and checkpoint."""
    args = [*run_args(synthetic_root), f"paths.log_dir={tmp_path / 'logs'}"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "ssr.train", *args, f"seed={seed}"],
            env=CLI_ENV,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for seed in range(3)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    runs = sorted((tmp_path / "logs" / "demo_mic" / "runs").iterdir())
    assert {run.name.rsplit("_", 1)[1] for run in runs} == {str(proc.pid) for proc in procs}
    seeds = {OmegaConf.load(run / ".hydra" / "config.yaml").seed for run in runs}
    assert seeds == {0, 1, 2}
    for run in runs:  # each folder's checkpoint is its own run's
        seed = OmegaConf.load(run / ".hydra" / "config.yaml").seed
        assert load(run / "checkpoints" / "last.ckpt")["run_config"]["seed"] == seed
        assert not list(run.glob(".hydra.*"))


# ---------------------------------------------------------------------------------- resume
@pytest.fixture(scope="module")
def trained(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished two-step run folder (in-process) with its last.ckpt."""
    run = tmp_path_factory.mktemp("trained") / "run"
    with pytest.MonkeyPatch.context() as mp:
        assert call_hydra_main(ssr.train.main, mp, run, run_args(synthetic_root)) == 0
    return run


def test_resume_keeps_records_and_names_what_is_ignored(
    trained: Path, synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trained = Path(shutil.copytree(trained, tmp_path / "run"))  # the requeued job's folder
    extra = ["ckpt_path=auto", "optim.lr=0.002", "data.batch_size=1"]
    args = run_args(synthetic_root, *extra, steps=3)
    assert call_hydra_main(ssr.train.main, monkeypatch, trained, args) == 0
    assert trained.resolve() not in folder._held  # the finished job gave its folder's lock back
    # The first attempt's records are kept; the new ones record the new values.
    first = OmegaConf.load(trained / ".hydra.1" / "config.yaml")
    assert first.optim.lr == 0.001 and first.trainer.max_steps == 2
    assert OmegaConf.load(trained / ".hydra" / "config.yaml").optim.lr == 0.002
    log = (trained / "train.log").read_text()
    assert "optim.lr: 0.001 -> 0.002: ignored, the checkpoint restores the optimiser" in log
    assert "data.batch_size: 2 -> 1" in log and "this run's values apply" in log
    # Each attempt's CSV log: Lightning would have deleted the first one.
    assert logged_steps(trained / "csv.1") == {1, 2} and logged_steps(trained / "csv") == {3}
    # A copied folder still resumes into last.ckpt (not last-v1.ckpt, where auto never looks).
    assert [p.name for p in (trained / "checkpoints").iterdir()] == ["last.ckpt"]
    ckpt = load(trained / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
    assert ckpt["lr_schedulers"][0]["base_lrs"][0] == pytest.approx(0.001)
    assert ckpt["run_config"]["optim"]["lr"] == 0.002  # what this attempt was given


def test_a_fresh_start_over_an_earlier_runs_checkpoints_is_refused(
    trained: Path,
    synthetic_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = Path(shutil.copytree(trained, tmp_path / "run"))  # e.g. a second srun in one job
    before = (run / "checkpoints" / "last.ckpt").read_bytes()
    assert call_hydra_main(ssr.train.main, monkeypatch, run, run_args(synthetic_root)) == 2
    err = one_error_line(capsys)
    assert "holds the checkpoint of an earlier run" in err and "ckpt_path=auto" in err
    assert (run / "checkpoints" / "last.ckpt").read_bytes() == before
    assert (run / "csv" / "metrics.csv").is_file() and not (run / "csv.1").exists()


def logged_steps(csv_dir: Path) -> set[int]:
    """The optimiser steps (1-based) whose training loss a CSV log holds."""
    with (csv_dir / "metrics.csv").open() as f:
        return {int(row["step"]) + 1 for row in csv.DictReader(f) if row.get("train/loss")}


def test_requeued_job_resumes_from_the_newest_checkpoint(trained: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(trained, tmp_path / "run"))
    hpc = run / "hpc_ckpt_1.ckpt"
    shutil.copy(run / "checkpoints" / "last.ckpt", hpc)
    os.utime(hpc, (1, 1))  # an old pre-emption; last.ckpt was written after it
    assert ssr.train._resume_path(None, run) == run / "checkpoints" / "last.ckpt"
    os.utime(hpc)  # a fresh pre-emption
    assert ssr.train._resume_path(None, run) == hpc


def test_restored_settings() -> None:
    assert restored_by_checkpoint("optim.lr") and restored_by_checkpoint("seed")
    assert restored_by_checkpoint("data.seed")
    assert not restored_by_checkpoint("seed_offset")
    assert not restored_by_checkpoint("data.crop_size")


@pytest.mark.parametrize("case", ["other_experiment", "other_model", "random", "truncated"])
def test_resume_refuses_another_runs_or_a_broken_checkpoint(
    case: str,
    trained: Path,
    synthetic_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ckpt = trained / "checkpoints" / "last.ckpt"
    bad = tmp_path / "bad.ckpt"
    overrides, needles = {
        "other_experiment": (["experiment=demo_ssr"], ["task_name differs", "demo_mic there"]),
        "other_model": (["model.backbone.variant=b0"], ["model differs"]),
        "random": ([], ["not a readable checkpoint"]),
        "truncated": ([], ["not a readable checkpoint"]),
    }[case]
    if case == "random":
        bad.write_bytes(os.urandom(4096))
    elif case == "truncated":
        bad.write_bytes(ckpt.read_bytes()[:50_000])
    path = bad if bad.exists() else ckpt
    args = [*run_args(synthetic_root), *overrides, f"ckpt_path={path}"]
    assert call_hydra_main(ssr.train.main, monkeypatch, tmp_path / "run", args) == 2
    err = one_error_line(capsys)
    assert str(path) in err and all(n in err for n in needles), err
    assert "weights_only" not in err  # torch's advice to unpickle anything is not relayed
    written = {p.name for p in (tmp_path / "run").iterdir()}
    assert written <= {".hydra", ".ssr_run.lock", "train.log"}, written  # no log, no checkpoint


def test_check_resume_refuses_exports_and_weights_that_do_not_fit(
    trained: Path, synthetic_root: Path, tmp_path: Path
) -> None:
    cfg = compose_cfg("train", *run_args(synthetic_root), f"paths.output_dir={tmp_path}")
    config = OmegaConf.to_container(cfg, resolve=True)
    module = build_module(cfg)
    ckpt = load(trained / "checkpoints" / "last.ckpt")
    assert check_resume(trained / "checkpoints" / "last.ckpt", config, module) == []

    export = tmp_path / "student.pt"
    export_segmentor(module.model, export, model_config=config["model"], meta={})
    with pytest.raises(ResumeError, match=r"not a training checkpoint of ssr\.train"):
        check_resume(export, config, module)

    # An older checkpoint without a stored config: its weights decide (a wider decoder here).
    del ckpt["run_config"]
    ckpt["state_dict"]["model.decode_head.conv_seg.weight"] = torch.zeros(19, 999, 1, 1)
    torch.save(ckpt, tmp_path / "old.ckpt")
    with pytest.raises(ResumeError, match=r"does not fit this run's networks: .*conv_seg"):
        check_resume(tmp_path / "old.ckpt", config, module)


# ----------------------------------------------------------------------------------- stops
def test_a_stop_exit_code_never_reads_as_success() -> None:
    stop = RunStopped(signal.SIGTERM, Path("x"), 3, requeued=False)
    assert stop.exit_code == 143
    assert RunStopped(signal.SIGINT, Path("x"), 3, requeued=False).exit_code == 130
    assert RunStopped(signal.SIGUSR1, Path("x"), 3, requeued=True).exit_code == 0  # requeued


def stop_args(root: Path, signum: int, *extra: str) -> list[str]:
    """A two-step run that receives `signum` in its last step: no validation or test may follow."""
    return run_args(
        root,
        "+callbacks.stop._target_=helpers.SignalAtStep",
        f"+callbacks.stop.signum={int(signum)}",
        "+callbacks.stop.step=1",
        *extra,
        steps=2,
        test=True,
    )


@pytest.mark.parametrize(
    ("signum", "workers"),
    [(signal.SIGINT, 0), (signal.SIGTERM, 1), (signal.SIGUSR1, 0)],
)
def test_a_signal_saves_at_the_step_boundary_and_exits_non_zero(
    signum: signal.Signals,
    workers: int,
    synthetic_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = tmp_path / "run"
    # With a loader worker, the worker is signalled too (scancel signals the whole job).
    extra = [f"data.num_workers={workers}", f"+callbacks.stop.workers={bool(workers)}"]
    code = call_hydra_main(
        ssr.train.main, monkeypatch, run, stop_args(synthetic_root, signum, *extra)
    )
    assert code == 128 + signum
    assert load(run / "hpc_ckpt_1.ckpt")["global_step"] == 2  # the step it landed in finished
    assert not (run / "metrics.json").exists()  # no test after a stop
    metrics = (run / "csv" / "metrics.csv").read_text()
    assert "val/mIoU" not in metrics  # no validation in the grace window
    log = (run / "train.log").read_text()
    assert f"{signum.name} at step 2" in log and f"ckpt_path={run / 'hpc_ckpt_1.ckpt'}" in log
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_a_second_ctrl_c_aborts_at_once(
    synthetic_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = tmp_path / "run"
    args = stop_args(synthetic_root, signal.SIGINT, "+callbacks.stop.times=2")
    assert call_hydra_main(ssr.train.main, monkeypatch, run, args) == 130  # not Lightning's 1
    assert one_error_line(capsys) == "error: interrupted (Ctrl-C); finished outputs are kept"
    assert not list(run.glob("hpc_ckpt_*.ckpt"))


SCONTROL = """#!/bin/sh
echo "$@" >> "$SCONTROL_LOG"
"""


def test_a_requeued_slurm_job_exits_0(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SLURM's warning inside a job: save, `scontrol requeue <job>`, exit 0 (not a failure)."""
    bin_dir = tmp_path / "bin"  # SLURM's command-line tool, recording what it was asked
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SCONTROL_LOG", str(tmp_path / "scontrol.log"))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    run = tmp_path / "run"
    args = stop_args(synthetic_root, signal.SIGUSR1)
    assert call_hydra_main(ssr.train.main, monkeypatch, run, args) == 0
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert load(run / "hpc_ckpt_1.ckpt")["global_step"] == 2
    assert "requeued" in (run / "train.log").read_text()
