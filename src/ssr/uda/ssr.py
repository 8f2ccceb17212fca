"""SSR's regularisation branch: SAM features fused into every MiT stage; docs/method.md §6.

SSR (Ge et al., arXiv 2401.14686). Per fused stage i, the frozen SAM encoder's tokens are projected
to the stage width (§6.4), the stage tokens query them by multi-head cross-attention (§6.5), and the
result is added to the stage map (§6.6). The enhanced maps go through the segmentor's own decode
head and get the same loss, labels and weights as the plain (shadow) branch (§6.7). Only the
shadow branch ships: nothing here runs at inference and `ssr.model` never imports this file.

The SAM features of a step come from a source chosen at construction: SAM online on the source
and the mixed crop (the reference), or an opt-in cache of precomputed features
(`ssr.uda.sam_features.CachedSamFeatures`, a documented deviation).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ssr.data.stream import CropRecord
from ssr.errors import ConfigError
from ssr.model.segmentor import Segmentor, View
from ssr.uda.losses import seg_loss
from ssr.uda.mixing import MixedBatch
from ssr.uda.sam_encoder import SamEncoder
from ssr.uda.sam_features import CachedSamFeatures, OnlineSamFeatures

ATTENTION_MODES = ("sdpa", "explicit")
VIEW_MODES = ("all", "context")  # which views of a multi-view segmentor receive SAM features
DETAIL_KEYS = ("shared", "own_view")  # the detail view's SAM tokens: the crop's, or its own


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
    softmax (§6.10.6); both compute the same function.
    """

    def __init__(self, dim: int, num_heads: int, attention: str = "sdpa") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"fusion dim {dim} is not divisible by {num_heads} heads")
        if attention not in ATTENTION_MODES:
            raise ConfigError(f"attention={attention!r}; choose one of {ATTENTION_MODES}")
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


