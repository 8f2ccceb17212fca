"""The frozen SAM image encoder of SSR: variants, loading, verification; docs/method.md §6.2-§6.3.

SAM comes from `segment_anything` (its registry for vit_b/l/h, `ImageEncoderViT` directly for the
CPU-sized "tiny" variant). Frozen on purpose (§6.10.3): no gradients, eval mode, never in the
optimiser, never in ssr's checkpoints (rebuilt from its own file), and the data normalisation is
checked against SAM's own rather than assumed (§6.10.1).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, Sam
from torch import Tensor, nn

from ssr.data.labels import MEAN, STD
from ssr.errors import ConfigError
from ssr.io import CheckpointError, load_torch_file, state_dict_problems

log = logging.getLogger(__name__)

ENCODER_PREFIX = "image_encoder."  # key prefix of the encoder inside an official SAM file


class SamCheckpointError(CheckpointError):
    """A SAM weight file is missing, unreadable, or does not fit the requested variant."""


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
    hint = f"expected {_expected_file(variant)} (or set uda.sam.encoder.checkpoint)"
    try:
        state = load_torch_file(path, what="SAM checkpoint", hint=hint)
    except CheckpointError as e:
        raise SamCheckpointError(str(e)) from e
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
    """Strict key and shape check; a file of another SAM variant is named as such."""
    expected = encoder.state_dict()
    problems = state_dict_problems(expected, state)
    if not problems:
        return
    found, wanted = _describe(state), _describe(expected)
    if found != wanted:
        raise SamCheckpointError(
            f"{path} looks like a different SAM variant ({found}), but variant={variant} expects "
            f"{wanted}: pass {_expected_file(variant)} or choose the matching uda/sam variant"
        )
    raise SamCheckpointError(f"{path} does not match the {variant} encoder: {'; '.join(problems)}")


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
        raise ConfigError(
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


def _drop_own_state(
    module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any]
) -> None:
    """state_dict post-hook: SAM is rebuilt from its own file, never saved with ours (§6.10.3)."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        for key in [k for k in metadata if k.startswith(prefix)]:
            del metadata[key]


def _keep_own_on_load(module: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """load_state_dict pre-hook: the encoder keeps its own weights; checkpoints carry none."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]
    for key, value in module.encoder.state_dict().items():
        state_dict[prefix + "encoder." + key] = value


class SamEncoder(nn.Module):
    """SAM's image encoder, frozen: normalised crops -> SAM features (config node
    `uda.sam.encoder`).

    Its weights never appear in ssr's state dicts (checkpoints stay small; SAM is rebuilt from its
    file), and it stays in eval mode whatever its parent does (the reference left it in train mode;
    SAM has no dropout or BatchNorm, so only the intent differs).

    Args:
        variant: "vit_b" (both released SSR configs), "vit_l", "vit_h" or "tiny".
        checkpoint: official SAM file for vit_*; None gives random weights (tiny; cost benchmarks).
        verify_sha256: check the file against the official release's sha256 first (off by
            default: the values are corroborated third-party records, see SAM_VARIANTS).
        seed: initialisation seed of random weights (without checkpoint).
        bf16: a speed mode and a deviation (off by default): SAM runs under bfloat16 autocast
            while the student trains in fp32; its features come back in the input's dtype.
            benchmarks/sam_bf16.py measures the feature error and the time at paper size.
        compile: a speed mode (off by default): `torch.compile` SAM's encoder in place; its first
            call pays for compilation.
    """

    def __init__(
        self,
        variant: str = "vit_b",
        checkpoint: str | None = None,
        verify_sha256: bool = False,
        seed: int = 0,
        bf16: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.bf16 = bf16
        if verify_sha256 and checkpoint is not None and variant in SAM_VARIANTS:
            verify_sam_checkpoint(checkpoint, variant)
        self.encoder, mean, std = build_sam_encoder(variant, checkpoint, seed=seed)
        if not (_close(MEAN, mean) and _close(STD, std)):
            raise ValueError(
                f"data mean/std {list(MEAN)}/{list(STD)} differ from SAM's pixel_mean/pixel_std "
                f"{list(mean)}/{list(std)}: SAM would see wrongly normalised images"
            )
        self.variant, self.checkpoint = variant, checkpoint
        self.input_size: int = self.encoder.img_size  # fixed by SAM's absolute position embedding
        self.dim: int = self.encoder.neck[0].out_channels
        self.grid: int = self.input_size // self.encoder.patch_embed.proj.kernel_size[0]
        if compile:
            self.encoder.compile()
        self.register_state_dict_post_hook(_drop_own_state)
        self.register_load_state_dict_pre_hook(_keep_own_on_load)

    def train(self, mode: bool = True) -> SamEncoder:
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
    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, h, w) normalised images -> (B, dim, grid, grid) SAM features, no graph (§6.3).

        no_grad rather than inference_mode: the features feed layers that are trained.
        """
        return self._encode(self._sam_input(images))

    @torch.no_grad()
    def encode_pair(self, src: Tensor, mix: Tensor) -> tuple[Tensor, Tensor]:
        """Source and mixed crops through SAM in one batch, split back (§6.3)."""
        feats = self._encode(torch.cat([self._sam_input(src), self._sam_input(mix)]))
        return feats[: src.shape[0]], feats[src.shape[0] :]

    def _encode(self, images: Tensor) -> Tensor:
        """SAM's forward; in the bf16 speed mode under bfloat16 autocast, returned in fp32."""
        if not self.bf16:
            return self.encoder(images)
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            return self.encoder(images).to(images.dtype)

    def fingerprint(self) -> str:
        """sha256 of a few encoder tensors: tells features of another SAM file or seed apart."""
        state = self.encoder.state_dict()
        digest = hashlib.sha256()
        for key in sorted(k for k in state if k.startswith(("patch_embed.", "pos_embed", "neck."))):
            digest.update(key.encode())
            digest.update(state[key].detach().float().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()


def _close(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return len(a) == len(b) and all(abs(x - y) < 1e-3 for x, y in zip(a, b, strict=True))
