"""Checkpoint formats, exact prefixes, strict loads, clear failures (docs/method.md §1.8, §9)."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import IO

import pytest
import torch
from torch import nn

from ssr.data.labels import CLASSES
from ssr.io import WriteError
from ssr.model import DAFormerHead, Segmentor, build_mit
from ssr.model.checkpoint import (
    CheckpointError,
    export_segmentor,
    load_backbone_weights,
    load_segmentor,
    load_segmentor_weights,
)
from ssr.model.mit import MIT_VARIANTS

TINY_CONFIG = {
    "_target_": "ssr.model.segmentor.Segmentor",
    "backbone": {"_target_": "ssr.model.mit.build_mit", "variant": "tiny", "pretrained": None},
    "decode_head": {
        "_target_": "ssr.model.daformer_head.DAFormerHead",
        "_partial_": True,
        "embed_dim": 32,
        "channels": 32,
    },
}


def tiny_segmentor(seed: int) -> Segmentor:
    torch.manual_seed(seed)
    dims = MIT_VARIANTS["tiny"].embed_dims
    return Segmentor(build_mit("tiny"), DAFormerHead(dims, embed_dim=32, channels=32))


def marked(seed: int) -> dict[str, torch.Tensor]:
    """A tiny segmentor state dict whose every entry (buffers too) is distinct per seed."""
    sd = tiny_segmentor(seed).state_dict()
    return {k: v + seed for k, v in sd.items()}


def assert_loaded(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def prefixed(prefix: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


@pytest.fixture
def student() -> dict[str, torch.Tensor]:
    return marked(1)


@pytest.fixture
def teacher() -> dict[str, torch.Tensor]:
    return marked(2)


@pytest.fixture
def work_dir_ckpt(tmp_path: Path, student: dict, teacher: dict) -> Path:
    """An SSR work-dir checkpoint as mmcv writes it (§9.2-§9.3), every prefix present."""
    state = {
        **prefixed("model.", student),
        **prefixed("ema_model.", teacher),
        **prefixed("imnet_model.", marked(3)),
        "predictor.pos_embed": torch.zeros(1, 4, 4, 8),
        "predictor.blocks.0.attn.qkv.weight": torch.zeros(24, 8),
        "embedding_layer.0.proj.weight": torch.zeros(16, 256),
        "fusion_layer.0.q.weight": torch.zeros(16, 16),
    }
    ckpt = {
        "meta": {"iter": 40000, "CLASSES": CLASSES, "PALETTE": [[0, 0, 0]] * 19, "config": "x"},
        "state_dict": state,
        "optimizer": {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 6e-5}]},
    }
    path = tmp_path / "iter_40000.pth"
    torch.save(ckpt, path)
    return path


def test_official_work_dir_student_and_teacher(work_dir_ckpt: Path, student, teacher) -> None:
    """`model.` must not swallow `ema_model.` / `imnet_model.`: each selection is one network."""
    model = tiny_segmentor(0)
    assert load_segmentor_weights(model, work_dir_ckpt) == "official"
    assert_loaded(model, student)
    assert load_segmentor_weights(model, work_dir_ckpt, which="teacher") == "official"
    assert_loaded(model, teacher)


def test_module_prefix_is_stripped(tmp_path: Path, student: dict) -> None:
    path = tmp_path / "dp.pth"
    torch.save({"state_dict": prefixed("module.model.", student)}, path)
    model = tiny_segmentor(0)
    load_segmentor_weights(model, path)
    assert_loaded(model, student)


def test_published_checkpoint_has_no_teacher(tmp_path: Path, student: dict) -> None:
    path = tmp_path / "published.pth"
    torch.save({"state_dict": prefixed("model.", student)}, path)
    with pytest.raises(CheckpointError, match=r"published.pth: no keys start with 'ema_model.'"):
        load_segmentor_weights(tiny_segmentor(0), path, which="teacher")


def test_plain_mmseg_segmentor_checkpoint(tmp_path: Path, student: dict) -> None:
    """A non-UDA mmseg run (e.g. source-only) stores the segmentor without a `model.` prefix."""
    path = tmp_path / "source_only.pth"
    torch.save({"meta": {"CLASSES": CLASSES}, "state_dict": student}, path)
    model = tiny_segmentor(0)
    assert load_segmentor_weights(model, path) == "official"
    assert_loaded(model, student)
    with pytest.raises(CheckpointError, match="holds no teacher"):
        load_segmentor_weights(model, path, which="teacher")


def test_wrong_classes_in_meta(tmp_path: Path, student: dict) -> None:
    path = tmp_path / "classes.pth"
    classes = (CLASSES[1], CLASSES[0], *CLASSES[2:])
    torch.save({"meta": {"CLASSES": classes}, "state_dict": prefixed("model.", student)}, path)
    with pytest.raises(CheckpointError, match=r"classes.pth: declares class 0 as 'sidewalk'"):
        load_segmentor_weights(tiny_segmentor(0), path)
    torch.save({"meta": {"CLASSES": CLASSES[:16]}, "state_dict": prefixed("model.", student)}, path)
    with pytest.raises(CheckpointError, match=r"classes.pth: declares 16 classes"):
        load_segmentor_weights(tiny_segmentor(0), path)


def test_mismatches_are_named(tmp_path: Path, student: dict) -> None:
    """Missing, unexpected and mis-shaped keys all appear in the one error line; nothing loads."""
    broken = dict(student)
    del broken["decode_head.conv_seg.bias"]
    broken["decode_head.extra.weight"] = torch.zeros(1)
    broken["backbone.norm4.weight"] = torch.zeros(7)
    path = tmp_path / "broken.pth"
    torch.save({"state_dict": prefixed("model.", broken)}, path)
    model = tiny_segmentor(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_segmentor_weights(model, path)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(path))
    assert "1 missing keys [decode_head.conv_seg.bias]" in msg
    assert "1 unexpected keys [decode_head.extra.weight]" in msg
    assert "backbone.norm4.weight: file (7,) vs model (128,)" in msg
    assert_loaded(model, before)


def test_many_missing_keys_are_counted_and_truncated(tmp_path: Path, student: dict) -> None:
    path = tmp_path / "headless.pth"
    body = {k: v for k, v in student.items() if k.startswith("backbone.")}
    torch.save({"state_dict": prefixed("model.", body)}, path)
    with pytest.raises(CheckpointError, match=r"(\d+) missing keys \[decode_head\.[^]]*, \.\.\.\]"):
        load_segmentor_weights(tiny_segmentor(0), path)


def test_truncated_and_missing_files(tmp_path: Path, work_dir_ckpt: Path) -> None:
    data = work_dir_ckpt.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut.pth: not a readable checkpoint \(trunc"):
        load_segmentor_weights(tiny_segmentor(0), cut)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pth: not a readable checkpoint"):
        load_segmentor(empty, TINY_CONFIG)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(bytes(range(256)) * 4)  # random bytes: one line, no torch advice
    with pytest.raises(CheckpointError) as info:
        load_segmentor(garbage, TINY_CONFIG)
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)
    with pytest.raises(CheckpointError, match=r"nowhere.pth: checkpoint not found"):
        load_segmentor_weights(tiny_segmentor(0), tmp_path / "nowhere.pth")


def test_unsafe_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {}, "meta": {"where": Path("x")}}, path)
    with pytest.raises(CheckpointError, match=r"unsafe.pth: holds a \S*Path object"):
        load_segmentor_weights(tiny_segmentor(0), path)


def test_lightning_checkpoint(tmp_path: Path, student: dict, teacher: dict) -> None:
    """Our UDA module: student `model.*`, teacher `teacher.model.*` (a suffix of `model.`)."""
    path = tmp_path / "last.ckpt"
    state = {
        **prefixed("model.", student),
        **prefixed("teacher.model.", teacher),
        "imnet_backbone.norm1.weight": torch.zeros(16),
        "sam.fusion_layer.0.q.weight": torch.zeros(16, 16),
    }
    ckpt = {"pytorch-lightning_version": "2.4.0", "state_dict": state, "model_config": TINY_CONFIG}
    torch.save(ckpt, path)
    model = tiny_segmentor(0)
    assert load_segmentor_weights(model, path) == "lightning"
    assert_loaded(model, student)
    assert load_segmentor_weights(model, path, which="teacher") == "lightning"
    assert_loaded(model, teacher)
    loaded, config, fmt = load_segmentor(path, {})  # the stored config, not the one passed
    assert (config, fmt) == (TINY_CONFIG, "lightning") and not loaded.training


def test_export_round_trip(tmp_path: Path) -> None:
    source = tiny_segmentor(5)
    path = tmp_path / "out" / "model.pt"
    export_segmentor(source, path, TINY_CONFIG, meta={"step": 7, "mIoU": 12.5})
    assert [p.name for p in path.parent.iterdir()] == ["model.pt"]  # no temporary left behind
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == "ssr-segmentor" and raw["version"] == 1
    assert raw["classes"] == list(CLASSES) and raw["meta"] == {"step": 7, "mIoU": 12.5}
    model = tiny_segmentor(0)
    assert load_segmentor_weights(model, path) == "export"
    assert_loaded(model, source.state_dict())
    assert load_segmentor(path, {})[1] == TINY_CONFIG
    with pytest.raises(CheckpointError, match="holds no teacher"):
        load_segmentor_weights(model, path, which="teacher")


def test_export_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash while writing leaves the previous file intact and no temporary behind."""
    path = tmp_path / "model.pt"
    export_segmentor(tiny_segmentor(5), path, TINY_CONFIG, meta={})
    before = path.read_bytes()

    def crash(obj: object, f: IO[bytes]) -> None:
        f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(WriteError, match=r"no space left on device at .*model\.pt; the previous"):
        export_segmentor(tiny_segmentor(6), path, TINY_CONFIG, meta={})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_export_rejects_non_plain_config(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"meta.run is a PosixPath"):
        export_segmentor(tiny_segmentor(0), tmp_path / "m.pt", TINY_CONFIG, {"run": Path("x")})


