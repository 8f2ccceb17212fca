"""ClassMix and the strong augmentation of DACS (colour jitter, blur); docs/method.md §4.6-§4.7.

Pure functions on batched tensors on the input's device, with the randomness passed in (a NumPy
`Generator` for the ClassMix class choice, a `torch.Generator` for jitter factors and orders).
The colour jitter reproduces kornia 0.5.8's semantics explicitly (the version the reference pins; no
kornia dependency): additive brightness, multiplicative contrast, HSV saturation scaling and hue
rotation, applied in a random order. Newer kornia and torchvision jitters differ.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ssr.data.labels import MEAN, STD
from ssr.uda.transfer import to_device

TWO_PI = 2.0 * math.pi


# ----------------------------------------------------------------------------------- ClassMix
def sample_mix_classes(src_lbl: Tensor, rng: np.random.Generator) -> list[Tensor]:
    """The classes pasted into each image: ⌈n/2⌉ of the n distinct values of the *whole batch*.

    A fresh choice per image (without replacement) from the batch's union, 255 included: a chosen
    class may be absent from image i and "ignore" may be pasted, as in the reference (§4.6).
    Returns B 1-D int64 tensors on `src_lbl`'s device.
    """
    if src_lbl.dim() != 3:
        raise ValueError(f"src_lbl must be (B, H, W) train ids, got shape {tuple(src_lbl.shape)}")
    classes = torch.unique(src_lbl)
    n = classes.numel()
    k = (n + n % 2) // 2
    chosen = []
    for _ in range(src_lbl.shape[0]):
        idx = rng.choice(n, size=k, replace=False)
        chosen.append(classes[to_device(torch.as_tensor(idx, dtype=torch.long), classes.device)])
    return chosen


def class_mix_masks(src_lbl: Tensor, rng: np.random.Generator) -> Tensor:
    """ClassMix masks (B, 1, H, W) float: 1 where image i's source label is a chosen class."""
    chosen = sample_mix_classes(src_lbl, rng)
    masks = [torch.isin(lbl, cls) for lbl, cls in zip(src_lbl, chosen, strict=True)]
    return torch.stack(masks)[:, None].float()


def mix(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """mask·a + (1 − mask)·b for images (B, C, H, W), labels or weights (B, H, W).

    A (B, 1, H, W) mask is squeezed for (B, H, W) operands. Integer operands (labels) are selected
    with `torch.where` so that they keep their dtype; the mask must then be binary.
    """
    if mask.dim() == a.dim() + 1 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if a.is_floating_point():
        mask = mask.to(a.dtype)
        return mask * a + (1 - mask) * b
    return torch.where(mask.bool(), a, b)


# ------------------------------------------------------------------------------- RGB <-> HSV
def rgb_to_hsv(img: Tensor) -> Tensor:
    """RGB in [0, 1] (..., 3, H, W) -> HSV, H in radians [0, 2π), S and V in [0, 1] (kornia 0.5)."""
    maxc, argmax = img.max(dim=-3)
    minc = img.min(dim=-3).values
    delta = maxc - minc
    safe_delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = img.unbind(dim=-3)
    # Hue in sixths of a turn, from whichever channel is the maximum.
    sixths = torch.stack([(g - b) / safe_delta, (b - r) / safe_delta + 2, (r - g) / safe_delta + 4])
    h = sixths.gather(0, argmax[None]).squeeze(0)
    h = torch.where(delta > 0, torch.remainder(h, 6.0) * (TWO_PI / 6.0), torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), 0.0)
    return torch.stack([h, s, maxc], dim=-3)


def hsv_to_rgb(hsv: Tensor) -> Tensor:
    """Inverse of `rgb_to_hsv` (any real hue, taken modulo 2π)."""
    h, s, v = hsv.unbind(dim=-3)
    h6 = torch.remainder(h, TWO_PI) * (6.0 / TWO_PI)

    def channel(n: float) -> Tensor:
        # Branch-free sector formula: value minus the chroma share of channel n.
        k = torch.remainder(n + h6, 6.0)
        return v - v * s * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)

    return torch.stack([channel(5.0), channel(3.0), channel(1.0)], dim=-3)


# ------------------------------------------------------------------ kornia-0.5.8 colour jitter
def _per_image(factor: Tensor) -> Tensor:
    return factor.reshape(-1, 1, 1, 1)


def adjust_brightness(img01: Tensor, factor: Tensor) -> Tensor:
    """Additive brightness: clamp(x + (b − 1), 0, 1) with one factor b per image (B,)."""
    return torch.clamp(img01 + (_per_image(factor) - 1.0), 0.0, 1.0)


def adjust_contrast(img01: Tensor, factor: Tensor) -> Tensor:
    """Multiplicative contrast without mean blending: clamp(x·c, 0, 1)."""
    return torch.clamp(img01 * _per_image(factor), 0.0, 1.0)


