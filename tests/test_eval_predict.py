"""ssr.eval / ssr.predict / ssr.export end to end: a tiny model on a tiny Cityscapes-format tree."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from ssr import eval as ssr_eval
from ssr import export as ssr_export
from ssr import predict as ssr_predict
from ssr.data.datasets import CityscapesDataset
from ssr.data.labels import CLASSES, NUM_CLASSES
from ssr.data.transforms import test_transform
from ssr.model.checkpoint import load_segmentor
from ssr.model.inference import Inference

from helpers import CS_FRAMES, CS_H, CS_W, call_hydra_main, compose_cfg, run_cli, run_script

# The images are already at test scale; inference.resize=[256,128] is covered in the first test.
AT_TEST_SCALE = "inference.resize=[128,64]"


def _eval_cfg(*overrides: str) -> DictConfig:
    return compose_cfg("eval", "num_workers=0", "device=cpu", AT_TEST_SCALE, *overrides)


def test_eval_checkpoint_writes_metrics(tiny, cs_root, tmp_path) -> None:
    ckpt, segmentor = tiny
    out = tmp_path / "eval"
    cfg = _eval_cfg(f"ckpt_path={ckpt}", f"gt_root={cs_root}", f"output_dir={out}")
    result = ssr_eval.run(cfg)
    written = json.loads((out / "metrics.json").read_text())
    assert set(written) == {"mIoU", "IoU", "aAcc", "num_images"}
    assert written["num_images"] == 2
    assert list(written["IoU"]) == list(CLASSES)
    assert 0.0 <= written["mIoU"] <= 100.0 and 0.0 <= written["aAcc"] <= 100.0
    assert all(v is None or 0.0 <= v <= 100.0 for v in written["IoU"].values())
    assert written["mIoU"] == pytest.approx(result["mIoU"])
    # evaluate() leaves a training segmentor in training mode (reuse in a validation loop).
    segmentor.train()
    inference = Inference(resize=(256, 128))
    dataset = CityscapesDataset(cs_root, "val")  # evaluate() builds the test views
    again = ssr_eval.evaluate(segmentor, dataset, inference, "cpu", progress=False)
    assert segmentor.training
    assert again["num_images"] == 2 and 0.0 <= again["mIoU"] <= 100.0
    segmentor.eval()


def test_eval_sliding_window_protocol(tiny, cs_root, tmp_path) -> None:
    """`inference=slide` (docs/method.md §3.2): windows of the demo's crop, same metrics file."""
    ckpt, _ = tiny
    out = tmp_path / "slide"
    overrides = ["inference=slide", "inference.crop_size=[64,64]", "inference.stride=[43,43]"]
    cfg = _eval_cfg(f"ckpt_path={ckpt}", f"gt_root={cs_root}", f"output_dir={out}", *overrides)
    inference = instantiate(cfg.inference)
    assert (inference.mode, inference.resize) == ("slide", (128, 64))
    assert (inference.crop_size, inference.stride) == ((64, 64), (43, 43))
    result = ssr_eval.run(cfg)
    assert result["num_images"] == 2 and 0.0 <= result["mIoU"] <= 100.0
    assert json.loads((out / "metrics.json").read_text())["mIoU"] == pytest.approx(result["mIoU"])
    assert compose_cfg("eval", "inference.mode=slide").inference.mode == "slide"


def test_predict_folder_then_score_it_matches_checkpoint_eval(tiny, cs_root, tmp_path) -> None:
    ckpt, _ = tiny
    preds = tmp_path / "preds"
    cfg = compose_cfg(
        "predict",
        f"ckpt_path={ckpt}",
        f"input={cs_root / 'leftImg8bit' / 'val'}",
        f"output_dir={preds}",
        "device=cpu",
        AT_TEST_SCALE,
    )
    written = ssr_predict.run(cfg)
    assert len(written) == 3 * len(CS_FRAMES)
    for frame in CS_FRAMES:
        stem = preds / f"{frame}_leftImg8bit"  # the city folders are mirrored
        train_ids = Image.open(f"{stem}_trainIds.png")
        assert (train_ids.mode, train_ids.size) == ("L", (CS_W, CS_H))
        assert np.asarray(train_ids).max() < NUM_CLASSES
        for kind in ("color", "overlay"):
            im = Image.open(f"{stem}_{kind}.png")
            assert (im.mode, im.size) == ("RGB", (CS_W, CS_H))
    # Scoring those files must give exactly what checkpoint evaluation gives: same protocol.
    from_ckpt = ssr_eval.run(
        _eval_cfg(f"ckpt_path={ckpt}", f"gt_root={cs_root}", f"output_dir={tmp_path / 'a'}")
    )
    from_pngs = ssr_eval.run(
        _eval_cfg(f"pred_dir={preds}", f"gt_root={cs_root}", f"output_dir={tmp_path / 'b'}")
    )
    assert from_pngs == from_ckpt


