"""SSR's SAM regulariser: a frozen SAM image encoder and per-stage cross-attention fusion.

SSR (Ge et al., arXiv 2401.14686) as specified in ALGORITHM.md §6: encoder §6.2, what SAM sees §6.3,
projection / cross-attention / residual fusion §6.4-6.6, parameters §6.9, decisions on the
reference's quirks §6.10. The SAM encoder comes from `segment_anything` (its registry for
vit_b/l/h, `ImageEncoderViT` directly for the CPU-sized "tiny" variant). Nothing here runs at
inference: `ssr.model` never imports this file.

Decisions (§6.10): SAM is frozen explicitly (no grad, eval mode, not in the optimiser, never saved,
rebuilt from its file); the data normalisation is checked against SAM's own, not assumed; the
attention is `scaled_dot_product_attention` by default (identical math, no 16384x4096 matrix kept),
with the reference's explicit softmax(QK^T * scale)V behind `attention="explicit"`.

Opt-in deviation (issue 4), `cache_dir`: SAM features precomputed once per full resized image by
`python -m ssr.sam_cache` (tiles at the online scale, one token = `token_px` pixels of the resized
image), cut and flipped at feature resolution like the pixel crop (`SamFeatureCache`), and the
mixed image's features built as the ClassMix blend of the cached source and target features.
The strong augmentation (colour jitter, blur) of the mixed image is then not seen by SAM, and
each crop's features come from fixed tiles instead of the crop alone (README, "SAM feature cache").
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, Sam
from torch import Tensor, nn

from ssr.data.labels import MEAN, STD

log = logging.getLogger(__name__)

ENCODER_PREFIX = "image_encoder."  # key prefix of the encoder inside an official SAM file
OFFICIAL_PREFIXES = ("embedding_layer.", "fusion_layer.")  # SSR's trained layers (§9.3)
ATTENTION_MODES = ("sdpa", "explicit")


class SamCheckpointError(RuntimeError):
    """A SAM or SSR weight file is missing, unreadable, or does not fit the requested variant."""


class SamCacheError(SamCheckpointError):
    """A SAM feature cache is missing, incomplete, or does not fit the encoder or the data.

    A SamCheckpointError subclass: the CLIs already report those as one-line user errors.
    """


@dataclass(frozen=True)
class SamVariant:
    """One released SAM checkpoint. embed_dim/depth only serve to name a mismatching file."""

    filename: str
    sha256: str
    size: int  # bytes
    embed_dim: int
    depth: int


# File names: segment-anything README (download links under SAM_URL); the suffix of each name is
# not a sha256 prefix. Meta publishes no checksums. The sha256/size values are the ones pinned by
# micro-sam's download registry (computational-cell-analytics/micro-sam, micro_sam/util.py; pooch
# verifies them on every download) and equal the Git-LFS object ids of several Hugging Face mirrors.
SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
SAM_VARIANTS: dict[str, SamVariant] = {
    "vit_b": SamVariant(
        "sam_vit_b_01ec64.pth",
        "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        375_042_383,
        768,
        12,
    ),
    "vit_l": SamVariant(
        "sam_vit_l_0b3195.pth",
        "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        1_249_524_607,
        1024,
        24,
    ),
    "vit_h": SamVariant(
        "sam_vit_h_4b8939.pth",
        "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        2_564_550_879,
        1280,
        32,
    ),
}

# SAM's topology at CPU size (random weights): tests and the demo. 128 px / patch 16 = 8x8 tokens,
# 2x2 windows of 4, the last block global, like SAM's window/global mix.
TINY_ENCODER: dict[str, Any] = dict(
    img_size=128,
    patch_size=16,
    embed_dim=32,
    depth=2,
    num_heads=2,
    window_size=4,
    global_attn_indexes=(1,),
    out_chans=32,
)


def _sam_default_stats() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """`Sam`'s own pixel_mean / pixel_std defaults (what the tiny encoder pretends to expect)."""
    params = inspect.signature(Sam.__init__).parameters
    return tuple(params["pixel_mean"].default), tuple(params["pixel_std"].default)


