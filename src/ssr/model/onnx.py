"""ONNX export of the shipped segmentor, verified against PyTorch with ONNX Runtime, and running it.

The export traces the student (TorchScript-based exporter, opset 17). Fixed for every model:
float32 NCHW input with 3 mmseg-normalised RGB channels, logits (B, 19, H, W) at the input size,
a dynamic batch.

* DAFormer: height and width are dynamic too. The only Python branches on shapes (the head's and
  the forward's "resize unless already at that size") take the same path for every input of at
  least 32x32 pixels.
* HRDA (a segmentor with `test_protocol`, docs/hrda.md §2.3-§2.4): the forward loops over detail
  windows computed from the input size, so a traced graph is valid only at the traced size.
  Height and width are fixed to the test window (`test_protocol["crop_size"]`, 1024x1024 for the
  paper's models), the check runs at that size (not at `check_size`), and the protocol is stored
  as JSON in the metadata (`test_protocol`): `OnnxSegmentor.test_protocol` hands it to
  `Inference.for_model`, so `ssr.eval` / `ssr.predict` slide the same windows as for the PyTorch
  model. An input smaller than the window (an image, or a side of it, smaller than the test
  window) is padded at the bottom/right to the window and the logits cut back; PyTorch pads only
  to a multiple of 8, so such inputs get another context view and other predictions than in
  PyTorch. A larger input is an error.

Before the file is written, ONNX Runtime runs it on a real-size input and must agree with PyTorch:
max |Δlogit| <= `tolerance`, and the argmax may differ only at ties at the precision of the check
(pixels whose top-two PyTorch logits are no further apart than the measured max |Δlogit|). `onnx`
and `onnxruntime` are the optional extra `ssr[onnx]`.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssr.data.labels import CLASSES
from ssr.errors import UserError
from ssr.io import CheckpointError, atomic_write

OPSET = 17
INPUT, OUTPUT = "image", "logits"
METADATA_FORMAT = "ssr-segmentor-onnx"


class OnnxExportError(UserError):
    """The ONNX file could not be made, or ONNX Runtime disagrees with PyTorch on it."""


class OnnxInputError(UserError, ValueError):
    """An input that a fixed-size (HRDA) ONNX model cannot take."""


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as err:
        raise OnnxExportError(
            f"{module} is not installed: pip install -e '.[onnx]' (onnx and onnxruntime)"
        ) from err


def export_onnx(
    segmentor: nn.Module,
    out: str | os.PathLike,
    meta: dict[str, Any],
    check_size: Sequence[int] = (512, 1024),
    tolerance: float = 1e-4,
) -> dict[str, Any]:
    """Trace `segmentor`, check the file with ONNX Runtime, then write it atomically to `out`.

    Args:
        meta: provenance stored in the file's metadata (with the class names).
        check_size: (height, width) of the real-size check input (1024x512 test images); an HRDA
            segmentor is traced and checked at its test window instead (see the module's top).
        tolerance: largest accepted |Δlogit| between ONNX Runtime and PyTorch.

    Returns: the check's numbers (max |Δlogit|, argmax agreement, pixels, file size, the
        (height, width) checked).
    """
    onnx = _require("onnx")
    segmentor = segmentor.eval()
    protocol = getattr(segmentor, "test_protocol", None)
    axes = {0: "batch", 2: "height", 3: "width"}
    if protocol:  # HRDA: a graph for one window size
        check_size, axes = protocol["crop_size"], {0: "batch"}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, *(int(s) for s in check_size), generator=g)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The tracer's notes that shape comparisons become constants: they always hold (see top).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*dynamo=False.*", category=DeprecationWarning)
        torch.onnx.export(
            segmentor,
            (x,),
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: axes, OUTPUT: axes},
        )
    model = onnx.load_from_string(buffer.getvalue())
    properties = {"format": METADATA_FORMAT, "classes": json.dumps(list(CLASSES))}
    properties["meta"] = json.dumps(meta)
    if protocol:
        properties["test_protocol"] = json.dumps(protocol)
    for key, value in properties.items():
        model.metadata_props.add(key=key, value=value)
    data = model.SerializeToString()
    with torch.inference_mode():
        expected = segmentor(x)
    got = OnnxSegmentor(data)(x)
    stats = compare_logits(expected, got)
    if stats["max_abs_diff"] > tolerance or stats["argmax_mismatch_not_tie"]:
        raise OnnxExportError(
            f"ONNX Runtime disagrees with PyTorch on a {check_size[0]}x{check_size[1]} input: "
            f"max |Δlogit| {stats['max_abs_diff']:.2e} (tolerance {tolerance:.0e}), "
            f"{stats['argmax_mismatch_not_tie']} pixels with another class; nothing written"
        )
    atomic_write(out, lambda f: f.write(data))
    return stats | {"bytes": len(data), "check_size": [int(s) for s in check_size]}


def compare_logits(expected: Tensor, got: Tensor) -> dict[str, Any]:
    """Max |Δ| and argmax agreement; a differing argmax counts only where it is not a tie."""
    diff = float((expected - got).abs().max())
    top2 = expected.topk(2, dim=1).values
    gap = top2[:, 0] - top2[:, 1]  # (B, H, W)
    differs = expected.argmax(1) != got.argmax(1)
    return {
        "max_abs_diff": diff,
        "pixels": int(differs.numel()),
        "argmax_mismatch": int(differs.sum()),
        "argmax_mismatch_not_tie": int((differs & (gap > diff)).sum()),
    }


class OnnxSegmentor(nn.Module):
    """An exported ONNX segmentor behind the segmentor's interface: `forward(x)` gives logits
    (B, K, H, W) at the size of `x`, so `Inference`, `ssr.eval` and `ssr.predict` run it unchanged.

    `test_protocol` is the stored HRDA protocol (None for a DAFormer model), which
    `Inference.for_model` applies; `window` is then the fixed input (height, width).
    `device` "cuda[:i]" runs on ONNX Runtime's CUDA provider on GPU i when it is installed (the
    inputs and logits then pass through host memory), anything else on the CPU.
    """

    def __init__(self, source: str | os.PathLike | bytes, device: str | torch.device = "cpu"):
        super().__init__()
        ort = _require("onnxruntime")
        device = torch.device(device)
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        name = "the exported model" if isinstance(source, bytes) else str(source)
        try:
            model = source if isinstance(source, bytes) else Path(source).read_bytes()
            self.session = ort.InferenceSession(model, providers=providers)
        except Exception as err:  # onnxruntime raises its own error types for bad files
            raise CheckpointError(
                f"{name}: not a readable ONNX model ({type(err).__name__})"
            ) from err
        properties = self.session.get_modelmeta().custom_metadata_map
        classes = properties.get("classes")
        if classes is not None and tuple(json.loads(classes)) != CLASSES:
            raise CheckpointError(f"{name}: its classes are not ssr's 19 Cityscapes classes")
        self.num_classes = len(CLASSES)
        self.test_protocol: dict[str, Any] | None = None
        if "test_protocol" in properties:
            stored = json.loads(properties["test_protocol"])
            self.test_protocol = {
                k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()
            }
        dims = self.session.get_inputs()[0].shape[2:]  # ints where fixed, names where dynamic
        self.window = tuple(dims) if all(isinstance(d, int) for d in dims) else None

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if self.window is not None:  # HRDA: pad up to the traced window, cut the logits back
            wh, ww = self.window
            if h > wh or w > ww:
                raise OnnxInputError(
                    f"a {h}x{w} input is larger than the {wh}x{ww} window this ONNX model was "
                    f"exported for; run it under its test protocol (sliding {wh}x{ww} windows)"
                )
            x = F.pad(x, (0, ww - w, 0, wh - h))
        out = self.session.run([OUTPUT], {INPUT: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out)[..., :h, :w].to(x.device)