class SSRRegularizer(nn.Module):
    """Frozen SAM encoder + per-stage projection and cross-attention that enhance MiT features
    (config node `uda.sam`, a Hydra partial: the UDA module passes the backbone's widths).

    Layers exist for every backbone stage (so the official `embedding_layer.{0..3}` /
    `fusion_layer.{0..3}` key layout holds); only those in `stages` are applied and trained.

    Args:
        encoder: the frozen SAM image encoder.
        stage_dims / stage_heads: the backbone's embed dims and heads per stage.
        stages: 0-based MiT stages that receive SAM fusion (the reference's `stop_stage`).
        loss_weight: weight of the enhanced-branch losses (reference: 1).
        attention: "sdpa" (fused kernel) or "explicit" (reference formulation).
        cache_dir: opt-in deviation: a folder written by `python -m ssr.uda.sam_cache`; the step's
            SAM features are then cut from it instead of computed online.
        views: with HRDA (this project's design, docs/hrda.md §8): "all" fuses SAM into the
            context and the detail view (option B), "context" only into the context view and
            drops the enhanced detail-crop loss, which would equal the shadow's (option A). A
            one-view segmentor (DAFormer) is the same under both.
        detail_keys: with HRDA and views="all": "shared" = the detail view attends to the crop's
            SAM tokens (B); "own_view" = to SAM's tokens of the detail view itself, upsampled to
            SAM's input like SSR's 512 crops (option C: twice the SAM forwards, no cache).
    """

    def __init__(
        self,
        encoder: SamEncoder,
        stage_dims: Sequence[int],
        stage_heads: Sequence[int],
        stages: Sequence[int] = (0, 1, 2, 3),
        loss_weight: float = 1.0,
        attention: str = "sdpa",
        cache_dir: str | None = None,
        views: str = "all",
        detail_keys: str = "shared",
    ) -> None:
        super().__init__()
        if views not in VIEW_MODES:
            raise ConfigError(f"uda.sam.views={views!r}; choose one of {VIEW_MODES}")
        if detail_keys not in DETAIL_KEYS:
            raise ConfigError(f"uda.sam.detail_keys={detail_keys!r}; choose one of {DETAIL_KEYS}")
        if detail_keys == "own_view" and (views != "all" or cache_dir):
            raise ConfigError(
                "uda.sam.detail_keys=own_view needs uda.sam.views=all and SAM online "
                "(uda.sam.cache_dir=null): the detail view's tokens depend on its random box"
            )
        self.views, self.detail_keys = views, detail_keys
        if len(stage_dims) != len(stage_heads):
            raise ConfigError(
                f"stage_dims {list(stage_dims)} and stage_heads {list(stage_heads)} differ"
            )
        stages = [int(s) for s in stages]
        if not stages or len(set(stages)) != len(stages):
            raise ConfigError(
                f"stages={stages}: expected distinct stage indices (uda.sam=null: none)"
            )
        if not all(0 <= s < len(stage_dims) for s in stages):
            raise ConfigError(f"stages={stages}: expected indices in 0..{len(stage_dims) - 1}")
        self.encoder = encoder
        self.stages, self.loss_weight = tuple(sorted(stages)), loss_weight
        self.source = (
            CachedSamFeatures(cache_dir, encoder) if cache_dir else OnlineSamFeatures(encoder)
        )
        self.embedding_layer = nn.ModuleList(StageProjection(encoder.dim, c) for c in stage_dims)
        self.fusion_layer = nn.ModuleList(
            CrossAttentionFusion(c, h, attention)
            for c, h in zip(stage_dims, stage_heads, strict=True)
        )
        for i in set(range(len(stage_dims))) - set(self.stages):  # unused: keep out of training
            self.embedding_layer[i].requires_grad_(False)
            self.fusion_layer[i].requires_grad_(False)

    def step_features(
        self, src: Tensor, mixed: MixedBatch, src_crop: CropRecord, tgt_crop: CropRecord
    ) -> tuple[Tensor, Tensor]:
        """S_src, S_mix (B, sam_dim, g, g) of one training step, from the chosen source (§6.3)."""
        return self.source(src, mixed, src_crop, tgt_crop)

    def fuse(self, feats: Sequence[Tensor], sam_feats: Tensor) -> list[Tensor]:
        """c_i + CrossAttn_i(c_i, Proj_i(S)) on the selected stages, c_i elsewhere (§6.6).

        Args:
            feats: the backbone's stage maps (B, C_i, H_i, W_i); gradients flow through both terms.
            sam_feats: (B, sam_dim, g, g) SAM features of the same images.
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

    def enhanced_loss(
        self,
        segmentor: Segmentor,
        views: Sequence[View],
        feats: Sequence[list[Tensor]],
        sam_feats: Tensor,
        label: Tensor,
        weight: Tensor | None = None,
    ) -> tuple[Tensor, list[list[Tensor]]]:
        """The regularisation branch's loss on one training forward, and its fused features.

        The fused maps go through the segmentor's own decode head (its BatchNorm statistics see
        them too, §6.10.4) with the shadow branch's labels and weights (§6.7). With several
        views (HRDA) `views` and `detail_keys` choose which are fused with which SAM tokens.
        """
        fused = [self.fuse(feats[0], sam_feats)]
        for view, f in zip(views[1:], feats[1:], strict=True):
            if self.views == "context":
                fused.append(f)
            elif self.detail_keys == "own_view":
                fused.append(self.fuse(f, self.encoder(view.image)))
            else:
                fused.append(self.fuse(f, sam_feats))
        predictions = segmentor.decode_train(fused, views)
        if self.views == "context" and len(views) > 1:  # the detail loss equals the shadow's
            predictions = [p for p in predictions if p.box is None]
        return self.loss_weight * seg_loss(predictions, label, weight), fused

    def named_trainable_parameters(self, prefix: str = "") -> Iterator[tuple[str, nn.Parameter]]:
        """Projection/fusion parameters of the selected stages; SAM is never among them."""
        dot = prefix + "." if prefix else ""
        for name in ("embedding_layer", "fusion_layer"):
            for n, p in getattr(self, name).named_parameters(prefix=dot + name):
                if p.requires_grad:
                    yield n, p
