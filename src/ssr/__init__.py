"""ssr: SSR (SAM is a Strong Regularizer) on DAFormer / MIC, in Lightning + Hydra."""

__version__ = "0.1.0"

# The Hydra configs ship inside the package (src/ssr/conf), so an installed wheel finds them from
# any directory; users add their own config folders with `hydra.searchpath=[file:///...]`.
CONF_MODULE = "ssr.conf"
CONF_PATH = f"pkg://{CONF_MODULE}"