def test_predictor_is_the_loaded_student_under_the_protocol(tiny) -> None:
    """`Predictor(segmentor, inference, device)`: train ids at input size, as `Inference` gives."""
    ckpt, segmentor = tiny
    loaded, config, fmt = load_segmentor(ckpt, {}, "cpu")
    assert fmt == "export" and config["backbone"]["variant"] == "tiny"
    assert not loaded.training
    inference = Inference(resize=(CS_W, CS_H))
    predictor = ssr_predict.Predictor(loaded, inference, "cpu")
    rgb = np.random.default_rng(1).integers(0, 256, (CS_H, CS_W, 3), dtype=np.uint8)
    train_ids = predictor(rgb)
    assert train_ids.shape == (CS_H, CS_W) and train_ids.dtype == np.uint8
    img = test_transform(inference.resize)(image=rgb)["image"].float().unsqueeze(0)
    with torch.inference_mode():
        expected = inference.logits(segmentor.eval(), img, out_size=(CS_H, CS_W)).argmax(1)[0]
    np.testing.assert_array_equal(train_ids, expected.numpy())


def test_pred_dir_perfect_and_missing(cs_root, tmp_path, monkeypatch) -> None:
    perfect = tmp_path / "perfect"
    perfect.mkdir()
    for frame in CS_FRAMES:
        gt = cs_root / "gtFine" / "val" / f"{frame}_gtFine_labelTrainIds.png"
        (perfect / f"{Path(frame).name}_trainIds.png").write_bytes(gt.read_bytes())
    out = tmp_path / "out"
    result = ssr_eval.run(
        _eval_cfg(f"pred_dir={perfect}", f"gt_root={cs_root}", f"output_dir={out}")
    )
    assert result["mIoU"] == pytest.approx(100.0)
    assert [k for k, v in result["IoU"].items() if v is not None] == [
        "road", "building", "sky", "car",
    ]  # fmt: skip
    assert json.loads((out / "metrics.json").read_text())["mIoU"] == pytest.approx(100.0)

    next(iter(sorted(perfect.iterdir()))).unlink()  # aachen's prediction
    missing_out = tmp_path / "missing"
    missing = [f"pred_dir={perfect}", f"gt_root={cs_root}", f"output_dir={missing_out}"]
    with pytest.raises(ssr_eval.EvalInputError, match=r"1 of 2 .* first aachen_000000_000019"):
        ssr_eval.run(_eval_cfg(*missing))
    code = call_hydra_main(ssr_eval.main, monkeypatch, tmp_path / "hydra_run", missing)
    assert code == 2 and not (missing_out / "metrics.json").exists()


def test_predict_video_writes_overlay_video(tiny, tmp_path) -> None:
    ckpt, _ = tiny
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (CS_W, CS_H))
    for i in range(3):
        writer.write(np.full((CS_H, CS_W, 3), 60 * i, dtype=np.uint8))
    writer.release()
    cfg = compose_cfg(
        "predict",
        f"ckpt_path={ckpt}",
        f"input={video}",
        f"output_dir={tmp_path}",
        "device=cpu",
        AT_TEST_SCALE,
    )
    (out,) = ssr_predict.run(cfg)
    assert out == tmp_path / "clip_overlay.mp4"
    capture = cv2.VideoCapture(str(out))
    frames = 0
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        assert frame.shape == (CS_H, CS_W, 3)
        frames += 1
    capture.release()
    assert frames == 3