def _build_tiny(meta: bool, seed: int, overrides: dict[str, Any]) -> ImageEncoderViT:
    kwargs = {**TINY_ENCODER, **overrides}
    kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))  # as SAM's builder
    kwargs.setdefault("qkv_bias", True)
    kwargs.setdefault("use_rel_pos", True)
    if meta:
        with torch.device("meta"):
            return ImageEncoderViT(**kwargs)
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(seed)
        return ImageEncoderViT(**kwargs)


def _build_registry(variant: str, meta: bool) -> tuple[ImageEncoderViT, Tensor, Tensor]:
    """SAM from segment_anything's registry; only the image encoder is kept (§6.2)."""
    if meta:  # the weights come from the file: skip the random init of up to 632M parameters
        with torch.device("meta"):
            sam = sam_model_registry[variant](checkpoint=None)
        if not sam.pixel_mean.is_meta:
            return sam.image_encoder, sam.pixel_mean, sam.pixel_std
    sam = sam_model_registry[variant](checkpoint=None)
    return sam.image_encoder, sam.pixel_mean, sam.pixel_std


def _describe(state: Mapping[str, Tensor]) -> str:
    """'embed dim 1024, 24 blocks = vit_l' for an encoder state dict, to name a wrong file."""
    weight = state.get("patch_embed.proj.weight")
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    if weight is None or not blocks:
        return "not a SAM image encoder"
    dim, depth = weight.shape[0], max(blocks) + 1
    names = [n for n, v in SAM_VARIANTS.items() if (v.embed_dim, v.depth) == (dim, depth)]
    return f"embed dim {dim}, {depth} blocks" + (f" = {names[0]}" if names else "")


def _expected_file(variant: str) -> str:
    v = SAM_VARIANTS.get(variant)
    return (
        f"the {variant} SAM file {v.filename} ({SAM_URL}{v.filename})" if v else f"a {variant} file"
    )


def _load_encoder_state(path: Path, variant: str) -> dict[str, Tensor]:
    """The `image_encoder.*` tensors of a SAM checkpoint, prefix stripped (weights_only load)."""
    if not path.is_file():
        raise SamCheckpointError(
            f"SAM checkpoint {path} not found: put {_expected_file(variant)} there "
            "or set uda.sam.checkpoint"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise SamCheckpointError(
            f"cannot read SAM checkpoint {path} ({type(e).__name__}); "
            f"expected {_expected_file(variant)}"
        ) from e
    if not isinstance(state, Mapping):
        raise SamCheckpointError(f"{path} holds a {type(state).__name__}, not a SAM state dict")
    encoder = {
        k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)
    }
    if not encoder:
        raise SamCheckpointError(
            f"{path} has no '{ENCODER_PREFIX}*' keys, so it is not a SAM checkpoint; "
            f"expected {_expected_file(variant)}"
        )
    return encoder


def _check_encoder_state(
    state: Mapping[str, Tensor], encoder: nn.Module, path: Path, variant: str
) -> None:
    """Strict key and shape check with one readable line instead of load_state_dict's list."""
    expected = encoder.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape)
    if not (missing or unexpected or wrong):
        return
    found, wanted = _describe(state), _describe(expected)
    if found != wanted:
        raise SamCheckpointError(
            f"{path} looks like a different SAM variant ({found}), but variant={variant} expects "
            f"{wanted}: pass {_expected_file(variant)} or choose the matching uda/sam variant"
        )
    raise SamCheckpointError(
        f"{path} does not match the {variant} encoder: {len(missing)} missing keys {missing[:3]}, "
        f"{len(unexpected)} unexpected {unexpected[:3]}, {len(wrong)} shape mismatches {wrong[:3]}"
    )


