"""The test protocol: how an image is resized and segmented at validation, evaluation and predict.

docs/method.md §3.2: DAFormer, MIC and SSR resize Cityscapes 2048x1024 to 1024x512 keeping the
ratio, run one whole-image pass, and upsample the logits in two steps (to the input size inside
the segmentor's forward, then to the original size). Sliding-window inference (overlapping crops,
the last one flush with the border, logits averaged) is the alternative for models that run on
windows. One `Inference` object (config group `inference`) is shared by validation during
training, `ssr.eval` and `ssr.predict`, so the protocol is stated once.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ssr.model.segmentor import resize

MODES = ("whole", "slide")


def _pair(value: Sequence[int], name: str) -> tuple[int, int]:
    pair = tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) <= 0:
        raise ValueError(f"inference.{name} must be two positive ints, got {list(value)}")
    return pair  # type: ignore[return-value]


class Inference:
    """Test-time resize and whole / sliding-window logits.

    Args:
        mode: "whole" (one pass on the resized image) or "slide" (overlapping windows).
        resize: (long, short) keep-ratio test scale of the image, e.g. (1024, 512); None keeps the
            original size.
        crop_size / stride: (height, width) of the windows and their step; slide mode only.
    """

    def __init__(
        self,
        mode: str = "whole",
        resize: Sequence[int] | None = (1024, 512),
        crop_size: Sequence[int] = (512, 512),
        stride: Sequence[int] = (341, 341),
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown inference mode {mode!r}; use one of {MODES}")
        self.mode = mode
        self.resize = None if resize is None else _pair(resize, "resize")
        self.crop_size = _pair(crop_size, "crop_size")
        self.stride = _pair(stride, "stride")

    def __repr__(self) -> str:
        window = (
            f", crop_size={self.crop_size}, stride={self.stride}" if self.mode == "slide" else ""
        )
        return f"Inference(mode={self.mode!r}, resize={self.resize}{window})"

    def logits(
        self, model: nn.Module, img: Tensor, out_size: Sequence[int] | None = None
    ) -> Tensor:
        """Logits (B, K, *out_size) of a normalised test image (B, 3, h, w) at the test scale.

        `model(x)` must return logits at the size of `x` (the segmentor's forward). The logits are
        first at the input size and only then resized to `out_size` (the original image size).
        Gradient mode is the caller's choice (wrap in `torch.inference_mode()` for evaluation).
        """
        logits = model(img) if self.mode == "whole" else self._slide(model, img)
        return logits if out_size is None else resize(logits, out_size)

    def _slide(self, model: nn.Module, img: Tensor) -> Tensor:
        """Average the logits of overlapping windows; the last window in each direction is moved
        back so that it ends at the image border (every pixel is covered at least once)."""
        b, _, h, w = img.shape
        logits: Tensor | None = None
        count = img.new_zeros((1, 1, h, w))
        for y0, y1 in window_spans(h, self.crop_size[0], self.stride[0]):
            for x0, x1 in window_spans(w, self.crop_size[1], self.stride[1]):
                out = model(img[:, :, y0:y1, x0:x1])
                if logits is None:
                    logits = img.new_zeros((b, out.shape[1], h, w))
                logits[:, :, y0:y1, x0:x1] += out
                count[:, :, y0:y1, x0:x1] += 1
        assert logits is not None
        return logits / count


def window_spans(length: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """(start, end) of each window along one axis; a crop larger than the image is clipped."""
    n = max(length - crop + stride - 1, 0) // stride + 1
    spans = []
    for i in range(n):
        end = min(i * stride + crop, length)
        spans.append((max(end - crop, 0), end))
    return spans
