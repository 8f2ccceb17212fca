"""Official HRDA / MIC(HRDA) work-dir checkpoints (docs/hrda.md §7): exact prefixes, strict
loads of the 16 scale-attention tensors, a one-line DAFormer/HRDA mismatch, predict under HRDA's
own test protocol (§2.4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image

from ssr import predict as ssr_predict
from ssr.data.datasets import read_image
from ssr.data.labels import CLASSES
from ssr.data.transforms import test_transform
from ssr.model.checkpoint import CheckpointError, load_segmentor, load_segmentor_weights
from ssr.model.hrda import HRDASegmentor
from ssr.model.inference import Inference

from helpers import CS_FRAMES, call_hydra_main, compose_cfg, torch_threads

# §7.1: the 16 tensors of the scale-attention head, named as in the official files.
SCALE_ATTENTION = [
    *(f"embed_layers.{i}.proj.{p}" for i in range(4) for p in ("weight", "bias")),
    "fuse_layer.conv.weight",
    *(f"fuse_layer.bn.{b}" for b in ("weight", "bias", "running_mean", "running_var")),
    "fuse_layer.bn.num_batches_tracked",
    "conv_seg.weight",
    "conv_seg.bias",
]
State = dict[str, torch.Tensor]


def prefixed(prefix: str, state: State) -> State:
    return {prefix + k: v for k, v in state.items()}


def assert_loaded(model: torch.nn.Module, expected: State) -> None:
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def hrda_b0(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DictConfig, State]:
    """An HRDA MiT-B0 work dir's `latest.pth` as mmcv writes it: a random student, teacher and
    ImageNet-model decoys holding other values, meta with CLASSES, an optimizer; its config."""
    cfg = compose_cfg("predict", "model=hrda_mitb0", "model.backbone.pretrained=null")
    torch.manual_seed(0)
    student = instantiate(cfg.model).state_dict()
    state = prefixed("model.", student)
    state |= prefixed("ema_model.", {k: v + 1 for k, v in student.items()})
    state |= prefixed("imnet_model.", {k: v + 2 for k, v in student.items()})
    ckpt = {
        "meta": {"iter": 40000, "CLASSES": CLASSES, "config": "gtaHR2csHR_hrda"},
        "state_dict": state,
        "optimizer": {"state": {}, "param_groups": [{"lr": 6e-5}]},
    }
    path = tmp_path_factory.mktemp("hrda") / "latest.pth"
    torch.save(ckpt, path)
    return path, cfg.model, student


def test_student_teacher_and_a_stripped_file(hrda_b0, tmp_path: Path) -> None:
    path, model_cfg, student = hrda_b0
    names = sorted(k for k in student if k.startswith("decode_head.scale_attention."))
    assert names == sorted(f"decode_head.scale_attention.{k}" for k in SCALE_ATTENTION)
    assert "decode_head.head.fuse_layer.bottleneck.conv.weight" in student  # DAFormer's names
    segmentor, _, fmt = load_segmentor(path, model_cfg)
    assert fmt == "official" and isinstance(segmentor, HRDASegmentor)
    assert_loaded(segmentor, student)  # model.*, neither ema_model.* nor imnet_model.*
    load_segmentor_weights(segmentor, path, which="teacher")
    assert_loaded(segmentor, {k: v + 1 for k, v in student.items()})
    stripped = tmp_path / "published.pth"  # publish_model.py: model.* only, no meta/optimizer
    torch.save({"state_dict": prefixed("model.", student)}, stripped)
    segmentor, _, fmt = load_segmentor(stripped, model_cfg)
    assert fmt == "official"
    assert_loaded(segmentor, student)


def test_daformer_hrda_mismatch_names_the_model_group(hrda_b0, tmp_path: Path) -> None:
    """One line naming the `model=` to pass, not 16 unexpected plus every head key missing."""
    path, _, _ = hrda_b0
    with pytest.raises(CheckpointError) as info:
        load_segmentor(path, compose_cfg("predict", "model=daformer_mitb0").model)
    assert str(info.value) == (
        f"{path}: holds an HRDA segmentor (decode_head.scale_attention.* keys) but the model "
        "config builds a DAFormer one; pass model=hrda_mitb0"
    )
    daformer = tmp_path / "daformer.pth"
    tiny = instantiate(compose_cfg("predict", "model=daformer_tiny").model).state_dict()
    torch.save({"state_dict": prefixed("model.", tiny)}, daformer)
    hrda_tiny = compose_cfg("predict", "model=hrda_tiny").model
    with pytest.raises(CheckpointError) as info:
        load_segmentor(daformer, hrda_tiny)
    assert str(info.value) == (
        f"{daformer}: holds a DAFormer segmentor (no decode_head.scale_attention.* keys) but the "
        "model config builds an HRDA one; pass model=daformer_tiny"
    )
    # The right architecture with the wrong MiT: the generic list, and the variant to use.
    with pytest.raises(CheckpointError, match=r"shape mismatches .* e\.g\. model=hrda_mitb0\?\)$"):
        load_segmentor(path, hrda_tiny)


def test_each_missing_scale_attention_tensor_is_named(hrda_b0, tmp_path: Path) -> None:
    _, model_cfg, student = hrda_b0
    segmentor = instantiate(model_cfg)
    before = {k: v.clone() for k, v in segmentor.state_dict().items()}
    broken = tmp_path / "broken.pth"
    for name in SCALE_ATTENTION:
        key = f"decode_head.scale_attention.{name}"
        torch.save(
            {"state_dict": prefixed("model.", {k: v for k, v in student.items() if k != key})},
            broken,
        )
        with pytest.raises(CheckpointError, match=rf"1 missing keys \[{key}\] \("):
            load_segmentor_weights(segmentor, broken)
    assert_loaded(segmentor, before)  # strict: nothing was loaded


def test_predict_with_an_hrda_work_dir_file(hrda_b0, cs_root, tmp_path, monkeypatch) -> None:
    """`ssr.predict model=hrda_mitb0 ckpt_path=latest.pth` = our HRDASegmentor with the student's
    weights under its own protocol (full resolution, 1024² windows, docs/hrda.md §2.4)."""
    path, model_cfg, student = hrda_b0
    image = cs_root / "leftImg8bit" / "val" / f"{CS_FRAMES[0]}_leftImg8bit.png"
    args = ["model=hrda_mitb0", f"ckpt_path={path}", f"input={image}", "device=cpu"]
    out = tmp_path / "out"
    assert (
        call_hydra_main(ssr_predict.main, monkeypatch, tmp_path / "h", [*args, f"output_dir={out}"])
        == 0
    )
    segmentor = instantiate(model_cfg).eval()
    segmentor.load_state_dict(student)
    inference = Inference().for_model(segmentor)  # replaces the 1024x512 whole-image default
    assert (inference.mode, inference.resize) == ("slide", None)
    assert (inference.crop_size, inference.stride) == ((1024, 1024), (512, 512))
    rgb = read_image(image)
    img = test_transform(None)(image=rgb)["image"][None]
    with torch.inference_mode():
        ids, _ = inference.predict(segmentor, [img], rgb.shape[:2])
    written = np.asarray(Image.open(out / f"{image.stem}_trainIds.png"))
    np.testing.assert_array_equal(written, ids[0].numpy())
