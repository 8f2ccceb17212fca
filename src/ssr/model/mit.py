"""Mix Transformer (MiT) encoder of SegFormer (Xie et al. 2021) in DAFormer; docs/method.md §1.

Module names follow the upstream state-dict layout (`patch_embed{i}`, `block{i}.{j}`, `norm{i}`)
so that SegFormer's ImageNet files `mit_b*.pth` load key for key (§1.8).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from ssr.errors import ConfigError
from ssr.model.checkpoint import load_backbone_weights


@dataclass(frozen=True)
class MiTSpec:
    """The numbers that distinguish one MiT variant from another (§1.1)."""

    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4


MIT_VARIANTS: dict[str, MiTSpec] = {
    "b0": MiTSpec(embed_dims=(32, 64, 160, 256), depths=(2, 2, 2, 2)),
    "b1": MiTSpec(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2)),
    "b2": MiTSpec(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3)),
    "b3": MiTSpec(embed_dims=(64, 128, 320, 512), depths=(3, 4, 18, 3)),
    "b4": MiTSpec(embed_dims=(64, 128, 320, 512), depths=(3, 8, 27, 3)),
    "b5": MiTSpec(embed_dims=(64, 128, 320, 512), depths=(3, 6, 40, 3)),
    # Same topology at head dim 16 and one block per stage: trains on a CPU (tests, demo).
    "tiny": MiTSpec(embed_dims=(16, 32, 80, 128), depths=(1, 1, 1, 1)),
}

# Upstream passes eps=1e-6 to block and stage norms; the patch-embedding and spatial-reduction
# norms are built with PyTorch's default 1e-5 (§1.7).
_BLOCK_NORM_EPS = 1e-6
_DEFAULT_NORM_EPS = 1e-5


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows + LayerNorm: (B, C_in, H, W) -> (B, N, C) tokens."""

    def __init__(self, in_chans: int, embed_dim: int, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size, stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=_DEFAULT_NORM_EPS)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)  # (B, C, H', W')
        _, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
        return self.norm(x), h, w


class Attention(nn.Module):
    """Multi-head self-attention whose keys/values come from a spatially reduced map (§1.3)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=_DEFAULT_NORM_EPS)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        nh = self.num_heads
        q = self.q(x).reshape(b, n, nh, c // nh).transpose(1, 2)  # (B, nh, N, hd)
        if self.sr_ratio > 1:
            x = x.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
            x = self.sr(x).flatten(2).transpose(1, 2)  # (B, M, C), M = H/sr * W/sr
            x = self.norm(x)
        # The kv output is [K (C) | V (C)] along the last dim, each split into nh heads.
        kv = self.kv(x).reshape(b, -1, 2, nh, c // nh).permute(2, 0, 3, 1, 4)  # (2, B, nh, M, hd)
        k, v = kv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nh, N, hd), scale hd^-0.5
        out = out.transpose(1, 2).reshape(b, n, c)  # (B, N, C), heads concatenated in order
        return self.proj(out)


class DWConv(nn.Module):
    """3x3 depthwise conv on tokens; the wrapper reproduces the upstream key `dwconv.dwconv`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, _, c = x.shape
        x = x.transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
        return self.dwconv(x).flatten(2).transpose(1, 2)  # (B, N, C)


class MixFFN(nn.Module):
    """Linear -> depthwise conv -> GELU -> Linear (§1.4); the conv replaces positional encodings."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DWConv(hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        return self.fc2(self.act(self.dwconv(self.fc1(x), h, w)))


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth on both residual branches (§1.5)."""

    def __init__(
        self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: int, drop_path: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_BLOCK_NORM_EPS)
        self.attn = Attention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=_BLOCK_NORM_EPS)
        self.mlp = MixFFN(dim, dim * mlp_ratio)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MixVisionTransformer(nn.Module):
    """Four-stage hierarchical encoder: image (B, 3, H, W) -> maps at strides 4, 8, 16, 32."""

    def __init__(
        self,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        num_heads: Sequence[int] = (1, 2, 5, 8),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        mlp_ratio: int = 4,
        drop_path_rate: float = 0.1,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if not len(embed_dims) == len(depths) == len(num_heads) == len(sr_ratios) == 4:
            raise ValueError("MiT needs exactly 4 entries in embed_dims, depths, heads, sr_ratios")
        self.embed_dims = tuple(embed_dims)
        self.depths = tuple(depths)
        self.num_heads = tuple(num_heads)
        self.pretrained_path: str | None = None  # set by build_mit when ImageNet weights are loaded
        # Drop-path rate grows linearly over all blocks of all stages (§1.6).
        # (Plain Python rather than torch.linspace so that building on the meta device works.)
        n = sum(depths)
        rates = [drop_path_rate * k / max(n - 1, 1) for k in range(n)]
        prev_dim, first = in_chans, 0
        for i, (dim, depth) in enumerate(zip(embed_dims, depths, strict=True), start=1):
            kernel, stride = (7, 4) if i == 1 else (3, 2)
            self.add_module(f"patch_embed{i}", OverlapPatchEmbed(prev_dim, dim, kernel, stride))
            blocks = [
                Block(dim, num_heads[i - 1], sr_ratios[i - 1], mlp_ratio, rates[first + j])
                for j in range(depth)
            ]
            self.add_module(f"block{i}", nn.ModuleList(blocks))
            self.add_module(f"norm{i}", nn.LayerNorm(dim, eps=_BLOCK_NORM_EPS))
            prev_dim, first = dim, first + depth
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for i in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{i}")(x)  # (B, N, C_i)
            for block in getattr(self, f"block{i}"):
                x = block(x, h, w)
            x = getattr(self, f"norm{i}")(x)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)  # (B, C_i, H_i, W_i)
            outs.append(x)
        return outs


def _init_weights(m: nn.Module) -> None:
    """Random init of §1.8, used only when no ImageNet checkpoint is given (it overwrites all)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, std=math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def build_mit(
    variant: str = "b5", pretrained: str | None = None, drop_path_rate: float = 0.1
) -> MixVisionTransformer:
    """Build a MiT variant of `MIT_VARIANTS`, loading SegFormer ImageNet weights from `pretrained`.

    `pretrained=None` keeps the random init; a path is loaded strictly (only the ImageNet
    classifier `head.*` may be extra), see `ssr.model.checkpoint.load_backbone_weights`.
    """
    if variant not in MIT_VARIANTS:
        raise ConfigError(f"unknown MiT variant {variant!r}; choose one of {sorted(MIT_VARIANTS)}")
    spec = MIT_VARIANTS[variant]
    model = MixVisionTransformer(
        embed_dims=spec.embed_dims,
        depths=spec.depths,
        num_heads=spec.num_heads,
        sr_ratios=spec.sr_ratios,
        mlp_ratio=spec.mlp_ratio,
        drop_path_rate=drop_path_rate,
    )
    if pretrained is not None:
        load_backbone_weights(model, pretrained)
    # Lets training tell an ImageNet-initialised backbone (FD needs one) from random init.
    model.pretrained_path = None if pretrained is None else str(pretrained)
    return model
