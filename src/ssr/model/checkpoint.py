"""Load and export segmentor weights in every format ssr meets; docs/method.md §1.8, §9 and
docs/hrda.md §7.

Formats, detected from the file's content:

* "imagenet":  SegFormer's `mit_b*.pth` (backbone keys + the 1000-class `head.*`, ignored).
* "official":  a DAFormer / MIC / SSR / HRDA / MIC(HRDA) mmseg work-dir checkpoint: `state_dict`
  with `model.*` (student), `ema_model.*` (teacher), `imnet_model.*`, SSR's `predictor.*`,
  `embedding_layer.*`, `fusion_layer.*`; `meta` and `optimizer` are ignored (but `meta.CLASSES`
  must be our class order). A released file may be stripped to `model.*` alone, and a plain mmseg
  segmentor checkpoint (`backbone.*`, `decode_head.*`, e.g. a source-only run) counts too.
  HRDA's keys are our module names (docs/hrda.md §7): `decode_head.head.*` (the DAFormer head)
  and `decode_head.scale_attention.*`; the latter marks an HRDA checkpoint, and a DAFormer model
  config meeting one (or an HRDA config meeting a DAFormer file) fails with the `model=` to use.
* "lightning": our Lightning checkpoint (`model.*` student, `teacher.model.*` teacher).
* "export":    our inference file written by `export_segmentor`.

Keys are selected by exact prefix (the official test script's regex `model.` would also match
`ema_model.`), and every load is strict: a mismatch raises one `CheckpointError` naming the file and
the missing / unexpected / mis-shaped keys, never a silent partial load.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ssr.data.labels import CLASSES
from ssr.io import CheckpointError, atomic_torch_save, first_items, load_strict, load_torch_file

EXPORT_FORMAT = "ssr-segmentor"
EXPORT_VERSION = 1

# (student prefix, teacher prefix) of the segmentor inside each training checkpoint's state_dict.
_PREFIXES: dict[str, tuple[str, str | None]] = {
    "official": ("model.", "ema_model."),
    "lightning": ("model.", "teacher.model."),
    "export": ("", None),
}
_FIT_HINT = "does the model config match the checkpoint, e.g. model=daformer_mitb5?"
# Only an HRDA segmentor (ssr.model.hrda) has these keys (docs/hrda.md §7.4).
HRDA_MARKER = "decode_head.scale_attention."

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "export_segmentor",
    "load_backbone_weights",
    "load_segmentor",
    "load_segmentor_weights",
]


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Strictly load SegFormer ImageNet weights (`mit_b*.pth`) into a MiT backbone.

    Only the ImageNet classifier `head.*` may be present without a counterpart in the model.
    """
    if not Path(path).is_file():
        raise CheckpointError(
            f"{path}: ImageNet MiT weights not found; put SegFormer's {Path(path).name} there "
            "(README, 'Weights'), or pass model.backbone.pretrained=<file> (null = random init)"
        )
    ckpt = _read(path)
    state = {_strip_module(k): v for k, v in _inner_state_dict(ckpt).items()}
    fmt = _guess_format(ckpt, state)
    if fmt not in (None, "imagenet"):
        raise CheckpointError(
            f"{path}: is a full segmentor checkpoint ({fmt} format), not an ImageNet backbone "
            "file; load it with ckpt_path=... instead of model.backbone.pretrained=..."
        )
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    load_strict(backbone, state, path, "ImageNet backbone", _FIT_HINT)


def load_segmentor_weights(
    segmentor: nn.Module, path: str | os.PathLike, which: str = "student"
) -> str:
    """Strictly load a segmentor from any training or export checkpoint; returns the format name.

    `which="teacher"` selects the EMA teacher of a training checkpoint instead of the student.
    """
    return _load_weights(segmentor, _read(path), path, which)


