"""Everything that runs at inference: MiT encoder, DAFormer head, Segmentor, test protocol, I/O."""

from ssr.model.daformer_head import DAFormerHead
from ssr.model.inference import Inference
from ssr.model.mit import build_mit
from ssr.model.segmentor import Prediction, Segmentor, View

__all__ = ["DAFormerHead", "Inference", "Prediction", "Segmentor", "View", "build_mit"]
