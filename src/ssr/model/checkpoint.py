"""Load and export segmentor weights in every format ssr meets; ALGORITHM.md §1.8 and §9.

Formats, detected from the file's content:

* "imagenet":  SegFormer's `mit_b*.pth` (backbone keys + the 1000-class `head.*`, ignored).
* "official":  a DAFormer / MIC / SSR mmseg work-dir checkpoint: `state_dict` with `model.*`
  (student), `ema_model.*` (teacher), `imnet_model.*`, SSR's `predictor.*`, `embedding_layer.*`,
  `fusion_layer.*`. A plain mmseg segmentor checkpoint (`backbone.*`, `decode_head.*`, e.g. a
  source-only run) counts too.
* "lightning": our Lightning checkpoint (`model.*` student, `teacher.model.*` teacher).
* "export":    our inference file written by `export_segmentor`.

Keys are selected by exact prefix (the official test script's regex `model.` would also match
`ema_model.`), and every load is strict: a mismatch raises one `CheckpointError` naming the file and
the missing / unexpected / mis-shaped keys, never a silent partial load.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ssr.data.labels import CLASSES

EXPORT_FORMAT = "ssr-segmentor"
EXPORT_VERSION = 1

# (student prefix, teacher prefix) of the segmentor inside each training checkpoint's state_dict.
_PREFIXES: dict[str, tuple[str, str | None]] = {
    "official": ("model.", "ema_model."),
    "lightning": ("model.", "teacher.model."),
    "export": ("", None),
}
_SHOW = 5  # how many key names an error message lists


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable, of an unknown layout, or does not fit the model."""


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
    state = _inner_state_dict(ckpt)
    state = {_strip_module(k): v for k, v in state.items()}
    fmt = _guess_format(ckpt, state)
    if fmt not in (None, "imagenet"):
        raise CheckpointError(
            f"{path}: is a full segmentor checkpoint ({fmt} format), not an ImageNet backbone "
            "file; load it with ckpt_path=... instead of model.backbone.pretrained=..."
        )
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    _load_strict(backbone, state, path, "ImageNet backbone")


def load_segmentor_weights(
    segmentor: nn.Module, path: str | os.PathLike, which: str = "student"
) -> str:
    """Strictly load a segmentor from any training or export checkpoint; returns the format name.

    `which="teacher"` selects the EMA teacher of a training checkpoint instead of the student.
    """
    if which not in ("student", "teacher"):
        raise ValueError(f"which must be 'student' or 'teacher', got {which!r}")
    ckpt = _read(path)
    state = {_strip_module(k): v for k, v in _inner_state_dict(ckpt).items()}
    fmt = _guess_format(ckpt, state)
    if fmt is None:
        raise CheckpointError(
            f"{path}: unrecognised checkpoint layout (first keys {_first(list(state))}); "
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
            f"(a stripped / published checkpoint?); first keys {_first(list(state))}"
        )
    _load_strict(segmentor, selected, path, f"{which} of a {fmt} checkpoint")
    return fmt


def read_model_config(path: str | os.PathLike) -> dict | None:
    """The Hydra model config stored in our Lightning / export checkpoints, else None."""
    cfg = _read(path).get("model_config")
    return cfg if isinstance(cfg, dict) else None


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: str | os.PathLike) -> dict:
    """torch.load with weights_only=True, turning every failure into one CheckpointError line."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found; check the path you passed")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError, UnpicklingError...
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if refused:
            raise CheckpointError(
                f"{path}: holds a {refused.group(1)} object, which safe loading "
                "(weights_only=True) refuses; re-save it with only tensors and plain containers"
            ) from e
        raise CheckpointError(
            f"{path}: not a readable torch checkpoint (truncated or corrupt?): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e
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


def _load_strict(module: nn.Module, state: Mapping[str, Any], path: Any, what: str) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    not_tensor = [k for k in expected if k in state and not isinstance(state[k], Tensor)]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and isinstance(state[k], Tensor) and state[k].shape != expected[k].shape
    ]
    problems = [
        f"{len(keys)} {label} {_first(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("non-tensor values", not_tensor),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    if problems:
        raise CheckpointError(
            f"{path}: {what} does not fit the model: {'; '.join(problems)} "
            "(does the model config match the checkpoint, e.g. model=daformer_mitb5?)"
        )
    module.load_state_dict(dict(state), strict=True)


def _first(items: list) -> str:
    shown = ", ".join(str(x) for x in items[:_SHOW])
    return f"[{shown}{', ...' if len(items) > _SHOW else ''}]"


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
