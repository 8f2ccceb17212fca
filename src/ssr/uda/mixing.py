"""DACS domain mixing: ClassMix of source classes onto the target crop + strong augmentation.

docs/method.md §4.6 (ClassMix), §4.7 (colour jitter and blur). This object owns the strengths, the
gates and the three generators every augmentation of a training step draws from (NumPy: ClassMix
classes and blur σ; Python: the jitter and blur gates; torch: jitter factors and orders, and MIC's
masks), so a resumed run continues their streams exactly (`ssr.run.rng` saves them).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ssr.data.labels import MEAN, STD
from ssr.uda.augment import class_mix_masks, mix, strong_augment


class MixedBatch(NamedTuple):
    """The mixed step's inputs: image (B, 3, H, W), label (B, H, W), weight (B, H, W), and the
    ClassMix mask (B, 1, H, W), 1 where a source pixel was pasted."""

    image: Tensor
    label: Tensor
    weight: Tensor
    mask: Tensor


class DACSMixing:
    """ClassMix + strong augmentation of DACS (config node `uda.mixing`).

    Args:
        color_jitter_strength: brightness/contrast/saturation/hue strength of the kornia-0.5
            colour jitter (0.2).
        color_jitter_p: gate threshold: jitter is applied when a U(0, 1) draw exceeds it, i.e. with
            probability 1 - p (0.2 -> 0.8, as `color_jitter_probability` in DACS).
        blur: Gaussian blur with probability 0.5 (σ ~ U(0.15, 1.15)).
        seed: seed of the three generators (the run's seed).
    """

    def __init__(
        self,
        color_jitter_strength: float = 0.2,
        color_jitter_p: float = 0.2,
        blur: bool = True,
        seed: int = 0,
    ) -> None:
        self.color_jitter_strength = color_jitter_strength
        self.color_jitter_p = color_jitter_p
        self.blur = blur
        self.seed = seed
        self.reseed(seed, seed)

    def __repr__(self) -> str:
        return (
            f"DACSMixing(color_jitter_strength={self.color_jitter_strength}, "
            f"color_jitter_p={self.color_jitter_p}, blur={self.blur}, seed={self.seed})"
        )

    def __call__(
        self, xs: Tensor, ys: Tensor, xt: Tensor, pl_lbl: Tensor, pl_w: Tensor
    ) -> MixedBatch:
        """Paste half of the batch's source classes onto the target crops, then augment (§4.6).

        Pasted pixels take the source label and weight 1, the others the pseudo-label and its
        weight; `pl_w` itself is left unchanged (MIC reuses it).
        """
        m = class_mix_masks(ys, self.np_rng)  # (B, 1, H, W)
        xm = mix(m, xs, xt)
        ym = mix(m[:, 0], ys, pl_lbl).long()
        wm = mix(m[:, 0], torch.ones_like(pl_w), pl_w)
        return MixedBatch(self.augment(xm, per_image=True), ym, wm, m)

    def augment(self, x: Tensor, per_image: bool) -> Tensor:
        """Colour jitter + blur with gates drawn once per call and shared by the batch (§4.7).

        `per_image`: one jitter order and σ per image (DACS's per-image calls on the mixed crops)
        or one for the batch (MIC's single call on the target crops).
        """
        u_jitter, u_blur = self.py_rng.random(), self.py_rng.random()
        return strong_augment(
            x,
            u_jitter=u_jitter,
            u_blur=u_blur if self.blur else 0.0,
            mean=MEAN,
            std=STD,
            strength=self.color_jitter_strength,
            jitter_p=self.color_jitter_p,
            generator=self.generator,
            np_rng=self.np_rng,
            per_image_order=per_image,
        )

    # ------------------------------------------------------------------ random streams
    def reseed(self, numpy_seed: Sequence[int] | int, seed: int) -> None:
        """Fresh generators: NumPy from `numpy_seed`, Python and torch from `seed`."""
        self.np_rng = np.random.default_rng(numpy_seed)
        self.py_rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)

    def rng_state(self) -> dict[str, Any]:
        return {
            "numpy": self.np_rng.bit_generator.state,
            "python": self.py_rng.getstate(),
            "torch": self.generator.get_state(),
        }

    def load_rng_state(self, state: Mapping[str, Any]) -> None:
        self.np_rng.bit_generator.state = state["numpy"]
        self.py_rng.setstate(state["python"])
        self.generator.set_state(state["torch"])