def adjust_saturation(img01: Tensor, factor: Tensor) -> Tensor:
    """HSV saturation scaling: S ← clamp(S·s, 0, 1)."""
    h, s, v = rgb_to_hsv(img01).unbind(dim=-3)
    s = torch.clamp(s * factor.reshape(-1, 1, 1), 0.0, 1.0)
    return hsv_to_rgb(torch.stack([h, s, v], dim=-3))


def adjust_hue(img01: Tensor, factor: Tensor) -> Tensor:
    """Hue rotation by `factor` turns (B,): H ← (H + 2π·h) mod 2π."""
    h, s, v = rgb_to_hsv(img01).unbind(dim=-3)
    h = torch.remainder(h + TWO_PI * factor.reshape(-1, 1, 1), TWO_PI)
    return hsv_to_rgb(torch.stack([h, s, v], dim=-3))


# Index = kornia 0.5.8's operation index in the sampled order.
JITTER_OPS: tuple[Callable[[Tensor, Tensor], Tensor], ...] = (
    adjust_brightness,
    adjust_contrast,
    adjust_saturation,
    adjust_hue,
)


class JitterParams(NamedTuple):
    """Per-image jitter factors (B,) and the operation order (B, 4) of indices into JITTER_OPS."""

    brightness: Tensor
    contrast: Tensor
    saturation: Tensor
    hue: Tensor
    order: Tensor


def sample_jitter_params(
    batch: int,
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.2,
    hue: float = 0.2,
    generator: torch.Generator | None = None,
    per_image_order: bool = True,
) -> JitterParams:
    """Factors b, c, s ~ U(1 − x, 1 + x), h ~ U(−hue, hue) per image; a random order of the 4 ops.

    `per_image_order=True` draws one permutation per image (DACS calls the jitter once per mixed
    image); False draws one for the batch (MIC's single call on the target batch). Sampled on the
    generator's device (CPU by default); `apply_jitter` moves them to the image.
    """
    for name, x, hi in (
        ("brightness", brightness, 1.0),
        ("contrast", contrast, 1.0),
        ("saturation", saturation, 1.0),
        ("hue", hue, 0.5),
    ):
        if not 0.0 <= x <= hi:
            raise ValueError(f"colour jitter {name}={x} must be in [0, {hi}]")
    device = generator.device if generator is not None else torch.device("cpu")

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(batch, generator=generator, device=device)

    b = uniform(1.0 - brightness, 1.0 + brightness)
    c = uniform(1.0 - contrast, 1.0 + contrast)
    s = uniform(1.0 - saturation, 1.0 + saturation)
    h = uniform(-hue, hue)
    rows = batch if per_image_order else 1
    order = torch.rand(rows, 4, generator=generator, device=device).argsort(dim=1)
    return JitterParams(b, c, s, h, order.expand(batch, 4).cpu())


def apply_jitter(img01: Tensor, params: JitterParams) -> Tensor:
    """Apply the four kornia-0.5 operations to RGB [0, 1] images (B, 3, H, W) in `params.order`."""
    dev = img01.device
    factors = [to_device(f, dev, torch.float32) for f in params[:4]]
    out = img01.float()
    for k in range(4):
        ops_k = params.order[:, k].tolist()
        if len(set(ops_k)) == 1:
            out = JITTER_OPS[ops_k[0]](out, factors[ops_k[0]])
            continue
        new = torch.empty_like(out)
        for op in set(ops_k):
            idx = to_device(torch.tensor([i for i, o in enumerate(ops_k) if o == op]), dev)
            new[idx] = JITTER_OPS[op](out[idx], factors[op][idx])
        out = new
    return out.to(img01.dtype)


def color_jitter_k05(
    img01: Tensor,
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.2,
    hue: float = 0.2,
    generator: torch.Generator | None = None,
    per_image_order: bool = True,
) -> Tensor:
    """kornia 0.5.8 `ColorJitter(brightness, contrast, saturation, hue)` with p = 1 (§4.7).

    Args:
        img01: RGB images in [0, 1], (B, 3, H, W).
        per_image_order: one random operation order per image (DACS) or one per batch (MIC).
    """
    if img01.dim() != 4 or img01.shape[1] != 3:
        raise ValueError(f"colour jitter expects RGB images (B, 3, H, W), got {tuple(img01.shape)}")
    params = sample_jitter_params(
        img01.shape[0], brightness, contrast, saturation, hue, generator, per_image_order
    )
    return apply_jitter(img01, params)


# ------------------------------------------------------------------------------- Gaussian blur
def blur_kernel_size(length: int) -> int:
    """DACS kernel size along an axis of `length` pixels: ~10 %, odd (51 for 512, 103 for 1024)."""
    c = math.ceil(0.1 * length)
    return math.floor(c - 0.5 + c % 2)