def build_sam_encoder(
    variant: str, checkpoint: str | Path | None = None, *, seed: int = 0, **tiny_overrides: Any
) -> tuple[ImageEncoderViT, tuple[float, ...], tuple[float, ...]]:
    """Build SAM's image encoder, frozen, with the pixel mean/std SAM normalises with.

    Args:
        variant: "vit_b" | "vit_l" | "vit_h" (segment_anything registry) or "tiny".
        checkpoint: an official SAM file (keys `image_encoder.*` are used, the rest dropped). None
            gives random weights: meant for "tiny"; for vit_* only cost measurements make sense.
        seed: initialisation seed of the random weights (tiny without checkpoint).
        tiny_overrides: `ImageEncoderViT` kwargs replacing TINY_ENCODER entries ("tiny" only).

    Returns:
        (encoder in eval mode with requires_grad False, pixel_mean, pixel_std) on the 0-255 scale.
    """
    if variant != "tiny" and variant not in SAM_VARIANTS:
        raise ValueError(
            f"unknown SAM variant {variant!r}; choose one of tiny, {list(SAM_VARIANTS)}"
        )
    if tiny_overrides and variant != "tiny":
        raise ValueError(f"encoder overrides {sorted(tiny_overrides)} only apply to variant 'tiny'")
    path = Path(checkpoint) if checkpoint is not None else None
    state = _load_encoder_state(path, variant) if path is not None else None
    if variant == "tiny":
        encoder = _build_tiny(meta=state is not None, seed=seed, overrides=tiny_overrides)
        mean, std = _sam_default_stats()
    else:
        encoder, mean_t, std_t = _build_registry(variant, meta=state is not None)
        mean, std = tuple(mean_t.flatten().tolist()), tuple(std_t.flatten().tolist())
        if state is None:
            log.warning(
                "SAM %s has random weights (no checkpoint): only useful to measure cost", variant
            )
    if state is not None:
        _check_encoder_state(state, encoder, path, variant)
        encoder.load_state_dict(state, strict=True, assign=True)
    encoder.requires_grad_(False)
    return encoder.eval(), mean, std


def verify_sam_checkpoint(path: str | Path, variant: str) -> str:
    """sha256 of `path`; raises SamCheckpointError if it is not the official `variant` file."""
    path, expected = Path(path), SAM_VARIANTS[variant].sha256
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise SamCheckpointError(
            f"{path} has sha256 {digest.hexdigest()}, the official {variant} file has {expected}: "
            f"download {SAM_URL}{SAM_VARIANTS[variant].filename} again"
        )
    return expected


