"""The test protocol: how an image is resized and segmented at validation, evaluation and predict.

docs/method.md §3.2: DAFormer, MIC and SSR resize Cityscapes 2048x1024 to 1024x512 keeping the
ratio, run one whole-image pass, and upsample the logits in two steps (to the input size inside
the segmentor's forward, then to the original size). Sliding-window inference (overlapping crops,
the last one flush with the border, logits averaged, windows run in batches) is the alternative
for models that run on windows. Test-time augmentation follows the official test script's
`--aug-test` (mmseg 0.16's MultiScaleFlipAug + `aug_test`): the image at several scale ratios of the
test scale, each also flipped, their softmax probabilities at the original size averaged. One
`Inference` object (config groups `inference` and `tta`) is shared by validation during training,
`ssr.eval` and `ssr.predict`, so the protocol is stated once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ssr.errors import ConfigError, pair_setting
from ssr.model.segmentor import resize

MODES = ("whole", "slide")


class Inference:
    """Test-time resize, whole / sliding-window logits and test-time augmentation.

    Args:
        mode: "whole" (one pass on the resized image) or "slide" (overlapping windows).
        resize: (long, short) keep-ratio test scale of the image, e.g. (1024, 512); None keeps the
            original size.
        crop_size / stride: (height, width) of the windows and their step; slide mode only.
        window_batch: windows per forward pass in slide mode (the same logits as one at a time,
            up to float rounding).
        ratios: test-time scales as ratios of `resize` (of the image's own size without one);
            [1.0] is no multi-scale augmentation.
        flip: also run every scale horizontally flipped (test-time augmentation).
    """

    def __init__(
        self,
        mode: str = "whole",
        resize: Sequence[int] | None = (1024, 512),
        crop_size: Sequence[int] = (512, 512),
        stride: Sequence[int] = (341, 341),
        window_batch: int = 1,
        ratios: Sequence[float] = (1.0,),
        flip: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"unknown inference mode {mode!r}; use one of {MODES}")
        if window_batch < 1:
            raise ConfigError(f"inference.window_batch={window_batch} must be >= 1")
        if not ratios or min(ratios) <= 0:
            raise ConfigError(f"inference.ratios={list(ratios)} must be positive scale ratios")
        self.mode = mode
        self.resize = None if resize is None else pair_setting(resize, "inference.resize")
        self.crop_size = pair_setting(crop_size, "inference.crop_size")
        self.stride = pair_setting(stride, "inference.stride")
        self.window_batch = window_batch
        self.ratios = tuple(float(r) for r in ratios)
        self.flip = flip

    def for_model(self, model: nn.Module) -> Inference:
        """This protocol, or the model's own where it has one: a segmentor with `test_protocol`
        (HRDA: full resolution, sliding windows of the training crop, docs/hrda.md §2.4) fixes
        mode, resize, window and stride; `window_batch` and test-time augmentation stay."""
        protocol = getattr(model, "test_protocol", None)
        if not protocol:
            return self
        return Inference(
            window_batch=self.window_batch, ratios=self.ratios, flip=self.flip, **protocol
        )

    @property
    def augmented(self) -> bool:
        """Whether several views (scales, flips) are averaged."""
        return len(self.ratios) > 1 or self.flip

    def __repr__(self) -> str:
        text = f"Inference(mode={self.mode!r}, resize={self.resize}"
        if self.mode == "slide":
            text += f", crop_size={self.crop_size}, stride={self.stride}"
            text += f", window_batch={self.window_batch}"
        if self.augmented:
            text += f", ratios={list(self.ratios)}, flip={self.flip}"
        return text + ")"

    def resizes(self, image_hw: Sequence[int]) -> list[tuple[int, int] | None]:
        """The (long, short) keep-ratio scale of each test view of an (H, W) image, in `ratios`
        order; None = the image as it is. With `resize`, ratio r gives (int(W_s·r), int(H_s·r))
        of the test scale (mmseg's MultiScaleFlipAug), without one of the image itself."""
        h, w = int(image_hw[0]), int(image_hw[1])
        if self.resize is None:
            return [None if r == 1.0 else (int(w * r), int(h * r)) for r in self.ratios]
        return [(int(self.resize[0] * r), int(self.resize[1] * r)) for r in self.ratios]

    def logits(
        self, model: nn.Module, img: Tensor, out_size: Sequence[int] | None = None
    ) -> Tensor:
        """Logits (B, K, *out_size) of a normalised test image (B, 3, h, w) at one test scale.

        `model(x)` must return logits at the size of `x` (the segmentor's forward). The logits are
        first at the input size and only then resized to `out_size` (the original image size).
        Gradient mode is the caller's choice (wrap in `torch.inference_mode()` for evaluation).
        """
        logits = model(img) if self.mode == "whole" else self._slide(model, img)
        return logits if out_size is None else resize(logits, out_size)

    def probs(self, model: nn.Module, imgs: Sequence[Tensor], out_size: Sequence[int]) -> Tensor:
        """Mean softmax probabilities (B, K, *out_size) over the test views.

        `imgs` holds the image at each scale of `resizes`; with `flip` every scale also runs
        flipped and its probabilities are flipped back. Views are summed scale by scale, the
        flipped one after the plain one, then divided by their number (mmseg's `aug_test`).
        """
        if len(imgs) != len(self.ratios):
            raise ValueError(f"got {len(imgs)} images for {len(self.ratios)} test scales")
        total: Tensor | None = None
        for img in imgs:
            for flipped in (False, True) if self.flip else (False,):
                x = img.flip(-1) if flipped else img
                p = torch.softmax(self.logits(model, x, out_size), dim=1)
                p = p.flip(-1) if flipped else p
                total = p if total is None else total + p
        assert total is not None
        return total / (len(imgs) * (2 if self.flip else 1))

    def predict(
        self,
        model: nn.Module,
        imgs: Sequence[Tensor],
        out_size: Sequence[int],
        confidence: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """(B, H, W) predicted train ids and, if asked, their softmax probability (B, H, W).

        One view: argmax of its logits. Several (test-time augmentation): argmax of the mean
        probabilities of `probs`.
        """
        if self.augmented:
            conf, ids = self.probs(model, imgs, out_size).max(dim=1)
            return ids, conf if confidence else None
        logits = self.logits(model, imgs[0], out_size)
        conf = torch.softmax(logits, dim=1).amax(dim=1) if confidence else None
        return logits.argmax(dim=1), conf

    def _slide(self, model: nn.Module, img: Tensor) -> Tensor:
        """Average the logits of overlapping windows, `window_batch` windows per call."""
        return slide_windows(model, img, self.crop_size, self.stride, self.window_batch)


def slide_windows(
    fn: Callable[[Tensor], Tensor],
    img: Tensor,
    crop: Sequence[int],
    stride: Sequence[int],
    window_batch: int | None = None,
    out_stride: int = 1,
) -> Tensor:
    """`fn`'s logits of overlapping `crop` windows of `img`, averaged where they overlap.

    The last window in each direction is moved back so that it ends at the image border (every
    pixel is covered at least once). Windows of every image are batched window-major,
    `window_batch` windows per call of `fn` (None: all in one call, as HRDA's detail windows);
    `fn` returns logits at 1/`out_stride` of its input's size (HRDA's head: 4).
    """
    b, _, h, w = img.shape
    s = out_stride
    boxes = [
        (y0, y1, x0, x1)
        for y0, y1 in window_spans(h, crop[0], stride[0])
        for x0, x1 in window_spans(w, crop[1], stride[1])
    ]
    step = len(boxes) if window_batch is None else window_batch
    logits: Tensor | None = None
    count = img.new_zeros((1, 1, h // s, w // s))
    for i in range(0, len(boxes), step):
        chunk = boxes[i : i + step]
        out = fn(torch.cat([img[:, :, y0:y1, x0:x1] for y0, y1, x0, x1 in chunk]))
        if logits is None:
            logits = img.new_zeros((b, out.shape[1], h // s, w // s))
        for k, (y0, y1, x0, x1) in enumerate(chunk):
            logits[:, :, y0 // s : y1 // s, x0 // s : x1 // s] += out[k * b : (k + 1) * b]
            count[:, :, y0 // s : y1 // s, x0 // s : x1 // s] += 1
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
