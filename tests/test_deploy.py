"""Using trained models: test-time augmentation, ONNX export and runs (HRDA's fixed window too),
confidence maps, encodings, batched sliding windows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from ssr import eval as ssr_eval
from ssr import export as ssr_export
from ssr import predict as ssr_predict
from ssr.data.datasets import read_image
from ssr.data.labels import TRAIN_ID_TO_LABEL_ID, label_ids_to_train_ids
from ssr.data.transforms import test_transform
from ssr.model.checkpoint import export_segmentor, load_segmentor
from ssr.model.hrda import HRDASegmentor
from ssr.model.inference import Inference
from ssr.model.onnx import (
    OnnxExportError,
    OnnxInputError,
    OnnxSegmentor,
    compare_logits,
    export_onnx,
)

from helpers import CS_FRAMES, CS_H, CS_W, call_hydra_main, compose_cfg, torch_threads


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def _image(seed: int = 0, size: tuple[int, ...] = (1, 3, 64, 96)) -> torch.Tensor:
    return torch.randn(*size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------- test-time augmentation
def test_flip_tta_is_the_mean_of_the_two_passes_by_hand(tiny) -> None:
    _, segmentor = tiny
    img = _image()
    with torch.inference_mode():
        plain = torch.softmax(segmentor(img), dim=1)
        flipped = torch.softmax(segmentor(img.flip(-1)), dim=1).flip(-1)
        tta = Inference(resize=None, flip=True)
        probs = tta.probs(segmentor, [img], (64, 96))
        ids, conf = tta.predict(segmentor, [img], (64, 96), confidence=True)
    torch.testing.assert_close(probs, (plain + flipped) / 2, rtol=0, atol=1e-7)
    assert torch.equal(ids, probs.argmax(1)) and torch.equal(conf, probs.amax(1))


def test_multiscale_with_one_scale_is_plain_inference(tiny) -> None:
    _, segmentor = tiny
    img = _image(1)
    one = Inference(resize=None, ratios=[1.0])
    with torch.inference_mode():
        logits = segmentor(img)
        probs = one.probs(segmentor, [img], (64, 96))
        ids, conf = one.predict(segmentor, [img], (64, 96), confidence=True)
    assert not one.augmented
    torch.testing.assert_close(probs, torch.softmax(logits, 1), rtol=0, atol=0)
    assert torch.equal(ids, logits.argmax(1))
    torch.testing.assert_close(conf, torch.softmax(logits, 1).amax(1), rtol=0, atol=0)


def test_multiscale_scales_follow_the_official_aug_test() -> None:
    """`tta=multiscale`: ratios 0.5..1.75 of the 1024x512 test scale, each also flipped."""
    cfg = compose_cfg("eval", "tta=multiscale")
    assert list(cfg.inference.ratios) == [0.5, 0.75, 1.0, 1.25, 1.5, 1.75] and cfg.inference.flip
    tta: Inference = instantiate(cfg.inference)
    assert tta.resizes((1024, 2048)) == [
        (512, 256), (768, 384), (1024, 512), (1280, 640), (1536, 768), (1792, 896)
    ]  # fmt: skip
    assert Inference(resize=None, ratios=[0.5, 1.0]).resizes((100, 200)) == [(100, 50), None]
    assert compose_cfg("eval", "tta=flip").inference.flip
    assert not compose_cfg("eval").inference.flip  # the papers' protocol by default


def test_eval_and_predict_with_multiscale_tta(tiny, cs_root, tmp_path, monkeypatch) -> None:
    """Every view is the image resized at its scale: the per-image mean of the probabilities at
    the two scales of the test images gives the eval CLI's metrics and predict's PNGs."""
    ckpt, segmentor = tiny
    overrides = ["inference.resize=[128,64]", "inference.ratios=[1.0,0.5]", "inference.flip=true"]
    out = tmp_path / "eval"
    args = [f"ckpt_path={ckpt}", f"gt_root={cs_root}", f"output_dir={out}", "num_workers=0"]
    assert call_hydra_main(ssr_eval.main, monkeypatch, tmp_path / "h1", [*args, *overrides]) == 0
    preds = tmp_path / "preds"
    args = [f"ckpt_path={ckpt}", f"input={cs_root / 'leftImg8bit'}", f"output_dir={preds}"]
    assert call_hydra_main(ssr_predict.main, monkeypatch, tmp_path / "h2", [*args, *overrides]) == 0
    frame = CS_FRAMES[0]
    rgb = read_image(cs_root / "leftImg8bit" / "val" / f"{frame}_leftImg8bit.png")
    inference = Inference(resize=(128, 64), ratios=[1.0, 0.5], flip=True)
    imgs = [
        test_transform(r)(image=rgb)["image"].float()[None]
        for r in inference.resizes(rgb.shape[:2])
    ]
    assert [tuple(x.shape[-2:]) for x in imgs] == [(64, 128), (32, 64)]
    with torch.inference_mode():
        expected = inference.probs(segmentor.eval(), imgs, (CS_H, CS_W)).argmax(1)[0].numpy()
    written = np.asarray(Image.open(preds / "val" / f"{frame}_leftImg8bit_trainIds.png"))
    np.testing.assert_array_equal(written, expected)
    scored = ssr_eval.evaluate_predictions(preds, cs_root, progress=False)
    assert scored["mIoU"] == pytest.approx(json.loads((out / "metrics.json").read_text())["mIoU"])


# ----------------------------------------------------------------------- sliding windows
def test_batched_windows_give_the_same_logits(tiny) -> None:
    _, segmentor = tiny
    img = _image(2, (2, 3, 96, 160))
    one = Inference(mode="slide", resize=None, crop_size=(64, 64), stride=(43, 43))
    batched = Inference(
        mode="slide", resize=None, crop_size=(64, 64), stride=(43, 43), window_batch=4
    )
    with torch.inference_mode():
        a, b = one.logits(segmentor, img), batched.logits(segmentor, img)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # 2 x 4 windows in batches of 4 for 2 images: one forward of 8 crops, then one of 8.
    calls = []
    segmentor.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.inference_mode():
        batched.logits(segmentor, img)
    segmentor._forward_hooks.clear()
    assert calls == [8, 8]


# ---------------------------------------------------------------------------------- ONNX
def test_onnx_export_of_the_tiny_model_runs_at_other_sizes(tiny, tmp_path) -> None:
    ckpt, segmentor = tiny
    out = tmp_path / "tiny.onnx"
    stats = ssr_export.export(ckpt, out, {}, check_size=(64, 128))
    check = stats["check"]
    assert stats["format"] == "onnx" and check["max_abs_diff"] <= 1e-4
    assert check["argmax_mismatch_not_tie"] == 0 and check["pixels"] == 64 * 128
    onnx_model = OnnxSegmentor(out)
    for shape in ((1, 3, 64, 128), (2, 3, 100, 70), (1, 3, 250, 330)):  # dynamic batch, H, W
        x = _image(3, shape)
        with torch.inference_mode():
            expected = segmentor(x)
        got = onnx_model(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_onnx_export_of_an_official_mitb0_checkpoint(tmp_path) -> None:
    """An mmseg work-dir file (model.* student, ema_model.* decoy) of MiT-B0 DAFormer, exported
    with model=daformer_mitb0, passes its own check (at 128x256 here: 512x1024, the CLI's default,
    takes half a minute on one CPU thread)."""
    cfg = compose_cfg("export", "model=daformer_mitb0", "model.backbone.pretrained=null")
    torch.manual_seed(0)
    student, teacher = instantiate(cfg.model), instantiate(cfg.model)
    state = {f"model.{k}": v for k, v in student.state_dict().items()}
    state |= {f"ema_model.{k}": v for k, v in teacher.state_dict().items()}
    ckpt = tmp_path / "iter_40000.pth"
    torch.save({"state_dict": state, "meta": {"iter": 40000}}, ckpt)
    out = tmp_path / "mitb0.onnx"
    stats = ssr_export.export(ckpt, out, cfg.model, fmt="onnx", check_size=(128, 256))
    assert stats["params"] == 6_900_595  # DAFormer MiT-B0
    assert stats["check"]["max_abs_diff"] <= 1e-4 and stats["check"]["argmax_mismatch_not_tie"] == 0
    loaded, _, fmt = load_segmentor(out, {}, "cpu")
    assert fmt == "onnx" and isinstance(loaded, OnnxSegmentor)


def test_a_failed_onnx_check_leaves_no_file(tiny, tmp_path, monkeypatch, capsys) -> None:
    ckpt, _ = tiny
    out = tmp_path / "strict.onnx"
    args = [f"ckpt_path={ckpt}", f"out={out}", "onnx_check_size=[64,64]", "onnx_tolerance=0"]
    assert call_hydra_main(ssr_export.main, monkeypatch, tmp_path / "h", args) == 2
    err = capsys.readouterr().err.strip()
    assert (
        len(err.splitlines()) == 1 and "ONNX Runtime disagrees" in err and "nothing written" in err
    )
    assert not out.exists() and not list(tmp_path.glob(".strict.onnx*"))


def test_compare_logits_counts_only_non_ties() -> None:
    expected = torch.zeros(1, 3, 1, 2)
    expected[0, :, 0, 0] = torch.tensor([1.0, 1.0, 0.0])  # a tie between classes 0 and 1
    expected[0, :, 0, 1] = torch.tensor([2.0, 0.0, 0.0])  # a clear winner
    got = expected.clone()
    got[0, 1, 0, 0] += 1e-6  # the tie flips
    stats = compare_logits(expected, got)
    assert stats == {
        "max_abs_diff": pytest.approx(1e-6, rel=0.1),
        "pixels": 2,
        "argmax_mismatch": 1,
        "argmax_mismatch_not_tie": 0,
    }
    got[0, 0, 0, 1] -= 1.1  # the clear winner (gap 2) loses to class 1 by 0.2: not a tie
    got[0, 1, 0, 1] += 1.1
    assert compare_logits(expected, got)["argmax_mismatch_not_tie"] == 1


def test_onnx_export_refuses_a_wrong_file_and_an_onnx_source(tiny, tmp_path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(Exception, match="not a readable ONNX model"):
        OnnxSegmentor(bad)
    _, segmentor = tiny
    good = tmp_path / "good.onnx"
    export_onnx(segmentor, good, {}, check_size=(64, 64))
    with pytest.raises(Exception, match="already an exported ONNX model"):
        ssr_export.export(good, tmp_path / "again.pt", {})
    with pytest.raises(OnnxExportError, match="tolerance"):
        export_onnx(segmentor, tmp_path / "x.onnx", {}, check_size=(64, 64), tolerance=0.0)


# ----------------------------------------------------------- confidence and label-id output
def test_predict_writes_confidence_and_cityscapes_label_ids(
    tiny, cs_root, tmp_path, monkeypatch
) -> None:
    ckpt, segmentor = tiny
    preds = tmp_path / "preds"
    args = [
        f"ckpt_path={ckpt}",
        f"input={cs_root / 'leftImg8bit'}",
        f"output_dir={preds}",
        "inference.resize=[128,64]",
        "confidence=true",
        "encoding=cityscapes",
    ]
    assert call_hydra_main(ssr_predict.main, monkeypatch, tmp_path / "h", args) == 0
    stem = preds / "val" / f"{CS_FRAMES[0]}_leftImg8bit"
    train_ids = np.asarray(Image.open(f"{stem}_trainIds.png"))
    conf = cv2.imread(f"{stem}_conf.png", cv2.IMREAD_UNCHANGED)
    assert conf.dtype == np.uint16 and conf.shape == (CS_H, CS_W)
    rgb = read_image(cs_root / "leftImg8bit" / "val" / f"{CS_FRAMES[0]}_leftImg8bit.png")
    img = test_transform((128, 64))(image=rgb)["image"].float()[None]
    with torch.inference_mode():  # the test scale is the image size: logits need no resize
        expected = torch.softmax(segmentor.eval()(img), 1).amax(1)[0].numpy()
    np.testing.assert_allclose(conf / 65535.0, expected, atol=0.6 / 65535 + 1e-6)  # round trip
    label_ids = np.asarray(Image.open(f"{stem}_labelIds.png"))
    assert set(np.unique(label_ids)) <= set(TRAIN_ID_TO_LABEL_ID)
    np.testing.assert_array_equal(label_ids_to_train_ids(label_ids), train_ids)
    # A second run over the output folder does not segment ssr's own outputs.
    assert not any(p.name.endswith("_conf_trainIds.png") for p in preds.rglob("*.png"))


# ------------------------------------------------------------------- HRDA: a fixed window
HRDA_PROTOCOL = {"mode": "slide", "resize": None, "crop_size": (128, 128), "stride": (64, 64)}


@pytest.fixture(scope="module")
def hrda(tmp_path_factory) -> dict[str, Any]:
    """A random tiny HRDA (128² test window) as an ssr-segmentor file, exported to ONNX."""
    cfg = compose_cfg("export", "model=hrda_tiny")
    torch.manual_seed(0)
    segmentor = instantiate(cfg.model).eval()
    folder = tmp_path_factory.mktemp("hrda")
    pt, onnx_path = folder / "hrda.pt", folder / "hrda.onnx"
    config = OmegaConf.to_container(cfg.model, resolve=True)
    export_segmentor(segmentor, pt, model_config=config, meta={})
    with torch_threads(1):
        stats = ssr_export.export(pt, onnx_path, {})
    return {"pt": pt, "onnx": onnx_path, "segmentor": segmentor, "stats": stats, "config": config}


def test_hrda_onnx_is_fixed_to_its_test_window(hrda) -> None:
    """Traced, checked and run at the 128² test window (not onnx_check_size); batch dynamic;
    the protocol travels in the metadata."""
    segmentor, check = hrda["segmentor"], hrda["stats"]["check"]
    assert segmentor.test_protocol == HRDA_PROTOCOL == hrda["stats"]["test_protocol"]
    assert check["check_size"] == [128, 128] and check["pixels"] == 128 * 128
    assert check["max_abs_diff"] <= 1e-4 and check["argmax_mismatch_not_tie"] == 0
    import onnx

    model = onnx.load(hrda["onnx"])
    stored = json.loads({p.key: p.value for p in model.metadata_props}["test_protocol"])
    assert stored == {"mode": "slide", "resize": None, "crop_size": [128, 128], "stride": [64, 64]}
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 3, 128, 128]
    runner = OnnxSegmentor(hrda["onnx"])
    assert runner.test_protocol == HRDA_PROTOCOL and runner.window == (128, 128)
    assert repr(Inference().for_model(runner)) == repr(Inference().for_model(segmentor))
    x = _image(4, (2, 3, 128, 128))
    with torch.inference_mode():
        torch.testing.assert_close(runner(x), segmentor(x), rtol=0, atol=1e-4)
    small = x[:1, :, :96, :120]  # padded to the window, logits cut back (PyTorch: to 8s only)
    torch.testing.assert_close(runner(small), runner(F.pad(small, (0, 8, 0, 32)))[..., :96, :120])
    with pytest.raises(OnnxInputError, match=r"a 136x128 input is larger than the 128x128 window"):
        runner(_image(5, (1, 3, 136, 128)))


def _cs_tree(root: Path, size: tuple[int, int]) -> list[Path]:
    """Two Cityscapes-format val frames of (H, W) `size`; returns the images."""
    rng = np.random.default_rng(3)
    images = []
    for frame in CS_FRAMES:
        img = root / "leftImg8bit" / "val" / f"{frame}_leftImg8bit.png"
        gt = root / "gtFine" / "val" / f"{frame}_gtFine_labelTrainIds.png"
        img.parent.mkdir(parents=True, exist_ok=True)
        gt.parent.mkdir(parents=True, exist_ok=True)
        rgb = cv2.resize(rng.integers(0, 256, (10, 14, 3), dtype=np.uint8), size[::-1])
        Image.fromarray(rgb).save(img)
        Image.fromarray(rng.integers(0, 19, size, dtype=np.uint8)).save(gt)
        images.append(img)
    return images


def test_eval_and_predict_through_hrda_onnx_match_pytorch(hrda, tmp_path, caplog) -> None:
    """eval/predict on the .onnx apply HRDA's protocol from its metadata: the PyTorch file's
    predictions (argmax equal except ties), on images larger than the window (160x224: 2x3
    windows, the last ones shifted back to the border)."""
    images = _cs_tree(tmp_path / "cs", (160, 224))
    results, preds = {}, {}
    for kind in ("pt", "onnx"):
        common = [f"ckpt_path={hrda[kind]}", "device=cpu"]
        args = [*common, f"gt_root={tmp_path / 'cs'}", f"output_dir={tmp_path / kind}"]
        with caplog.at_level("INFO", logger="ssr.eval"):
            results[kind] = ssr_eval.run(compose_cfg("eval", *args, "num_workers=0"))
        protocol = "Inference(mode='slide', resize=None, crop_size=(128, 128), stride=(64, 64)"
        assert f"Test protocol: {protocol}" in caplog.text
        caplog.clear()
        preds[kind] = tmp_path / f"pred_{kind}"
        folder = tmp_path / "cs" / "leftImg8bit"
        ssr_predict.run(
            compose_cfg("predict", *common, f"input={folder}", f"output_dir={preds[kind]}")
        )
    assert results["onnx"]["mIoU"] == pytest.approx(results["pt"]["mIoU"], abs=0.05)  # ties
    inference = instantiate(compose_cfg("predict").inference).for_model(hrda["segmentor"])
    for image in images:
        rgb = read_image(image)
        with torch.inference_mode():
            logits = inference.logits(
                hrda["segmentor"], test_transform(None)(image=rgb)["image"][None]
            )[0]
        top2 = logits.topk(2, dim=0).values
        name = Path(image.parent.name) / f"{image.stem}_trainIds.png"
        pt, ox = (np.asarray(Image.open(preds[k] / "val" / name)) for k in ("pt", "onnx"))
        np.testing.assert_array_equal(pt, logits.argmax(0).numpy())
        assert not ((pt != ox) & (top2[0] - top2[1] > 1e-4).numpy()).any()


def test_torch_export_of_an_hrda_checkpoint_keeps_its_model(hrda, tmp_path) -> None:
    """A work-dir HRDA file (no config) exported to .pt loads back without model=..."""
    source = hrda["segmentor"].state_dict()
    ckpt = tmp_path / "latest.pth"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.items()}}, ckpt)
    out = tmp_path / "hrda_student.pt"
    stats = ssr_export.export(ckpt, out, compose_cfg("export", "model=hrda_tiny").model)
    assert stats["format"] == "torch" and stats["test_protocol"] == HRDA_PROTOCOL
    raw = torch.load(out, map_location="cpu", weights_only=True)
    assert raw["model_config"] == hrda["config"] and raw["meta"]["source_format"] == "official"
    loaded, config, fmt = load_segmentor(out, {})  # the stored config, not model=daformer_mitb5
    assert fmt == "export" and config == hrda["config"] and isinstance(loaded, HRDASegmentor)
    assert loaded.test_protocol == HRDA_PROTOCOL
    for k, v in source.items():
        assert torch.equal(loaded.state_dict()[k], v), k
