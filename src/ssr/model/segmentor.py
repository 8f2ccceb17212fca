"""Encoder-decoder segmentor and its whole-image / sliding-window inference; ALGORITHM.md §3.

This is the only network that ships: training-only machinery (teacher, SAM regulariser, feature
distance) lives on the UDA module, so `Segmentor.state_dict()` holds only `backbone.*` and
`decode_head.*`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize with align_corners=False (mmseg's convention everywhere in §2-§3)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class Segmentor(nn.Module):
    """Backbone + decode head. Input images are mmseg-normalised (B, 3, H, W) tensors."""

    def __init__(self, backbone: nn.Module, decode_head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.num_classes: int = decode_head.num_classes

    def features(self, x: Tensor) -> list[Tensor]:
        """The backbone's stage maps (strides 4, 8, 16, 32), also used by FD and SSR."""
        return self.backbone(x)

    def decode(self, feats: list[Tensor]) -> Tensor:
        """Stage maps -> logits (B, K, H/4, W/4)."""
        return self.decode_head(feats)

    def forward(self, x: Tensor) -> Tensor:
        """Logits resized to the input size (mmseg's `encode_decode`): (B, K, H, W)."""
        return resize(self.decode(self.features(x)), x.shape[-2:])

    def inference(
        self,
        img: Tensor,
        mode: str = "whole",
        crop_size: tuple[int, int] = (512, 512),
        stride: tuple[int, int] = (341, 341),
        out_size: tuple[int, int] | None = None,
    ) -> Tensor:
        """Test-time logits (B, K, *out_size) (§3.2); softmax/argmax is left to the caller.

        The logits are first resized to the input size and only then to `out_size` (the original
        image size): the paper's protocol upsamples in two steps, not directly from stride 4.
        `crop_size` and `stride` are (height, width) and only used by `mode="slide"`.
        Gradient mode is the caller's choice (wrap in `torch.inference_mode()` for evaluation).
        """
        if mode == "whole":
            logits = self(img)
        elif mode == "slide":
            logits = self._slide(img, crop_size, stride)
        else:
            raise ValueError(f"unknown inference mode {mode!r}; use 'whole' or 'slide'")
        return logits if out_size is None else resize(logits, tuple(out_size))

    def _slide(self, img: Tensor, crop_size: tuple[int, int], stride: tuple[int, int]) -> Tensor:
        """Average the logits of overlapping windows; the last window in each direction is moved
        back so that it ends at the image border (every pixel is covered at least once)."""
        if min(*crop_size, *stride) <= 0:
            raise ValueError(f"crop_size {crop_size} and stride {stride} must be positive")
        b, _, h, w = img.shape
        logits = img.new_zeros((b, self.num_classes, h, w))
        count = img.new_zeros((1, 1, h, w))
        for y0, y1 in _window_starts(h, crop_size[0], stride[0]):
            for x0, x1 in _window_starts(w, crop_size[1], stride[1]):
                logits[:, :, y0:y1, x0:x1] += self(img[:, :, y0:y1, x0:x1])
                count[:, :, y0:y1, x0:x1] += 1
        return logits / count


def _window_starts(length: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """(start, end) of each window along one axis; a crop larger than the image is clipped."""
    n = max(length - crop + stride - 1, 0) // stride + 1
    spans = []
    for i in range(n):
        end = min(i * stride + crop, length)
        spans.append((max(end - crop, 0), end))
    return spans