def _load_weights(segmentor: nn.Module, ckpt: dict, path: Any, which: str) -> str:
    if which not in ("student", "teacher"):
        raise ValueError(f"which must be 'student' or 'teacher', got {which!r}")
    state = {_strip_module(k): v for k, v in _inner_state_dict(ckpt).items()}
    fmt = _guess_format(ckpt, state)
    if fmt is None:
        raise CheckpointError(
            f"{path}: unrecognised checkpoint layout (first keys {first_items(list(state))}); "
            "expected an mmseg work-dir, Lightning or ssr export checkpoint"
        )
    if fmt == "imagenet":
        raise CheckpointError(
            f"{path}: holds only an ImageNet MiT backbone (no decode head); "
            "pass it as model.backbone.pretrained=... instead"
        )
    _check_classes(ckpt, path)
    student, teacher = _PREFIXES[fmt]
    if fmt == "official" and not any(k.startswith(("model.", "ema_model.")) for k in state):
        student, teacher = "", None  # plain mmseg segmentor: backbone.* / decode_head.*
    prefix = student if which == "student" else teacher
    if prefix is None:
        raise CheckpointError(f"{path}: a {fmt} checkpoint holds no teacher; use which=student")
    selected = {
        _strip_module(k[len(prefix) :]): v for k, v in state.items() if k.startswith(prefix)
    }
    if not selected:
        raise CheckpointError(
            f"{path}: no keys start with {prefix!r}, so it holds no {which} "
            f"(a stripped / published checkpoint?); first keys {first_items(list(state))}"
        )
    _check_architecture(segmentor, selected, path)
    hint = f"does the model config match the checkpoint, e.g. {_model_choice(selected)}?"
    load_strict(segmentor, selected, path, f"{which} of a {fmt} checkpoint", hint)
    return fmt


def _is_hrda(keys: Any) -> bool:
    return any(k.startswith(HRDA_MARKER) for k in keys)


def _check_architecture(segmentor: nn.Module, selected: Mapping[str, Any], path: Any) -> None:
    """DAFormer vs HRDA in one line: the generic key lists (every head key missing or
    unexpected) would hide that only the `model=` group is wrong."""
    file_hrda, model_hrda = _is_hrda(selected), _is_hrda(segmentor.state_dict())
    if file_hrda == model_hrda:
        return
    held, built = ("an HRDA", "a DAFormer") if file_hrda else ("a DAFormer", "an HRDA")
    raise CheckpointError(
        f"{path}: holds {held} segmentor ({'' if file_hrda else 'no '}{HRDA_MARKER}* keys) but "
        f"the model config builds {built} one; pass {_model_choice(selected)}"
    )


def _model_choice(state: Mapping[str, Any]) -> str:
    """`model=<arch>_mit<variant>` fitting a segmentor state dict, the MiT variant read from the
    backbone's stage widths and depths (`mitbX` when they match none)."""
    from ssr.model.mit import MIT_VARIANTS  # ssr.model.mit imports this module

    arch = "hrda" if _is_hrda(state) else "daformer"
    widths = tuple(
        int(getattr(state.get(f"backbone.patch_embed{i}.proj.weight"), "shape", (0,))[0])
        for i in range(1, 5)
    )
    depths = tuple(
        len({k.split(".")[2] for k in state if k.startswith(f"backbone.block{i}.")})
        for i in range(1, 5)
    )
    for name, spec in MIT_VARIANTS.items():
        if (tuple(spec.embed_dims), tuple(spec.depths)) == (widths, depths):
            return f"model={arch}_{'tiny' if name == 'tiny' else 'mit' + name}"
    return f"model={arch}_mitbX"


def export_segmentor(
    segmentor: nn.Module, path: str | os.PathLike, model_config: dict, meta: dict
) -> None:
    """Write a self-describing inference file; atomic, so a crash never leaves a half-written one.

    `model_config` (the Hydra `model` node as a plain dict) lets eval/predict rebuild the network
    without being told the architecture; `meta` is free-form provenance (run, step, mIoU...).
    """
    if segmentor.num_classes != len(CLASSES):
        raise ValueError(
            f"export expects a {len(CLASSES)}-class segmentor, got {segmentor.num_classes}"
        )
    _require_plain(model_config, "model_config")
    _require_plain(meta, "meta")
    payload = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "model_config": model_config,
        "state_dict": {k: v.detach().cpu() for k, v in segmentor.state_dict().items()},
        "classes": list(CLASSES),
        "meta": meta,
    }
    atomic_torch_save(payload, path)


