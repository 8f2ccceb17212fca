"""SSR end to end (issue 4): train -> export -> eval -> predict with the tiny model and tiny SAM.

The fast test runs the real Hydra entry points in-process (no interpreter start per command);
the slow ones run `python -m ...` subprocesses exactly as a user types them, one of them with the
SAM feature cache, and the Table I stage sweep as one Hydra multirun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from ssr import eval as ssr_eval
from ssr import export as ssr_export
from ssr import predict as ssr_predict
from ssr import train as ssr_train


def _data(root: Path) -> list[str]:
    return [
        f"data.source_root={root / 'gta'}",
        f"data.target_root={root / 'cityscapes'}",
        "data.num_workers=0",
        "data.rcs.min_pixels=10",
        "data.batch_size=2",
    ]


def _eval_args(root: Path) -> list[str]:
    return [f"gt_root={root / 'cityscapes'}", "test_resize=[128,64]", "num_workers=0"]


def _call_main(main: Callable[[], object], monkeypatch, argv: list[str]) -> int:
    """A Hydra CLI in-process; its exit code (0 when it returns normally)."""
    monkeypatch.setattr(sys, "argv", ["prog", *argv])
    try:
        main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def _run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "HYDRA_FULL_ERROR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, f"python -m {module} failed:\n{proc.stderr[-3000:]}"
    return proc


def _student(path: Path) -> tuple[dict[str, tuple[int, ...]], int]:
    """{key: shape} and the number of values of an exported ssr-segmentor file."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["format"] == "ssr-segmentor"
    state = ckpt["state_dict"]
    return {k: tuple(v.shape) for k, v in state.items()}, sum(v.numel() for v in state.values())


def _val_image(root: Path) -> Path:
    return sorted((root / "cityscapes" / "leftImg8bit" / "val").rglob("*.png"))[0]


def _check_eval_and_predict(out: Path, root: Path) -> None:
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == 2 and 0.0 <= metrics["mIoU"] <= 100.0
    image = _val_image(root)
    pred = out / "pred" / f"{image.stem}_trainIds.png"
    assert pred.is_file() and (out / "pred" / f"{image.stem}_overlay.png").is_file()