@pytest.fixture
def imagenet_file(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """An ImageNet file in SegFormer's layout: MiT-B0 keys + the 1000-class `head` classifier."""
    torch.manual_seed(11)
    sd = build_mit("b0").state_dict()
    path = tmp_path / "mit_b0.pth"
    extra = {"head.weight": torch.zeros(1000, 256), "head.bias": torch.zeros(1000)}
    torch.save({"state_dict": {**sd, **extra}}, path)
    return path, sd


def test_imagenet_backbone_loads_strictly(imagenet_file) -> None:
    path, sd = imagenet_file
    torch.manual_seed(12)
    fresh = build_mit("b0")
    load_backbone_weights(fresh, path)
    assert_loaded(fresh, sd)
    assert_loaded(build_mit("b0", pretrained=str(path)), sd)


def test_imagenet_missing_key_is_named(tmp_path: Path, imagenet_file) -> None:
    _, sd = imagenet_file
    del sd["block2.1.attn.kv.bias"]
    path = tmp_path / "mit_b0_broken.pth"
    torch.save(sd, path)  # also: no `state_dict` wrapper
    with pytest.raises(CheckpointError, match=r"1 missing keys \[block2.1.attn.kv.bias\]"):
        load_backbone_weights(build_mit("b0"), path)


def test_imagenet_file_into_wrong_variant(imagenet_file) -> None:
    path, _ = imagenet_file
    with pytest.raises(CheckpointError, match=r"shape mismatches \[patch_embed1.proj.weight"):
        build_mit("b1", pretrained=str(path))


def test_format_confusions_are_explained(imagenet_file, work_dir_ckpt: Path) -> None:
    path, _ = imagenet_file
    with pytest.raises(CheckpointError, match="holds only an ImageNet MiT backbone"):
        load_segmentor_weights(tiny_segmentor(0), path)
    with pytest.raises(CheckpointError, match=r"is a full segmentor checkpoint \(official"):
        load_backbone_weights(build_mit("tiny"), work_dir_ckpt)
