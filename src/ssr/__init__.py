"""ssr: SSR (SAM is a Strong Regularizer) on DAFormer / MIC, in Lightning + Hydra."""

import os

from omegaconf import OmegaConf

__version__ = "0.1.0"

# The Hydra configs ship inside the package (src/ssr/conf), so an installed wheel finds them from
# any directory; users add their own config folders with `hydra.searchpath=[file:///...]`.
CONF_MODULE = "ssr.conf"
CONF_PATH = f"pkg://{CONF_MODULE}"

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID")


def launch_rank() -> int:
    """This process's rank in a distributed launch, read from the environment (0 otherwise): what
    decides, before Lightning starts, which process keeps a run folder's records."""
    return max(int(os.environ.get(v) or 0) for v in RANK_VARIABLES)


# `${ssr.pid:}` in run folder names (conf/hydra/default.yaml): processes started in the same second
# get distinct folders. Registered on import, before any config is composed.
OmegaConf.register_new_resolver("ssr.pid", os.getpid, use_cache=True, replace=True)
# `${ssr.records:}` as hydra.output_subdir: the ranks > 0 of an srun launch share rank 0's folder
# and write no `.hydra/` records of their own (they would race with rank 0 keeping earlier ones).
OmegaConf.register_new_resolver(
    "ssr.records", lambda: ".hydra" if launch_rank() == 0 else None, replace=True
)