def test_ssr_train_export_eval_predict_in_process(
    synthetic_root: Path, tmp_path: Path, monkeypatch
) -> None:
    """demo_ssr through the four CLIs; the export equals a demo_daformer export key for key."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NO_ALBUMENTATIONS_UPDATE", "1")
    exports = {}
    for experiment, steps, test in (("demo_ssr", 2, "true"), ("demo_daformer", 1, "false")):
        run = tmp_path / experiment
        code = _call_main(
            ssr_train.main,
            monkeypatch,
            [f"experiment={experiment}", *_data(synthetic_root), f"trainer.max_steps={steps}",
             f"trainer.val_check_interval={steps}", f"test_after_fit={test}",
             f"hydra.run.dir={run}"],
        )  # fmt: skip
        assert code == 0
        ckpt = run / "checkpoints" / "last.ckpt"
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        assert not any(k.startswith("sam.encoder.") for k in state)  # SAM is never saved
        assert any(k.startswith("sam.fusion_layer.") for k in state) == (experiment == "demo_ssr")
        exports[experiment] = tmp_path / f"{experiment}.pt"
        code = _call_main(
            ssr_export.main,
            monkeypatch,
            [f"ckpt_path={ckpt}", f"out={exports[experiment]}", f"hydra.run.dir={run}/export"],
        )
        assert code == 0
    assert json.loads((tmp_path / "demo_ssr" / "metrics.json").read_text())["num_images"] == 2
    ssr_keys, ssr_params = _student(exports["demo_ssr"])
    assert (ssr_keys, ssr_params) == _student(exports["demo_daformer"])
    assert not any(k.startswith(("sam", "teacher", "imnet", "model.")) for k in ssr_keys)

    out = tmp_path / "demo_ssr"
    code = _call_main(
        ssr_eval.main,
        monkeypatch,
        [f"ckpt_path={exports['demo_ssr']}", *_eval_args(synthetic_root),
         f"output_dir={out / 'eval'}", f"hydra.run.dir={out}/eval_run"],
    )  # fmt: skip
    assert code == 0
    code = _call_main(
        ssr_predict.main,
        monkeypatch,
        [f"ckpt_path={exports['demo_ssr']}", f"input={_val_image(synthetic_root)}",
         "test_resize=[128,64]", f"output_dir={out / 'pred'}", f"hydra.run.dir={out}/pred_run"],
    )  # fmt: skip
    assert code == 0
    _check_eval_and_predict(out, synthetic_root)


@pytest.mark.slow
@pytest.mark.parametrize("experiment,cached", [("demo_ssr", False), ("demo_mic_ssr", True)])
def test_cli_chain_in_subprocesses(
    experiment: str, cached: bool, synthetic_root: Path, tmp_path: Path
) -> None:
    """`python -m ssr.{sam_cache,train,export,eval,predict}` as a user runs them."""
    out = tmp_path / experiment
    data = _data(synthetic_root)
    sam = []
    if cached:
        sam = [f"uda.sam.cache_dir={tmp_path / 'cache'}"]
        _run("ssr.sam_cache", f"experiment={experiment}", *data, *sam,
             f"hydra.run.dir={out}/cache_run", cwd=tmp_path)  # fmt: skip
        assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["complete"]
    _run("ssr.train", f"experiment={experiment}", *data, *sam, "trainer.max_steps=3",
         "trainer.val_check_interval=3", f"hydra.run.dir={out}", cwd=tmp_path)  # fmt: skip
    log = (out / "csv" / "metrics.csv").read_text()
    mic = ("train/mic_ce",) if "mic" in experiment else ()
    for key in ("train/ssr_src_ce", "train/ssr_mix_ce", *mic):
        assert key in log, key
    model = tmp_path / "model.pt"
    _run("ssr.export", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}", f"out={model}",
         f"hydra.run.dir={out}/export", cwd=tmp_path)  # fmt: skip
    _run("ssr.eval", f"ckpt_path={model}", *_eval_args(synthetic_root),
         f"output_dir={out / 'eval'}", f"hydra.run.dir={out}/eval_run", cwd=tmp_path)  # fmt: skip
    _run("ssr.predict", f"ckpt_path={model}", f"input={_val_image(synthetic_root)}",
         "test_resize=[128,64]", f"output_dir={out / 'pred'}", f"hydra.run.dir={out}/pred_run",
         cwd=tmp_path)  # fmt: skip
    _check_eval_and_predict(out, synthetic_root)


@pytest.mark.slow
def test_stage_sweep_runs_the_five_table_rows(synthetic_root: Path, tmp_path: Path) -> None:
    """One `-m ... sweep=ssr_stages` command launches the 5 jobs of SSR Table I."""
    sweep = tmp_path / "sweep"
    _run("ssr.train", "-m", "experiment=demo_ssr", "sweep=ssr_stages", *_data(synthetic_root),
         "trainer.max_steps=1", "trainer.val_check_interval=1", "test_after_fit=false",
         f"hydra.sweep.dir={sweep}", cwd=tmp_path)  # fmt: skip
    expected = [[], [3], [2, 3], [1, 2, 3], [0, 1, 2, 3]]
    jobs = sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert [p.name for p in jobs] == ["0", "1", "2", "3", "4"]
    for job, stages in zip(jobs, expected, strict=True):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert f"uda.sam.stages={stages}".replace(" ", "") in overrides
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == 1
        assert ckpt["hyper_parameters"]["sam"]["stages"] == stages
        fusion = {k.split(".")[2] for k in ckpt["state_dict"] if k.startswith("sam.fusion_layer")}
        assert fusion == ({"0", "1", "2", "3"} if stages else set())  # [] = no SAM at all
