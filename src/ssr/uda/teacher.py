"""The DACS EMA teacher and its pseudo-labels; docs/method.md §4.4 (EMA rule), §4.5 (pseudo-labels).

Our own small class on purpose: timm's and Lightning's EMA average buffers and keep the copy in eval
mode, the DACS teacher averages parameters only and keeps BatchNorm in train mode.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd

from ssr.errors import ConfigError


class EMATeacher(nn.Module):
    """Exponential moving average of the student's parameters, used only to pseudo-label targets.

    Config node `uda.teacher` (a Hydra partial: the UDA module passes the student).

    Args:
        student: the network to track; any module whose forward returns logits (B, K, H, W) at the
            input size (our `Segmentor`). It is deep-copied; the copy never receives gradients.
        alpha: cap of the EMA decay, α_t = min(1 − 1/(t+1), alpha) (0.999 in DAFormer/MIC/SSR).
        threshold: confidence for the scalar pseudo-label weight (0.968).
        ignore_top / ignore_bottom: absolute numbers of crop rows (top / bottom) whose weight is 0
            (15 / 120 for 512-row crops; tiny test configs set their own).
        bn_eval: deviation from the reference: pseudo-label with the teacher fully in eval mode
            (BatchNorm running statistics) instead of BN in train mode with dropout/drop-path off.
    """

    def __init__(
        self,
        student: nn.Module,
        alpha: float = 0.999,
        threshold: float = 0.968,
        ignore_top: int = 15,
        ignore_bottom: int = 120,
        bn_eval: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha < 1.0:
            raise ConfigError(f"EMA alpha={alpha} must be in [0, 1); DACS uses 0.999")
        _check_rows(ignore_top, ignore_bottom)
        self.alpha = alpha
        self.threshold = threshold
        self.ignore_top = ignore_top
        self.ignore_bottom = ignore_bottom
        self.bn_eval = bn_eval
        self.model = copy.deepcopy(student)
        self.model.requires_grad_(False)

    def alpha_at(self, step: int) -> float:
        """EMA decay after `step` optimiser steps: 0.5 at t=1, 0.9 at t=9, capped at `alpha`."""
        if step < 0:
            raise ValueError(f"EMA step={step} must be >= 0")
        return min(1.0 - 1.0 / (step + 1), self.alpha)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> None:
        """Step 0: copy the student's parameters; later: θ_T ← α_t·θ_T + (1 − α_t)·θ_S.

        Buffers (BatchNorm running statistics, `num_batches_tracked`) are never touched: the
        reference averages `parameters()` only and the teacher's BN runs on batch statistics.
        """
        teacher_named = list(self.model.named_parameters())
        student_named = list(student.named_parameters())
        if [n for n, _ in teacher_named] != [n for n, _ in student_named]:
            raise ValueError(
                "EMATeacher.update: the student's parameter names differ from the teacher's; pass "
                "the same architecture the teacher was built from"
            )
        t_params = [p for _, p in teacher_named]
        s_params = [p.detach() for _, p in student_named]
        if step == 0:
            torch._foreach_copy_(t_params, s_params)
        else:
            # lerp(t, s, w) = t + w·(s − t) = α·t + (1 − α)·s with w = 1 − α.
            torch._foreach_lerp_(t_params, s_params, 1.0 - self.alpha_at(step))

    @torch.no_grad()
    def pseudo_label(self, img: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Teacher pseudo-labels (B, H, W) int64 and their weight (B, H, W) float (§4.5).

        The weight is one scalar for the whole batch, q = fraction of the batch's pixels whose max
        softmax probability is ≥ `threshold`, set to 0 in the first `ignore_top` and the last
        `ignore_bottom` rows (ego-vehicle / rectification artefacts). Low-confidence pixels keep
        their label and weight q. `valid` (B, H, W) 0/1, HRDA's pseudo-label margin mask (the
        datamodule's ``tgt_valid``), multiplies the weight; q still counts every pixel, margins
        included, as HRDA's ``dacs.py`` does.
        """
        self._set_pseudo_label_mode()
        logits = self.model(img)
        if logits.shape[-2:] != img.shape[-2:]:
            logits = F.interpolate(
                logits, size=img.shape[-2:], mode="bilinear", align_corners=False
            )
        conf, label = torch.softmax(logits.float(), dim=1).max(dim=1)  # (B, H, W) each
        q = (conf >= self.threshold).float().mean()  # a 0-dim tensor: no host sync
        weight = q.expand_as(conf).clone()
        weight[:, : self.ignore_top] = 0.0
        if self.ignore_bottom > 0:
            weight[:, -self.ignore_bottom :] = 0.0
        if valid is not None:
            if valid.shape != weight.shape:  # a (B, 1, H, W) mask would broadcast silently
                raise ValueError(
                    f"valid mask {tuple(valid.shape)} != pseudo-labels {tuple(weight.shape)}"
                )
            weight = weight * valid
        return label, weight

    @torch.no_grad()
    def confidence(self, img: Tensor) -> Tensor:
        """(B, H, W) max softmax probability of the pseudo-label pass (for debug panels).

        Re-runs the forward of `pseudo_label` (same weights and mode); BatchNorm statistics are
        restored, so drawing a panel never changes training.
        """
        buffers = [b.clone() for b in self.model.buffers()]
        self._set_pseudo_label_mode()
        logits = self.model(img)
        for b, saved in zip(self.model.buffers(), buffers, strict=True):
            b.copy_(saved)
        return torch.softmax(logits.float(), dim=1).amax(dim=1)

    def _set_pseudo_label_mode(self) -> None:
        """BatchNorm in train mode (batch statistics), dropout and drop-path off (§4.4).

        Set at every call, independent of the surrounding mode: Lightning's `.train()` / `.eval()`
        on the UDA module would otherwise switch dropout back on or BN to running statistics.
        """
        if self.bn_eval:
            self.model.eval()
            return
        self.model.train()
        for m in self.model.modules():
            if isinstance(m, (_DropoutNd, DropPath)):
                m.eval()


def _check_rows(top: int, bottom: int) -> None:
    if top < 0 or bottom < 0:
        raise ConfigError(f"pseudo-label crop rows top={top}, bottom={bottom} must be >= 0")
