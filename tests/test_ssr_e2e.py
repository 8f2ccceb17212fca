"""SSR end to end: train -> export -> eval -> predict with the tiny model and tiny SAM.

The fast test runs the real Hydra entry points in-process (no interpreter start per command);
the slow ones run `python -m ...` subprocesses exactly as a user types them (with the SAM feature
cache), and the Table I stage sweep as one Hydra multirun.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from ssr import eval as ssr_eval
from ssr import export as ssr_export
from ssr import predict as ssr_predict
from ssr import train as ssr_train

from helpers import call_hydra_main, run_cli, synthetic_train

TEST_RESIZE = "inference.resize=[128,64]"  # the synthetic target's scale (experiment=demo)


def _eval_args(root: Path) -> list[str]:
    return [f"gt_root={root / 'cityscapes'}", TEST_RESIZE, "num_workers=0"]


def _run(module: str, *args: str, cwd: Path) -> None:
    proc = run_cli(module, *args, cwd=cwd, timeout=900)
    assert proc.returncode == 0, f"python -m {module} failed:\n{proc.stderr[-3000:]}"


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
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """demo_ssr through the four CLIs; the export equals a demo_daformer export key for key."""
    monkeypatch.chdir(tmp_path)
    exports = {}
    for experiment, steps, test in (("demo_ssr", 2, "true"), ("demo_daformer", 1, "false")):
        run = tmp_path / experiment
        code = call_hydra_main(
            ssr_train.main,
            monkeypatch,
            run,
            [f"experiment={experiment}", *synthetic_train(synthetic_root),
             f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
             f"test_after_fit={test}"],
        )  # fmt: skip
        assert code == 0
        ckpt = run / "checkpoints" / "last.ckpt"
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        assert not any(k.startswith("sam.encoder.") for k in state)  # SAM is never saved
        assert any(k.startswith("sam.fusion_layer.") for k in state) == (experiment == "demo_ssr")
        exports[experiment] = tmp_path / f"{experiment}.pt"
        code = call_hydra_main(
            ssr_export.main,
            monkeypatch,
            run / "export",
            [f"ckpt_path={ckpt}", f"out={exports[experiment]}"],
        )
        assert code == 0
    assert json.loads((tmp_path / "demo_ssr" / "metrics.json").read_text())["num_images"] == 2
    ssr_keys, ssr_params = _student(exports["demo_ssr"])
    assert (ssr_keys, ssr_params) == _student(exports["demo_daformer"])
    assert not any(k.startswith(("sam", "teacher", "imnet", "fd", "model.")) for k in ssr_keys)

    out = tmp_path / "demo_ssr"
    code = call_hydra_main(
        ssr_eval.main,
        monkeypatch,
        out / "eval_run",
        [f"ckpt_path={exports['demo_ssr']}", *_eval_args(synthetic_root),
         f"output_dir={out / 'eval'}"],
    )  # fmt: skip
    assert code == 0
    code = call_hydra_main(
        ssr_predict.main,
        monkeypatch,
        out / "pred_run",
        [f"ckpt_path={exports['demo_ssr']}", f"input={_val_image(synthetic_root)}", TEST_RESIZE,
         f"output_dir={out / 'pred'}"],
    )  # fmt: skip
    assert code == 0
    _check_eval_and_predict(out, synthetic_root)


@pytest.mark.slow
def test_cli_chain_in_subprocesses(synthetic_root: Path, tmp_path: Path) -> None:
    """`python -m ssr.{uda.sam_cache,train,export,eval,predict}` as a user runs them: MIC + SSR
    trained from the SAM feature cache."""
    experiment, out = "demo_mic_ssr", tmp_path / "demo_mic_ssr"
    data = synthetic_train(synthetic_root)
    sam = [f"uda.sam.cache_dir={tmp_path / 'cache'}"]
    _run("ssr.uda.sam_cache", f"experiment={experiment}", *data, *sam,
         f"hydra.run.dir={out}/cache_run", cwd=tmp_path)  # fmt: skip
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["complete"]
    _run("ssr.train", f"experiment={experiment}", *data, *sam, "trainer.max_steps=3",
         "trainer.val_check_interval=3", f"hydra.run.dir={out}", cwd=tmp_path)  # fmt: skip
    log = (out / "csv" / "metrics.csv").read_text()
    for key in ("train/ssr_src_ce", "train/ssr_mix_ce", "train/mic_ce"):
        assert key in log, key
    model = tmp_path / "model.pt"
    _run("ssr.export", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}", f"out={model}",
         f"hydra.run.dir={out}/export", cwd=tmp_path)  # fmt: skip
    _run("ssr.eval", f"ckpt_path={model}", *_eval_args(synthetic_root),
         f"output_dir={out / 'eval'}", f"hydra.run.dir={out}/eval_run", cwd=tmp_path)  # fmt: skip
    _run("ssr.predict", f"ckpt_path={model}", f"input={_val_image(synthetic_root)}", TEST_RESIZE,
         f"output_dir={out / 'pred'}", f"hydra.run.dir={out}/pred_run", cwd=tmp_path)  # fmt: skip
    _check_eval_and_predict(out, synthetic_root)


@pytest.mark.slow
def test_stage_sweep_runs_the_five_table_rows(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One `-m ... sweep=ssr_stages` command launches the 5 jobs of SSR Table I."""
    monkeypatch.chdir(tmp_path)
    sweep = tmp_path / "sweep"
    code = call_hydra_main(
        ssr_train.main,
        monkeypatch,
        tmp_path / "run",
        ["-m", "experiment=demo_ssr", "sweep=ssr_stages", *synthetic_train(synthetic_root),
         "trainer.max_steps=1", "trainer.val_check_interval=1", "test_after_fit=false",
         f"hydra.sweep.dir={sweep}"],
    )  # fmt: skip
    assert code == 0
    expected = [[], [3], [2, 3], [1, 2, 3], [0, 1, 2, 3]]
    jobs = sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert [p.name for p in jobs] == ["0", "1", "2", "3", "4"]
    optimised = []
    for job, stages in zip(jobs, expected, strict=True):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        assert f"uda.sam.stages={stages}".replace(" ", "") in overrides
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        assert config["uda"]["sam"]["stages"] == stages
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == 1
        fusion = {k.split(".")[2] for k in ckpt["state_dict"] if k.startswith("sam.fusion_layer")}
        assert fusion == ({"0", "1", "2", "3"} if stages else set())  # [] = no SAM at all
        groups = ckpt["optimizer_states"][0]["param_groups"]
        optimised.append(sum(len(g["params"]) for g in groups))
    # Only the selected stages' projection + fusion (6 tensors a stage) reach the optimiser.
    assert [n - optimised[0] for n in optimised] == [6 * len(s) for s in expected]
