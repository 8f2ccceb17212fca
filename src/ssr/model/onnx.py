"""ONNX export of the shipped segmentor, verified against PyTorch with ONNX Runtime, and running it.

The export traces the student (TorchScript-based exporter, opset 17) with dynamic batch, height and
width: the only Python branches on shapes (the head's and the forward's "resize unless already at
that size") take the same path for every input of at least 32x32 pixels. Fixed: float32 NCHW
input with 3 mmseg-normalised RGB channels, logits (B, 19, H, W) at the input size. Before the file
is written, ONNX Runtime runs it on a real-size input and must agree with PyTorch: max |Δlogit|
<= `tolerance`, and the argmax may differ only at ties at the precision of the check (pixels whose
top-two PyTorch logits are no further apart than the measured max |Δlogit|). `onnx` and
`onnxruntime` are the optional extra `ssr[onnx]`.
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
from torch import Tensor, nn

from ssr.data.labels import CLASSES
from ssr.errors import UserError
from ssr.io import CheckpointError, atomic_write

OPSET = 17
INPUT, OUTPUT = "image", "logits"
METADATA_FORMAT = "ssr-segmentor-onnx"


class OnnxExportError(UserError):
    """The ONNX file could not be made, or ONNX Runtime disagrees with PyTorch on it."""


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
        check_size: (height, width) of the real-size check input (1024x512 test images).
        tolerance: largest accepted |Δlogit| between ONNX Runtime and PyTorch.

    Returns: the check's numbers (max |Δlogit|, argmax agreement, pixels, file size).
    """
    onnx = _require("onnx")
    segmentor = segmentor.eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, *(int(s) for s in check_size), generator=g)
    buffer = io.BytesIO()
    axes = {0: "batch", 2: "height", 3: "width"}
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
        classes = self.session.get_modelmeta().custom_metadata_map.get("classes")
        if classes is not None and tuple(json.loads(classes)) != CLASSES:
            raise CheckpointError(f"{name}: its classes are not ssr's 19 Cityscapes classes")
        self.num_classes = len(CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        out = self.session.run([OUTPUT], {INPUT: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(out).to(x.device)
