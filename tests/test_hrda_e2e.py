"""HRDA end to end on CPU: `demo_hrda` and `demo_mic_ssr_hrda` train a few steps, `ssr.eval`
scores the Lightning checkpoint under HRDA's own test protocol (full resolution, sliding windows
of the training crop; docs/hrda.md §2.4), and `ssr.export` writes the student as .pt and .onnx.
Both students are the same network: SSR's SAM and fusion layers shape training only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ssr import eval as ssr_eval
from ssr import export as ssr_export
from ssr import train as ssr_train
from ssr.model.onnx import OnnxSegmentor

from helpers import call_hydra_main, synthetic_train, torch_threads

# The synthetic target's val frames are 256x128: no resize, 128² windows (the demo's crop) every
# 64 px, as 1024² every 512 on Cityscapes' 2048x1024.
PROTOCOL = "Inference(mode='slide', resize=None, crop_size=(128, 128), stride=(64, 64)"


def _student(path: Path) -> tuple[dict[str, tuple[int, ...]], int]:
    """{key: shape} and the number of values of an exported ssr-segmentor file."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["format"] == "ssr-segmentor"
    state = ckpt["state_dict"]
    return {k: tuple(v.shape) for k, v in state.items()}, sum(v.numel() for v in state.values())


def test_demo_hrda_and_mic_ssr_hrda_train_evaluate_export(
    synthetic_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    exports = {}
    for experiment in ("demo_hrda", "demo_mic_ssr_hrda"):
        run = tmp_path / experiment
        train = [f"experiment={experiment}", *synthetic_train(synthetic_root)]
        train += ["trainer.max_steps=4", "trainer.val_check_interval=4", "test_after_fit=false"]
        with torch_threads(1):
            assert call_hydra_main(ssr_train.main, monkeypatch, run, train) == 0
            ckpt = run / "checkpoints" / "last.ckpt"
            state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
            assert any(k.startswith("model.decode_head.scale_attention.") for k in state)
            assert any(k.startswith("sam.fusion_layer.") for k in state) == ("ssr" in experiment)

            args = [f"ckpt_path={ckpt}", f"gt_root={synthetic_root / 'cityscapes'}"]
            args += ["num_workers=0", f"output_dir={run / 'eval'}"]
            assert call_hydra_main(ssr_eval.main, monkeypatch, run / "eval_run", args) == 0
            assert f"Test protocol: {PROTOCOL}" in (run / "eval_run" / "eval.log").read_text()
            metrics = json.loads((run / "eval" / "metrics.json").read_text())
            assert metrics["num_images"] == 2 and 0.0 <= metrics["mIoU"] <= 100.0

            exports[experiment] = tmp_path / f"{experiment}.pt"
            for out in (exports[experiment], tmp_path / f"{experiment}.onnx"):
                args = [f"ckpt_path={ckpt}", f"out={out}"]
                assert call_hydra_main(ssr_export.main, monkeypatch, run / out.suffix, args) == 0
        table = capsys.readouterr().out
        assert table.count("HRDA: slide 128x128, stride 64x64") == 2  # .pt and .onnx
        assert "128x128: max |Δlogit|" in table  # checked at the window, not at 512x1024
        onnx_model = OnnxSegmentor(tmp_path / f"{experiment}.onnx")
        assert onnx_model.test_protocol is not None and onnx_model.window == (128, 128)

    keys, params = _student(exports["demo_hrda"])
    assert (keys, params) == _student(exports["demo_mic_ssr_hrda"])
    assert not any(k.startswith(("sam", "teacher", "imnet", "fusion", "model.")) for k in keys)
    assert sum(k.startswith("decode_head.scale_attention.") for k in keys) == 16
