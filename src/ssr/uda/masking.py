"""MIC's masked image consistency: random block masks and the masked loss weight; docs/method.md §5.

The part has no parameters (MIC(DAFormer) reuses the DACS teacher and pseudo-labels), so it is a
plain callable rather than an `nn.Module`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ssr.errors import ConfigError
from ssr.uda.mixing import DACSMixing
from ssr.uda.transfer import to_device

MODES = ("separatetrgaug", "separate")


class MaskedConsistency:
    """Zero out random square blocks of normalised images (zero = the ImageNet mean colour); the
    student's loss on them, against the un-masked target's pseudo-labels, is weighted by
    `loss_weight` (config node `uda.masking`).

    Args:
        block_size: block side in pixels (32 for 512-pixel crops; MIC(HRDA) uses 64 at 1024).
        ratio: probability that a block is masked (0.7: about 30 % of the image stays visible).
        loss_weight: λ of the masked loss (MIC's `mask_lambda`, 1).
        mode: MIC's `mask_mode`. ``separatetrgaug`` (GTA5 / SYNTHIA): the target crops, colour
            augmented as one batch, then masked. ``separate`` (MIC's choice for ACDC and Dark
            Zurich): source image 0 with its label (weight 1) and target image 0 with its
            pseudo-label, masked without colour augmentation.
    """

    def __init__(
        self,
        block_size: int = 32,
        ratio: float = 0.7,
        loss_weight: float = 1.0,
        mode: str = "separatetrgaug",
    ) -> None:
        if block_size <= 0:
            raise ConfigError(f"MIC block_size={block_size} must be a positive number of pixels")
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"MIC mask ratio={ratio} must be in [0, 1]")
        if mode not in MODES:
            raise ConfigError(f"MIC mask mode={mode!r}: choose one of {', '.join(MODES)}")
        self.mode = mode
        self.block_size = block_size
        self.ratio = ratio
        self.loss_weight = loss_weight

    def mask(
        self,
        shape: tuple[int, ...] | torch.Size,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Binary keep-mask (B, 1, H, W) float for images of `shape` (B, C, H, W).

        One U(0, 1) draw per cell of a round(H/b) × round(W/b) grid (Python rounding, as the
        reference); a cell is kept if its draw exceeds `ratio`; nearest upsampling to H × W.
        """
        b, _, h, w = shape
        cells = (b, 1, max(round(h / self.block_size), 1), max(round(w / self.block_size), 1))
        gen_device = generator.device if generator is not None else device
        u = torch.rand(cells, generator=generator, device=gen_device)
        keep = (u > self.ratio).float()
        if device is not None:
            keep = to_device(keep, device)
        return F.interpolate(keep, size=(h, w), mode="nearest")

    def __call__(self, img: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Masked copy of normalised images (B, C, H, W)."""
        return img * self.mask(img.shape, img.device, generator).to(img.dtype)

    def inputs(
        self, xs: Tensor, ys: Tensor, xt: Tensor, pl_lbl: Tensor, pl_w: Tensor, mixing: DACSMixing
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The masked batch of this `mode`, its labels and its pixel weights (§5.2)."""
        if self.mode == "separatetrgaug":
            return self(mixing.augment(xt, per_image=False), mixing.generator), pl_lbl, pl_w
        image = torch.cat([xs[:1], xt[:1]])
        label = torch.cat([ys[:1], pl_lbl[:1]])
        weight = torch.cat([torch.ones_like(pl_w[:1]), pl_w[:1]])
        return self(image, mixing.generator), label, weight

    def __repr__(self) -> str:
        return (
            f"MaskedConsistency(block_size={self.block_size}, ratio={self.ratio}, "
            f"loss_weight={self.loss_weight}, mode={self.mode})"
        )