def load_segmentor(
    ckpt_path: str | Path, model_cfg: DictConfig | dict, device: torch.device | str = "cpu"
) -> tuple[nn.Module, dict, str]:
    """Build the student from any checkpoint format: (segmentor in eval mode, config, format).

    Our Lightning and export checkpoints carry their model config; an official work-dir checkpoint
    does not, so `model_cfg` (the `model=` group) describes it. ImageNet weights are never loaded:
    the checkpoint overwrites every parameter (as the official test script sets `pretrained=None`).
    An `.onnx` file (`ssr.export format=onnx`) runs on ONNX Runtime behind the same interface.
    """
    if Path(ckpt_path).suffix == ".onnx":
        from ssr.model.onnx import OnnxSegmentor

        if not Path(ckpt_path).is_file():
            raise CheckpointError(f"{ckpt_path}: ONNX model not found; check the path")
        return OnnxSegmentor(ckpt_path, device).eval(), {}, "onnx"
    ckpt = _read(ckpt_path)  # read once: a training checkpoint holds three networks
    config = ckpt.get("model_config") if isinstance(ckpt.get("model_config"), dict) else None
    if config is None:
        config = (
            OmegaConf.to_container(model_cfg, resolve=True)
            if isinstance(model_cfg, DictConfig)
            else model_cfg
        )
        variant = (config.get("backbone") or {}).get("variant")
        log.info(f"{ckpt_path} stores no model config; building the model= config (MiT {variant})")
    config = json.loads(json.dumps(config))  # a private deep copy
    if isinstance(config.get("backbone"), dict) and "pretrained" in config["backbone"]:
        config["backbone"]["pretrained"] = None
    segmentor = instantiate(config)
    fmt = _load_weights(segmentor, ckpt, ckpt_path, "student")
    log.info(f"Loaded the student from {ckpt_path} ({fmt} format)")
    return segmentor.to(device).eval(), config, fmt


def _read(path: str | os.PathLike) -> dict:
    """The checkpoint as a dict (safe `weights_only` load; one `CheckpointError` on failure)."""
    ckpt = load_torch_file(
        path, hint="expected an mmseg work-dir, Lightning or ssr export checkpoint"
    )
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(ckpt).__name__}")
    return ckpt


def _inner_state_dict(ckpt: dict) -> dict[str, Any]:
    """`state_dict` or `model` if the file wraps its weights (mmcv / timm habits), else the file."""
    for key in ("state_dict", "model"):
        if isinstance(ckpt.get(key), Mapping):
            return dict(ckpt[key])
    return ckpt


def _guess_format(ckpt: dict, state: Mapping[str, Any]) -> str | None:
    if ckpt.get("format") == EXPORT_FORMAT:
        return "export"
    if "pytorch-lightning_version" in ckpt:
        return "lightning"
    if any(k.startswith(("model.", "ema_model.", "backbone.", "decode_head.")) for k in state):
        return "official"
    if any(k.startswith("patch_embed1.") for k in state):
        return "imagenet"
    return None


def _strip_module(key: str) -> str:
    """Drop the `module.` that (Distributed)DataParallel wrappers prepend."""
    return key[len("module.") :] if key.startswith("module.") else key


def _check_classes(ckpt: dict, path: str | os.PathLike) -> None:
    """A checkpoint that declares its classes must use our order, else every IoU is mislabelled."""
    meta = ckpt.get("meta")
    declared = ckpt.get("classes")
    if declared is None and isinstance(meta, Mapping):
        declared = meta.get("CLASSES")
    if declared is None or tuple(declared) == CLASSES:
        return
    declared = list(declared)
    if len(declared) != len(CLASSES):
        raise CheckpointError(
            f"{path}: declares {len(declared)} classes, but ssr segments the {len(CLASSES)} "
            "Cityscapes classes; the checkpoint was trained on another label set"
        )
    i = next(i for i, (a, b) in enumerate(zip(declared, CLASSES, strict=True)) if a != b)
    raise CheckpointError(
        f"{path}: declares class {i} as {declared[i]!r}, but ssr's train id {i} is "
        f"{CLASSES[i]!r}; the checkpoint uses another class order"
    )


def _require_plain(obj: Any, where: str) -> None:
    """Only plain containers survive weights_only loading: fail at export, not when loading."""
    if type(obj) is dict:
        for k, v in obj.items():
            _require_plain(v, f"{where}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            _require_plain(v, f"{where}[{i}]")
    elif obj is not None and not isinstance(obj, str | int | float | bool):
        raise TypeError(
            f"{where} is a {type(obj).__name__}; export needs plain dict/list/str/number values "
            "(convert OmegaConf nodes with OmegaConf.to_container(cfg, resolve=True))"
        )
