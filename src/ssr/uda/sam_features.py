"""Where a training step's SAM features come from: SAM online, or an opt-in precomputed cache.

Online (the reference, docs/method.md §6.3): the source crop and the mixed crop (after ClassMix and
the strong augmentation) go through SAM in one batch.

Cached (opt-in deviation): `python -m ssr.uda.sam_cache` encodes every source and target-train
image once, at the training resize, in crop-sized tiles stretched to SAM's input exactly as an
online crop is (one token = `token_px` pixels of the resized image). A step then cuts each crop's
features out of those maps at the crop's box (`CropRecord`, flipped with the crop) and builds the
mixed image's features as the ClassMix blend of the source and target features. SAM then does not
see the mixed image's colour jitter and blur, and each crop's features come from fixed tiles
instead of the crop alone (docs/method.md §10, row 5).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ssr.data.stream import CropRecord
from ssr.io import CheckpointError
from ssr.uda.mixing import MixedBatch
from ssr.uda.sam_encoder import SamEncoder


class SamCacheError(CheckpointError):
    """A SAM feature cache is missing, incomplete, or does not fit the encoder or the data."""


class OnlineSamFeatures:
    """S_src, S_mix from SAM itself: source and mixed crops in one batch (the reference)."""

    def __init__(self, encoder: SamEncoder) -> None:
        self.encoder = encoder

    def __call__(
        self, src: Tensor, mixed: MixedBatch, src_crop: CropRecord, tgt_crop: CropRecord
    ) -> tuple[Tensor, Tensor]:
        return self.encoder.encode_pair(src, mixed.image)


CACHE_FORMAT, CACHE_VERSION = "ssr-sam-cache", 1
CACHE_MANIFEST = "manifest.json"
CACHE_DOMAINS = ("source", "target")


def cache_token_px(crop_size: Sequence[int], grid: int) -> tuple[int, int]:
    """Pixels of the (resized) image per SAM token: the crop is stretched to SAM's grid x grid."""
    ch, cw = (int(c) for c in crop_size)
    if ch % grid or cw % grid:
        raise SamCacheError(
            f"crop {ch}x{cw} is not a multiple of SAM's {grid}x{grid} token grid, so cached "
            "features cannot be cut at token boundaries; use a crop size divisible by it"
        )
    return ch // grid, cw // grid


def cache_map_size(
    image_size: Sequence[int], crop_size: Sequence[int], token_px: Sequence[int]
) -> tuple[int, int]:
    """(Hf, Wf) tokens of a full-image map: the image padded to >= one crop, to whole tokens."""
    return tuple(  # type: ignore[return-value]
        max(c, math.ceil(n / p) * p) // p
        for n, c, p in zip(image_size, crop_size, token_px, strict=True)
    )


def cache_file(root: str | Path, domain: str, relative: str) -> Path:
    """Where the features of image `relative` (path inside its dataset root) are stored."""
    return Path(root) / domain / Path(relative).with_suffix(".npy")


def crop_features(
    full: np.ndarray | Tensor,
    top: int,
    left: int,
    flip: bool,
    grid: Sequence[int],
    token_px: Sequence[int],
) -> Tensor:
    """The (C, gh, gw) features of the crop at (top, left) of the resized image, from its map.

    Crop token (i, j) is full-map token (top/ph + i, left/pw + j): an exact slice when the offset
    is a multiple of the token size, bilinear between the neighbouring tokens otherwise (edges
    replicated). The crop's horizontal flip flips the token grid (token j <-> gw - 1 - j).
    """
    (gh, gw), (ph, pw) = grid, token_px
    hf, wf = full.shape[-2:]
    fy, fx = top / ph, left / pw
    y0, x0 = int(fy), int(fx)
    dy, dx = fy - y0, fx - x0
    rows = np.clip(np.arange(y0, y0 + gh + 1), 0, hf - 1)
    cols = np.clip(np.arange(x0, x0 + gw + 1), 0, wf - 1)
    if isinstance(full, Tensor):
        win = full[:, torch.from_numpy(rows)][:, :, torch.from_numpy(cols)].float()
    else:  # a memory-mapped .npy: reads only the rows it needs
        win = torch.from_numpy(np.ascontiguousarray(full[:, rows][:, :, cols])).float()
    out = win[:, :gh, :gw]
    if dy or dx:
        out = (
            (1 - dy) * (1 - dx) * out
            + (1 - dy) * dx * win[:, :gh, 1:]
            + dy * (1 - dx) * win[:, 1:, :gw]
            + dy * dx * win[:, 1:, 1:]
        )
    return out.flip(-1) if flip else out.contiguous()


