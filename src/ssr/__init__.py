"""ssr: SSR (SAM is a Strong Regularizer) on DAFormer / MIC, in Lightning + Hydra."""

from pathlib import Path

__version__ = "0.1.0"

# The Hydra configs live in the repository's conf/ (the package is installed editable, see README).
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