def gaussian_kernel1d(size: int, sigma: Tensor) -> Tensor:
    """Normalised 1-D Gaussian kernels (B, size) for per-image σ (B,)."""
    x = torch.arange(size, dtype=torch.float32, device=sigma.device) - size // 2
    w = torch.exp(-(x**2)[None] / (2.0 * sigma.float()[:, None] ** 2))
    return w / w.sum(dim=1, keepdim=True)


def gaussian_blur(
    img: Tensor,
    sigma: float | Tensor,
    kernel_size: tuple[int, int] | None = None,
) -> Tensor:
    """Gaussian blur with reflect borders as one separable grouped convolution over the batch.

    Args:
        img: (B, C, H, W), any value range (DACS blurs in normalised space).
        sigma: one σ for the batch or one per image (B,); the same σ on both axes.
        kernel_size: (ky, kx), odd; default `blur_kernel_size` of the height and width (§4.7).
    """
    b, c, h, w = img.shape
    ky, kx = kernel_size or (blur_kernel_size(h), blur_kernel_size(w))
    if ky % 2 == 0 or kx % 2 == 0 or ky // 2 >= h or kx // 2 >= w:
        raise ValueError(
            f"blur kernel {(ky, kx)} must be odd with half-size below the image size {(h, w)}"
        )
    sig = torch.as_tensor(sigma, dtype=torch.float32, device=img.device).reshape(-1)
    if sig.numel() not in (1, b):
        raise ValueError(f"blur sigma has {sig.numel()} values for a batch of {b}; pass 1 or {b}")
    sig = sig.expand(b)
    # One depthwise filter per (image, channel): images with different σ in one conv call.
    wy = gaussian_kernel1d(ky, sig).repeat_interleave(c, dim=0).reshape(b * c, 1, ky, 1)
    wx = gaussian_kernel1d(kx, sig).repeat_interleave(c, dim=0).reshape(b * c, 1, 1, kx)
    with torch.autocast(device_type=img.device.type, enabled=False):
        x = img.float().reshape(1, b * c, h, w)
        x = F.pad(x, (kx // 2, kx // 2, ky // 2, ky // 2), mode="reflect")
        x = F.conv2d(F.conv2d(x, wy, groups=b * c), wx, groups=b * c)
    return x.reshape(b, c, h, w).to(img.dtype)


# ---------------------------------------------------------------------- strong augmentation
def strong_augment(
    img_norm: Tensor,
    u_jitter: float,
    u_blur: float,
    mean: Sequence[float] | Tensor = MEAN,
    std: Sequence[float] | Tensor = STD,
    strength: float = 0.2,
    jitter_p: float = 0.2,
    blur_p: float = 0.5,
    sigma_range: tuple[float, float] = (0.15, 1.15),
    generator: torch.Generator | None = None,
    np_rng: np.random.Generator | None = None,
    per_image_order: bool = True,
) -> Tensor:
    """DACS's strong augmentation of normalised images (B, 3, H, W) (§4.7).

    Colour jitter (kornia 0.5.8, all four strengths = `strength`) if `u_jitter > jitter_p`, applied
    to the de-normalised [0, 1] image; then Gaussian blur in normalised space if `u_blur > blur_p`
    with σ ~ U(sigma_range). The gates u are drawn by the caller once per batch (shared by its
    images). `per_image_order=True` = DACS's per-image calls (own jitter order and σ per image);
    False = MIC's single batch call (one order and one σ). σ comes from `np_rng` when given (as the
    reference's NumPy draw), else from `generator`. `mean` / `std` are on the 0-255 scale.
    """
    out = img_norm
    if u_jitter > jitter_p:
        dev, dtype = img_norm.device, img_norm.dtype
        m = to_device(torch.as_tensor(mean, dtype=dtype), dev).reshape(1, 3, 1, 1)
        s = to_device(torch.as_tensor(std, dtype=dtype), dev).reshape(1, 3, 1, 1)
        img01 = (out * s + m) / 255.0
        img01 = color_jitter_k05(
            img01, strength, strength, strength, strength, generator, per_image_order
        )
        out = (img01 * 255.0 - m) / s
    if u_blur > blur_p:
        n = out.shape[0] if per_image_order else 1
        lo, hi = sigma_range
        if np_rng is not None:
            sigma = torch.as_tensor(np_rng.uniform(lo, hi, size=n), dtype=torch.float32)
        else:
            dev = generator.device if generator is not None else torch.device("cpu")
            sigma = lo + (hi - lo) * torch.rand(n, generator=generator, device=dev)
        out = gaussian_blur(out, to_device(sigma, out.device))
    return out
