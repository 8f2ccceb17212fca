"""Everything that runs at inference: MiT encoder, DAFormer head, Segmentor and checkpoint I/O."""

from ssr.model.daformer_head import DAFormerHead
from ssr.model.mit import build_mit
from ssr.model.segmentor import Segmentor

__all__ = ["DAFormerHead", "Segmentor", "build_mit"]