def test_export_keeps_only_the_student(tiny, tmp_path, monkeypatch, capsys) -> None:
    """A fabricated Lightning checkpoint (student, teacher, SAM-side keys) -> student-only file."""
    _, segmentor = tiny
    student = segmentor.state_dict()
    state = {f"model.{k}": v for k, v in student.items()}
    state |= {f"teacher.model.{k}": v + 1 for k, v in student.items()}
    state |= {
        "sam.fusion_layer.0.q.weight": torch.zeros(2, 2),
        "fd.imnet_backbone.x": torch.ones(1),
    }
    lightning_ckpt = tmp_path / "last.ckpt"
    model_config = OmegaConf.to_container(compose_cfg("eval", "model=daformer_tiny").model)
    torch.save(
        {"pytorch-lightning_version": "2.5", "state_dict": state, "model_config": model_config},
        lightning_ckpt,
    )
    out = tmp_path / "student.pt"
    code = call_hydra_main(
        ssr_export.main,
        monkeypatch,
        tmp_path / "hydra_run",
        [f"ckpt_path={lightning_ckpt}", f"out={out}"],
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert f"{sum(p.numel() for p in segmentor.parameters()):,}" in printed
    exported = torch.load(out, weights_only=True)
    assert exported["format"] == "ssr-segmentor"
    assert set(exported["state_dict"]) == set(student)
    assert all(torch.equal(exported["state_dict"][k], v) for k, v in student.items())
    assert exported["meta"]["source_format"] == "lightning"

    # An official work-dir checkpoint stores no architecture: model= supplies it.
    official = tmp_path / "iter_40000.pth"
    work_dir_state = {f"{p}.{k}": v for p in ("model", "ema_model") for k, v in student.items()}
    work_dir_state["predictor.pos_embed"] = torch.zeros(1)
    torch.save({"meta": {"CLASSES": list(CLASSES)}, "state_dict": work_dir_state}, official)
    stats = ssr_export.export(
        official,
        tmp_path / "o.pt",
        compose_cfg("export", "model=daformer_tiny", "ckpt_path=x", "out=y").model,
    )
    assert stats["bytes"] == (tmp_path / "o.pt").stat().st_size


def test_export_console_script_needs_both_paths(tmp_path) -> None:
    """`ssr-export` installed as a console script: a missing `???` value is one line, exit 2."""
    proc = run_script(
        "ssr-export", f"out={tmp_path / 'x.pt'}", f"hydra.run.dir={tmp_path}", cwd=tmp_path
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: ckpt_path is required: pass ckpt_path=..."
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize(
    "case", ["missing_ckpt", "both_sources", "no_source", "empty_gt_root", "bad_ckpt_for_model"]
)
def test_bad_eval_inputs_exit_2_without_metrics(case, tiny, cs_root, tmp_path, monkeypatch) -> None:
    ckpt, _ = tiny
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "out"
    overrides = {
        "missing_ckpt": [f"ckpt_path={tmp_path / 'nope.pt'}", f"gt_root={cs_root}"],
        "both_sources": [f"ckpt_path={ckpt}", f"pred_dir={tmp_path}", f"gt_root={cs_root}"],
        "no_source": [f"gt_root={cs_root}"],
        "empty_gt_root": [f"ckpt_path={ckpt}", f"gt_root={empty}"],
        # an official file stores no architecture, and model=daformer_mitb0 does not fit it
        "bad_ckpt_for_model": [
            f"ckpt_path={_official_copy(ckpt, tmp_path)}",
            f"gt_root={cs_root}",
            "model=daformer_mitb0",
        ],
    }[case]
    code = call_hydra_main(
        ssr_eval.main,
        monkeypatch,
        tmp_path / "hydra_run",
        [*overrides, f"output_dir={out}", "device=cpu"],
    )
    assert code == 2
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize("case", ["missing_input", "empty_folder", "text_file", "no_ckpt_path"])
def test_bad_predict_inputs_exit_2(case, tiny, tmp_path, monkeypatch, capsys) -> None:
    ckpt, _ = tiny
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not an image")
    Image.fromarray(np.zeros((CS_H, CS_W, 3), dtype=np.uint8)).save(tmp_path / "frame.png")
    overrides = {
        "missing_input": [f"ckpt_path={ckpt}", f"input={tmp_path / 'nope.png'}"],
        "empty_folder": [f"ckpt_path={ckpt}", f"input={tmp_path / 'empty'}"],
        "text_file": [f"ckpt_path={ckpt}", f"input={tmp_path / 'notes.txt'}"],
        "no_ckpt_path": [f"input={tmp_path / 'frame.png'}"],  # predict.yaml: ckpt_path ???
    }[case]
    out = tmp_path / "out"
    code = call_hydra_main(
        ssr_predict.main, monkeypatch, tmp_path / "hydra_run", [*overrides, f"output_dir={out}"]
    )
    assert code == 2
    assert capsys.readouterr().err.strip().startswith("error:")
    assert not out.exists()


def _official_copy(export_file: Path, tmp_path: Path) -> Path:
    """The exported weights re-saved as an mmseg work-dir checkpoint (no model config)."""
    state = torch.load(export_file, weights_only=True)["state_dict"]
    path = tmp_path / "latest.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}}, path)
    return path


def test_eval_module_cli_one_line_error(cs_root, tmp_path) -> None:
    """`python -m ssr.eval` in a subprocess: a user error is exit status 2 and one stderr line."""
    out = tmp_path / "out"
    proc = run_cli(
        "ssr.eval",
        f"ckpt_path={tmp_path / 'missing.pt'}",
        f"gt_root={cs_root}",
        f"output_dir={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and "missing.pt" in err
    assert not (out / "metrics.json").exists()


def test_predict_console_script_one_line_error(tmp_path) -> None:
    """`ssr-predict` installed as a console script: a missing input is one line, exit 2."""
    missing = tmp_path / "street.png"
    out = tmp_path / "out"
    proc = run_script(
        "ssr-predict",
        f"ckpt_path={tmp_path / 'model.pt'}",
        f"input={missing}",
        f"output_dir={out}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and str(missing) in err
    assert not out.exists()