class CachedSamFeatures:
    """SAM features of a step cut from a cache written by `python -m ssr.uda.sam_cache`.

    Checked once at construction: format, completeness, and that it was computed by this very
    encoder (fingerprint) with this feature size and grid. Checked per crop: the crop size and
    the full-image map size implied by the resized image (a changed `data.*_resize` fails here).
    """

    def __init__(self, root: str | Path, encoder: SamEncoder) -> None:
        self.root = Path(root)
        fingerprint, dim, grid = encoder.fingerprint(), encoder.dim, encoder.grid
        path = self.root / CACHE_MANIFEST
        rebuild = (
            "build it with `python -m ssr.uda.sam_cache experiment=<name> "
            f"uda.sam.cache_dir={root}`"
        )
        if not path.is_file():
            raise SamCacheError(f"SAM feature cache {self.root} has no {CACHE_MANIFEST}: {rebuild}")
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SamCacheError(f"{path} is not a readable manifest ({e}): {rebuild}") from e
        if manifest.get("format") != CACHE_FORMAT or manifest.get("version") != CACHE_VERSION:
            raise SamCacheError(
                f"{path} is not a version-{CACHE_VERSION} {CACHE_FORMAT} manifest: {rebuild}"
            )
        if not manifest.get("complete"):
            raise SamCacheError(
                f"SAM feature cache {self.root} is incomplete: {rebuild} (it resumes)"
            )
        if manifest["fingerprint"] != fingerprint:
            raise SamCacheError(
                f"SAM feature cache {self.root} was computed by another SAM encoder "
                f"({manifest['variant']}, {manifest['checkpoint']}): rebuild it for this one"
            )
        if manifest["dim"] != dim or manifest["grid"] != grid:
            raise SamCacheError(
                f"SAM feature cache {self.root} holds {manifest['dim']}-d features on a "
                f"{manifest['grid']}-token grid, the encoder gives {dim}-d on {grid}: rebuild it"
            )
        self.manifest = manifest
        self.grid = (grid, grid)
        self.crop_size = tuple(manifest["crop_size"])
        self.token_px = tuple(manifest["token_px"])

    def crops(
        self, domain: str, files: Sequence[str], crops: Tensor, crop_size: Sequence[int]
    ) -> Tensor:
        """(B, C, g, g) float32 features of B crops.

        Args:
            domain: "source" or "target".
            files: image paths relative to the dataset root (the crops' `CropRecord.file`).
            crops: (B, 5) int: resized height, resized width, crop top, crop left, flip.
            crop_size: (h, w) of the crops the student sees.
        """
        if tuple(crop_size) != self.crop_size:
            raise SamCacheError(
                f"SAM feature cache {self.root} was built for {self.crop_size} crops, training "
                f"uses {tuple(crop_size)}: rebuild it with the training config"
            )
        out = []
        for name, (h, w, top, left, flip) in zip(files, crops.tolist(), strict=True):
            path = cache_file(self.root, domain, name)
            if not path.is_file():
                raise SamCacheError(
                    f"no cached SAM features {path} for {domain} image {name}: resume the cache "
                    "with `python -m ssr.uda.sam_cache` (same experiment and data roots)"
                )
            full = np.load(path, mmap_mode="r")
            expected = cache_map_size((h, w), self.crop_size, self.token_px)
            if tuple(full.shape[-2:]) != expected:
                raise SamCacheError(
                    f"{path} holds a {full.shape[-2]}x{full.shape[-1]} token map, a {h}x{w} "
                    f"resized image needs {expected[0]}x{expected[1]}: the cache was built with "
                    "another data.*_resize; rebuild it"
                )
            out.append(crop_features(full, top, left, bool(flip), self.grid, self.token_px))
        return torch.stack(out)

    def __call__(
        self, src: Tensor, mixed: MixedBatch, src_crop: CropRecord, tgt_crop: CropRecord
    ) -> tuple[Tensor, Tensor]:
        """S_src and S_mix = mask * S_src + (1 - mask) * S_tgt, the ClassMix mask averaged over
        each token's pixels; the strong augmentation of the mixed image is not reflected."""
        crop = (src.shape[-2], src.shape[-1])
        s_src = self.crops("source", src_crop.file, src_crop.box, crop).to(src)
        s_tgt = self.crops("target", tgt_crop.file, tgt_crop.box, crop).to(src)
        mask = F.adaptive_avg_pool2d(mixed.mask.to(s_src.dtype), s_src.shape[-2:])  # source share
        return s_src, mask * s_src + (1 - mask) * s_tgt