class StageProjection(nn.Module):
    """Linear(sam_dim -> C_i) with bias on the SAM tokens (§6.4; the reference's `MLP`)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.proj(tokens)


class CrossAttentionFusion(nn.Module):
    """Multi-head cross-attention: stage tokens query projected SAM tokens (§6.5).

    No q/kv bias, [K|V] layout of `kv` as in MiT, scale 1/sqrt(head_dim), output projection with
    bias, no norm and no dropout. `attention` picks the fused kernel or the reference's explicit
    softmax; both compute the same function.
    """

    def __init__(self, dim: int, num_heads: int, attention: str = "sdpa") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"fusion dim {dim} is not divisible by {num_heads} heads")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention={attention!r}; choose one of {ATTENTION_MODES}")
        self.num_heads, self.attention = num_heads, attention
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """x (B, N, C) stage tokens, context (B, M, C) projected SAM tokens -> (B, N, C)."""
        (b, n, c), m, h = x.shape, context.shape[1], self.num_heads
        q = self.q(x).reshape(b, n, h, c // h).transpose(1, 2)  # (B, h, N, hd)
        k, v = self.kv(context).reshape(b, m, 2, h, c // h).permute(2, 0, 3, 1, 4)  # (B, h, M, hd)
        if self.attention == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale  # (B, h, N, M)
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))  # (B, N, C)


def _drop_encoder_state(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]
) -> None:
    """state_dict post-hook: SAM is rebuilt from its own file, never saved with ours (§6.10.3)."""
    for key in [k for k in state_dict if k.startswith(prefix + "encoder.")]:
        del state_dict[key]
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        for key in [k for k in metadata if k.startswith(prefix + "encoder")]:
            del metadata[key]


def _keep_encoder_on_load(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any
) -> None:
    """load_state_dict pre-hook: the encoder keeps its own weights; checkpoints carry none."""
    for key in [k for k in state_dict if k.startswith(prefix + "encoder.")]:
        del state_dict[key]
    for key, value in module.encoder.state_dict().items():
        state_dict[prefix + "encoder." + key] = value


class SamRegularizer(nn.Module):
    """Frozen SAM encoder + per-stage projection and cross-attention that enhance MiT features.

    Layers exist for every backbone stage (so official `embedding_layer.{0..3}` /
    `fusion_layer.{0..3}` weights load); only those in `stages` are applied and trained.

    Args:
        variant: "vit_b" (both released SSR configs), "vit_l", "vit_h" or "tiny".
        checkpoint: official SAM file for vit_*; None for tiny (random weights).
        stages: 0-based MiT stages that receive SAM fusion (the reference's `stop_stage`).
        stage_dims / stage_heads: the backbone's embed dims and heads (defaults: MiT-B5).
        loss_weight: weight of the enhanced-branch losses (reference: 1).
        data_mean / data_std: the normalisation of the images given to `encode`; must equal SAM's.
        input_size: side SAM sees; None = the encoder's img_size (1024: 512 crops upsampled 2x).
        attention: "sdpa" (fused kernel) or "explicit" (reference formulation).
        verify_sha256: check the checkpoint against the known sha256 of the official file first
            (off by default: the values are corroborated third-party records, see SAM_VARIANTS).
        cache_dir: opt-in deviation (issue 4): a folder written by `python -m ssr.sam_cache`;
            `step_features` then cuts features from it instead of running SAM online.
    """

    def __init__(
        self,
        variant: str = "vit_b",
        checkpoint: str | None = None,
        stages: Sequence[int] = (0, 1, 2, 3),
        stage_dims: Sequence[int] = (64, 128, 320, 512),
        stage_heads: Sequence[int] = (1, 2, 5, 8),
        loss_weight: float = 1.0,
        data_mean: Sequence[float] = MEAN,
        data_std: Sequence[float] = STD,
        input_size: int | None = None,
        attention: str = "sdpa",
        cache_dir: str | None = None,
        verify_sha256: bool = False,
    ) -> None:
        super().__init__()
        if len(stage_dims) != len(stage_heads):
            raise ValueError(
                f"stage_dims {list(stage_dims)} and stage_heads {list(stage_heads)} differ"
            )
        stages = [int(s) for s in stages]
        if len(set(stages)) != len(stages) or not all(0 <= s < len(stage_dims) for s in stages):
            raise ValueError(
                f"stages={stages}: expected distinct indices in 0..{len(stage_dims) - 1}"
            )
        if verify_sha256 and checkpoint is not None and variant in SAM_VARIANTS:
            verify_sam_checkpoint(checkpoint, variant)
        self.encoder, self.pixel_mean, self.pixel_std = build_sam_encoder(variant, checkpoint)
        if not (_close(data_mean, self.pixel_mean) and _close(data_std, self.pixel_std)):
            raise ValueError(
                f"data mean/std {list(data_mean)}/{list(data_std)} differ from SAM's pixel_mean/"
                f"pixel_std {list(self.pixel_mean)}/{list(self.pixel_std)}: SAM would see wrongly "
                "normalised images; use ssr.data.labels.MEAN/STD for the data"
            )
        img_size = self.encoder.img_size
        if input_size is not None and input_size != img_size:
            raise ValueError(
                f"input_size={input_size}, but SAM's absolute position embedding fixes its input "
                f"to {img_size}; leave input_size null"
            )
        self.variant, self.checkpoint, self.cache_dir = variant, checkpoint, cache_dir
        self.stages, self.loss_weight, self.input_size = (
            tuple(sorted(stages)),
            loss_weight,
            img_size,
        )
        self.sam_dim: int = self.encoder.neck[0].out_channels
        self.grid: int = img_size // self.encoder.patch_embed.proj.kernel_size[0]  # tokens per side
        self.cache = (
            SamFeatureCache(cache_dir, encoder_fingerprint(self.encoder), self.sam_dim, self.grid)
            if cache_dir
            else None
        )
        self.embedding_layer = nn.ModuleList(StageProjection(self.sam_dim, c) for c in stage_dims)
        self.fusion_layer = nn.ModuleList(
            CrossAttentionFusion(c, h, attention)
            for c, h in zip(stage_dims, stage_heads, strict=True)
        )
        for i in set(range(len(stage_dims))) - set(
            self.stages
        ):  # unused: keep them out of training
            self.embedding_layer[i].requires_grad_(False)
            self.fusion_layer[i].requires_grad_(False)
        self.register_state_dict_post_hook(_drop_encoder_state)
        self.register_load_state_dict_pre_hook(_keep_encoder_on_load)

    def train(self, mode: bool = True) -> SamRegularizer:
        """SAM stays in eval mode whatever the parent does (the reference left it in train mode)."""
        super().train(mode)
        self.encoder.eval()
        return self

    def _sam_input(self, images: Tensor) -> Tensor:
        """Bilinear resize (align_corners False) to SAM's square input, as the reference does."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"SAM expects (B, 3, H, W) images, got shape {tuple(images.shape)}")
        size = (self.input_size, self.input_size)
        if images.shape[-2:] == size:
            return images
        return F.interpolate(images, size=size, mode="bilinear", align_corners=False)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, h, w) normalised images -> (B, sam_dim, g, g) SAM features, no graph (§6.3).

        no_grad rather than inference_mode: the features feed layers that are trained.
        """
        return self.encoder(self._sam_input(images))

    @torch.no_grad()
    def encode_pair(self, src: Tensor, mix: Tensor) -> tuple[Tensor, Tensor]:
        """Source and mixed crops through SAM in one batch, split back (§6.3)."""
        feats = self.encoder(torch.cat([self._sam_input(src), self._sam_input(mix)]))
        return feats[: src.shape[0]], feats[src.shape[0] :]

    def step_features(
        self, src: Tensor, mix: Tensor, mix_mask: Tensor, batch: Mapping[str, Any]
    ) -> tuple[Tensor, Tensor]:
        """S_src, S_mix of one training step: online (§6.3) or, with `cache_dir`, from the cache.

        Cached: the source and target crops' features are cut from their full-image maps and the
        mixed features are mask*S_src + (1-mask)*S_tgt with `mix_mask` (B, 1, h, w), the ClassMix
        mask, averaged over each token's pixels. The strong augmentation of `mix` is not reflected.
        """
        if self.cache is None:
            return self.encode_pair(src, mix)
        missing = [k for k in ("src_file", "src_crop", "tgt_file", "tgt_crop") if k not in batch]
        if missing:
            raise SamCacheError(
                f"the training batch lacks {missing}: cached SAM features need the crop boxes "
                "of UDADataModule(crop_info=True), which UDAModule.setup turns on"
            )
        crop = (src.shape[-2], src.shape[-1])
        s_src = self.cache.crops("source", batch["src_file"], batch["src_crop"], crop).to(src)
        s_tgt = self.cache.crops("target", batch["tgt_file"], batch["tgt_crop"], crop).to(src)
        mask = F.adaptive_avg_pool2d(mix_mask.to(s_src.dtype), s_src.shape[-2:])  # source share
        return s_src, mask * s_src + (1 - mask) * s_tgt

    def fuse(self, feats: Sequence[Tensor], sam_feats: Tensor) -> list[Tensor]:
        """c_i + CrossAttn_i(c_i, Proj_i(S)) on the selected stages, c_i elsewhere (§6.6).

        Args:
            feats: the backbone's stage maps (B, C_i, H_i, W_i); gradients flow through both terms.
            sam_feats: (B, sam_dim, g, g) from `encode`.
        """
        if len(feats) != len(self.fusion_layer):
            raise ValueError(
                f"got {len(feats)} feature maps, the regulariser has "
                f"{len(self.fusion_layer)} stages"
            )
        if sam_feats.shape[0] != feats[0].shape[0]:
            raise ValueError(f"SAM batch {sam_feats.shape[0]} != feature batch {feats[0].shape[0]}")
        tokens = sam_feats.flatten(2).transpose(1, 2)  # (B, g*g, sam_dim), row-major
        out = list(feats)
        for i in self.stages:
            b, c, h, w = feats[i].shape
            context = self.embedding_layer[i](tokens)  # (B, M, C_i)
            query = feats[i].flatten(2).transpose(1, 2)  # (B, H*W, C_i)
            fused = self.fusion_layer[i](query, context)  # (B, H*W, C_i)
            out[i] = feats[i] + fused.transpose(1, 2).reshape(b, c, h, w)
        return out

    def named_trainable_parameters(self, prefix: str = "") -> Iterator[tuple[str, nn.Parameter]]:
        """Projection/fusion parameters of the selected stages; SAM is never among them."""
        dot = prefix + "." if prefix else ""
        for name in ("embedding_layer", "fusion_layer"):
            for n, p in getattr(self, name).named_parameters(prefix=dot + name):
                if p.requires_grad:
                    yield n, p

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    def load_official(self, checkpoint: Mapping[str, Any]) -> list[str]:
        """Load `embedding_layer.*` / `fusion_layer.*` from an official SSR checkpoint (strict).

        Accepts the `torch.load`ed work-dir file (with `state_dict`) or the state dict itself;
        every other key (`model.*`, `predictor.*`, ...) is ignored. Returns the loaded keys.
        """
        state = checkpoint.get("state_dict", checkpoint)
        theirs = {
            k.removeprefix("module."): v
            for k, v in state.items()
            if k.removeprefix("module.").startswith(OFFICIAL_PREFIXES)
        }
        ours = {
            k: v
            for k, v in self.state_dict(keep_vars=True).items()
            if k.startswith(OFFICIAL_PREFIXES)
        }
        missing, unexpected = (
            sorted(ours.keys() - theirs.keys()),
            sorted(theirs.keys() - ours.keys()),
        )
        wrong = [k for k in sorted(ours.keys() & theirs.keys()) if ours[k].shape != theirs[k].shape]
        if missing or unexpected or wrong:
            raise SamCheckpointError(
                f"official SSR fusion weights do not fit: missing {missing[:4]}, unexpected "
                f"{unexpected[:4]}, shape mismatch {wrong[:4]} (stage dims/heads must be MiT's)"
            )
        with torch.no_grad():
            for key, param in ours.items():
                param.copy_(theirs[key])
        return sorted(ours)


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(
        abs(float(x) - float(y)) < 1e-3 for x, y in zip(a, b, strict=True)
    )


# ------------------------------------------------------------------------ SAM feature cache
# Opt-in deviation of issue 4. Written by `python -m ssr.sam_cache`, read by SamFeatureCache.
CACHE_FORMAT, CACHE_VERSION = "ssr-sam-cache", 1
CACHE_MANIFEST = "manifest.json"
CACHE_DOMAINS = ("source", "target")


def encoder_fingerprint(encoder: nn.Module) -> str:
    """sha256 of a few encoder tensors: tells a cache from another SAM file or seed apart."""
    state = encoder.state_dict()
    digest = hashlib.sha256()
    for key in sorted(k for k in state if k.startswith(("patch_embed.", "pos_embed", "neck."))):
        digest.update(key.encode())
        digest.update(state[key].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


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


class SamFeatureCache:
    """Reads a cache written by `python -m ssr.sam_cache` and cuts crops from it.

    Checked once at construction: format, completeness, and that it was computed by this very
    encoder (fingerprint) with this feature size and grid. Checked per crop: the crop size and
    the full-image map size implied by the resized image (a changed `data.*_resize` fails here).
    """

    def __init__(self, root: str | Path, fingerprint: str, dim: int, grid: int) -> None:
        self.root = Path(root)
        path = self.root / CACHE_MANIFEST
        rebuild = (
            f"build it with `python -m ssr.sam_cache experiment=<name> uda.sam.cache_dir={root}`"
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
            files: image paths relative to the dataset root (the batch's `src_file`/`tgt_file`).
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
                    "with `python -m ssr.sam_cache` (same experiment and data roots)"
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
