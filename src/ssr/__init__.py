"""ssr: SSR (SAM is a Strong Regularizer) on DAFormer / MIC, in Lightning + Hydra."""

import os

from omegaconf import OmegaConf

__version__ = "0.1.0"

# The Hydra configs ship inside the package (src/ssr/conf), so an installed wheel finds them from
# any directory; users add their own config folders with `hydra.searchpath=[file:///...]`.
CONF_MODULE = "ssr.conf"
CONF_PATH = f"pkg://{CONF_MODULE}"

# `${ssr.pid:}` in run folder names (conf/hydra/default.yaml): processes started in the same second
# get distinct folders. Registered on import, before any config is composed.
OmegaConf.register_new_resolver("ssr.pid", os.getpid, use_cache=True, replace=True)
