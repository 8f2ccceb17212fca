"""ssr: SSR (SAM is a Strong Regularizer) on DAFormer / MIC, in Lightning + Hydra."""

__version__ = "0.1.0"
