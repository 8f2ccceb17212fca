"""DAFormer decode head: per-stage linear embedding + separable-ASPP fusion; docs/method.md §2.

DAFormer (Hoyer et al. 2022), "sepaspp" configuration. Module names reproduce mmcv's key layout
(`conv`/`bn` inside a conv unit, `depthwise_conv`/`pointwise_conv` in a separable unit, §2.5) so
that official DAFormer / MIC / SSR checkpoints load key for key.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssr.errors import ConfigError


class ConvBNReLU(nn.Module):
    """Conv (no bias: BN follows) -> BN -> ReLU, mmcv's `ConvModule` with its kaiming init."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        padding: int = 0,
        dilation: int = 1,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.bn(self.conv(x)))


class SeparableConvBNReLU(nn.Module):
    """Dilated depthwise 3x3 unit followed by a pointwise 1x1 unit (mmcv's separable module)."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__()
        self.depthwise_conv = ConvBNReLU(
            in_channels, in_channels, 3, padding=dilation, dilation=dilation, groups=in_channels
        )
        self.pointwise_conv = ConvBNReLU(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class SepASPP(nn.Module):
    """Context-aware fusion: parallel dilated branches, concatenated, then a 3x3 bottleneck (§2.2).

    No image-pooling branch (DAFormer's `pool=False`); dilation 1 is a plain 1x1 unit.
    """

    def __init__(self, in_channels: int, channels: int, dilations: Sequence[int]) -> None:
        super().__init__()
        self.aspp_modules = nn.ModuleList(
            ConvBNReLU(in_channels, channels, 1)
            if d == 1
            else SeparableConvBNReLU(in_channels, channels, d)
            for d in dilations
        )
        self.bottleneck = ConvBNReLU(len(dilations) * channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.cat([branch(x) for branch in self.aspp_modules], dim=1)  # (B, nd*ch, H, W)
        return self.bottleneck(x)


class TokenEmbed(nn.Module):
    """Linear embedding of a feature map's tokens (upstream `MLP`; the child `proj` is the key)."""

    def __init__(self, in_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        x = self.proj(x.flatten(2).transpose(1, 2))  # (B, N, E)
        return x.transpose(1, 2).reshape(b, -1, h, w)  # (B, E, H, W)


FUSIONS = ("aspp", "conv")


class DAFormerHead(nn.Module):
    """Four stage maps (strides 4..32) -> class logits at stride 4 (§2.2); no further upsampling.

    `fusion="conv"` replaces the separable ASPP by one 1x1 conv unit (the SegFormer-style decoder
    with DAFormer's widths): HRDA's scale-attention head (docs/hrda.md §3.1).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int = 19,
        embed_dim: int = 256,
        channels: int = 256,
        dilations: Sequence[int] = (1, 6, 12, 18),
        dropout: float = 0.1,
        fusion: str = "aspp",
    ) -> None:
        super().__init__()
        if fusion not in FUSIONS:
            raise ConfigError(f"decode head fusion={fusion!r}; choose one of {FUSIONS}")
        self.in_channels = tuple(in_channels)
        self.num_classes = num_classes
        self.embed_layers = nn.ModuleList(TokenEmbed(c, embed_dim) for c in self.in_channels)
        width = len(self.in_channels) * embed_dim
        self.fuse_layer: nn.Module = (
            SepASPP(width, channels, dilations)
            if fusion == "aspp"
            else ConvBNReLU(width, channels, 1)
        )
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.conv_seg.weight, mean=0.0, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        if len(feats) != len(self.embed_layers):
            raise ValueError(f"expected {len(self.embed_layers)} feature maps, got {len(feats)}")
        size = feats[0].shape[2:]
        embedded = []
        for embed, f in zip(self.embed_layers, feats, strict=True):
            e = embed(f)  # (B, E, H_i, W_i)
            if e.shape[2:] != size:
                e = F.interpolate(e, size=size, mode="bilinear", align_corners=False)
            embedded.append(e)
        x = self.fuse_layer(torch.cat(embedded, dim=1))  # (B, ch, H/4, W/4)
        return self.conv_seg(self.dropout(x))  # (B, K, H/4, W/4)
